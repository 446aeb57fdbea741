"""Readiness probe: the app answers /healthz AND completes a WebSocket echo.

An open port proves nothing about a uWSGI app (the socket is bound before the app
imports, and an SSL-less build accepts connections but fails every handshake), so
the probe does the real thing (standard library only, through wsstack.rawws).

    python -m wsstack.probe http://127.0.0.1:8000 [--path-prefix /uwsgi]
Exit status 0 when healthy, 1 otherwise, with the reason on stderr.
"""
import argparse
import http.client
import json
import sys
import urllib.parse

from wsstack.rawws import CLOSE, PONG, TEXT, RawWebSocket, close_payload


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


def check_echo(host, port, path, timeout):
    # wsstack.rawws keeps whatever came along with the 101 (a server may ping at once)
    # and answers pings while it waits for the echo.
    with RawWebSocket(f"ws://{host}:{port}{path}", timeout=timeout) as ws:
        ws.send(TEXT, b"probe")
        frame = ws.recv_message()
        while frame.opcode == PONG:  # an unsolicited pong (a heartbeat) is no answer
            frame = ws.recv_message()
        if (frame.opcode, frame.payload) != (TEXT, b"probe"):
            raise RuntimeError(f"echo returned opcode {frame.opcode} {frame.payload[:40]!r}")
        ws.send(CLOSE, close_payload(1000))


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
