"""Readiness probe: the app answers /healthz AND completes a WebSocket echo.

An open port proves nothing about a uWSGI app (the socket is bound before the app
imports, and an SSL-less build accepts connections but fails every handshake), so
the probe does the real thing with the standard library only.

    python -m wsstack.probe http://127.0.0.1:8000 [--path-prefix /uwsgi]
Exit status 0 when healthy, 1 otherwise, with the reason on stderr.
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import sys
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def check_health(host, port, path, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path} answered {resp.status}")
    return json.loads(body) if resp.getheader("Content-Type", "").startswith("application/json") else {}


class _Frames:
    """Server frames from `sock`, starting with bytes that came along with the handshake's
    answer (a server may send a frame, such as a ping, right after its 101)."""

    def __init__(self, sock, pending):
        self.sock, self.pending = sock, pending

    def _exact(self, n):
        while len(self.pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed during the echo check")
            self.pending += chunk
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def next(self):
        """(opcode, payload) of the next frame."""
        b1, b2 = self._exact(2)
        length = b2 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exact(8))
        return b1 & 0x0F, self._exact(length)


def check_echo(host, port, path, timeout):
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed during the handshake")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise RuntimeError(f"handshake answered {lines[0]!r}")
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if headers.get("sec-websocket-accept") != expected:
            raise RuntimeError("wrong Sec-WebSocket-Accept")
        frames = _Frames(sock, rest)
        payload = b"probe"
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        while True:
            opcode, data = frames.next()
            if opcode == 0x9:  # the server may ping first; answer and keep waiting for the echo
                mask = os.urandom(4)
                sock.sendall(bytes([0x8A, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
                continue
            if opcode == 0xA:
                continue
            if data != payload:
                raise RuntimeError(f"echo returned {data!r}")
            break
        sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))


def probe(base_url, timeout=3.0):
    url = urllib.parse.urlsplit(base_url)
    host, port, prefix = url.hostname, url.port or 80, url.path.rstrip("/")
    info = check_health(host, port, prefix + "/healthz", timeout)
    check_echo(host, port, prefix + "/ws/echo", timeout)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000 (the app) or http://127.0.0.1:8080/uwsgi (via nginx)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        info = probe(args.base_url, args.timeout)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"unhealthy: {args.base_url}: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {args.base_url}: {info.get('app')} answered /healthz and a WebSocket echo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
