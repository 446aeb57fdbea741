"""A raw RFC 6455 client: sends any frame, valid or not, and reads the server's frames.

Ordinary clients refuse to send malformed frames, which is exactly what a server must be
tested against. Standard library only; used by the tests and the conformance command.
"""
import base64
import hashlib
import os
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(RuntimeError):
    def __init__(self, status, headers, body):
        super().__init__(f"handshake answered {status}")
        self.status, self.headers, self.body = status, headers, body


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def close_code(self):
        return struct.unpack("!H", self.payload[:2])[0] if self.opcode == CLOSE and len(self.payload) >= 2 else None

    @property
    def close_reason(self):
        return self.payload[2:].decode("utf-8", "replace") if self.opcode == CLOSE else None


def encode_frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None):
    """One frame; `length` overrides the declared payload length (to lie about it)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    if n < 126:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + apply_mask(key, payload)


def apply_mask(key, payload):
    # One big-integer XOR instead of a Python loop per byte: megabyte frames stay cheap.
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def close_payload(code, reason=""):
    return struct.pack("!H", code) + reason.encode()


class RawWebSocket:
    def __init__(self, url, timeout=10.0, headers=None):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.buffer = b""
        self.response_headers = self._handshake(headers or {})

    def _handshake(self, extra):
        key = base64.b64encode(os.urandom(16)).decode()
        headers = {
            "Host": f"{self.host}:{self.port}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
        }
        headers.update(extra)
        lines = [f"GET {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        response = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            response.setdefault(name.strip().lower(), []).append(value.strip())
        if status != 101:
            raise HandshakeError(status, response, self.buffer)
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if response.get("sec-websocket-accept") != [expected]:
            raise RuntimeError("wrong Sec-WebSocket-Accept")
        return response

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, opcode, payload=b"", **kwargs):
        self.send_raw(encode_frame(opcode, payload, **kwargs))

    def _read_exact(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def recv_frame(self, timeout=None):
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        first, second = self._read_exact(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        key = self._read_exact(4) if second & 0x80 else None
        payload = self._read_exact(n)
        if key:
            payload = apply_mask(key, payload)
        return Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, payload)

    def recv_message(self, timeout=None, skip_pings=True):
        """The next data or close frame; pings are answered and skipped.

        `timeout` bounds the whole wait: a server pinging more often than that must not
        keep a caller waiting for ever for a message that never comes.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message within {self.timeout if timeout is None else timeout} s")
            frame = self.recv_frame(left)
            if frame.opcode == PING and skip_pings:
                try:
                    self.send(PONG, frame.payload)
                except OSError:
                    pass  # the server may be closing: what it sent before is still to be read
                continue
            return frame

    def expect_close(self, timeout=None):
        """Read until the server's close frame (skipping other frames), for at most `timeout`
        seconds in all; None if it just hung up."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                frame = self.recv_message(deadline - time.monotonic())
                if frame.opcode == CLOSE:
                    return frame
        except ConnectionError:
            return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
