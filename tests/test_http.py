"""Plain HTTP through nginx: health, the demo page, and WebSocket endpoints hit without an upgrade."""
import json

import pytest

from stack import BASE_URL, http_get, ws_url
from wsstack.rawws import TEXT, RawWebSocket


def test_stack_health_reports_both_apps():
    resp = http_get("/healthz")
    assert resp.status == 200
    assert json.loads(resp.body) == {"status": "ok", "apps": ["uwsgi-app", "flask-app"]}
    assert resp.headers["cache-control"] == "no-store"


def test_app_health_through_nginx(backend):
    resp = http_get(f"/{backend}/healthz")
    assert resp.status == 200
    health = json.loads(resp.body)
    assert health["status"] == "ok"
    assert health["app"] == f"{backend}-app"
    # Redis is reported, never required for the app to be healthy.
    assert health["redis"] == "ok" or health["redis"].startswith("unavailable")


def test_plain_get_on_websocket_endpoint_asks_for_an_upgrade(backend):
    resp = http_get(f"/{backend}/ws/echo")
    assert resp.status == 426
    assert resp.headers["upgrade"].lower() == "websocket"
    assert b"WebSocket" in resp.body


def test_upgrade_without_key_is_a_bad_request(backend):
    resp = http_get(f"/{backend}/ws/echo", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert resp.status == 400
    assert b"Sec-WebSocket-Key" in resp.body


def test_a_request_with_40_headers_of_its_own_is_served(backend):
    """UWSGI_MAX_VARS (32: 64 request variables, a smaller table per gevent core) leaves room
    for about 50 headers; a browser's WebSocket handshake through nginx has about 20."""
    headers = {f"X-Extra-{i}": "x" for i in range(40)}
    resp = http_get(f"/{backend}/healthz", headers=headers)
    assert resp.status == 200
    resp = http_get(f"/{backend}/ws/echo", headers=headers)
    assert resp.status == 426


def test_unknown_app_path_is_404_not_5xx(backend):
    assert http_get(f"/{backend}/no-such-thing").status == 404


def test_demo_page_is_served_with_a_content_security_policy():
    resp = http_get("/")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    assert b"<script" in resp.body


def test_server_header_hides_the_nginx_version():
    assert http_get("/healthz").headers["server"] == "nginx"


def handshake(backend, **headers):
    base = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    base.update(headers)
    return http_get(f"/{backend}/ws/echo", headers={k: v for k, v in base.items() if v is not None})


def test_malformed_key_is_a_bad_request(backend):
    resp = handshake(backend, **{"Sec-WebSocket-Key": "not-base64-16-bytes"})
    assert resp.status == 400
    assert b"Sec-WebSocket-Key" in resp.body


def test_unsupported_version_gets_426_naming_version_13(backend):
    resp = handshake(backend, **{"Sec-WebSocket-Version": "8"})
    assert resp.status == 426
    assert resp.headers["sec-websocket-version"] == "13"


def test_foreign_origin_is_forbidden(backend):
    # Cross-site WebSocket hijacking: a page elsewhere must not ride on the user's cookies.
    resp = handshake(backend, Origin="https://evil.example")
    assert resp.status == 403
    assert b"evil.example" in resp.body


def test_the_same_host_under_the_other_scheme_is_a_foreign_origin(backend):
    # An http page on the same host and port is another origin (RFC 6454): it must not open
    # the sockets of the https one, and the other way round.
    scheme, rest = BASE_URL.split("://", 1)
    resp = handshake(backend, Origin=f"{'https' if scheme == 'http' else 'http'}://{rest}")
    assert resp.status == 403


@pytest.mark.parametrize("origin", [BASE_URL, None], ids=["same origin", "no Origin (non-browser)"])
def test_same_origin_and_originless_clients_are_accepted(backend, origin):
    ws = RawWebSocket(ws_url(backend), headers={"Origin": origin})
    try:
        assert "sec-websocket-origin" not in ws.response_headers  # no pre-RFC header (patch 0007)
        ws.send(TEXT, b"hi")
        assert ws.recv_message(timeout=5).payload == b"hi"
    finally:
        ws.close()


def test_the_health_probe_accepts_a_ping_sent_along_with_the_101():
    """A server may ping at once (flask-app did before patch 0020): the ping can arrive in the same read as
    the handshake's answer, and the probe (compose's healthcheck) must still pass."""
    import base64
    import hashlib
    import socket
    import threading

    from wsstack import probe
    from wsstack.rawws import GUID, apply_mask

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            if request.startswith(b"GET /healthz"):
                body = b'{"status": "ok"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            key = [line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + b"\x89\x00")  # and a ping, at once
            message = b""
            while len(message) < 2 + 4 + len(b"probe"):  # its masked message, then the pong
                message += conn.recv(4096)
            payload = apply_mask(message[2:6], message[6:6 + (message[1] & 0x7F)])
            conn.sendall(bytes([0x81, len(payload)]) + payload)
            while conn.recv(4096):  # the pong and the close, until the probe hangs up
                pass

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        probe.probe(f"http://127.0.0.1:{port}", timeout=5)
    finally:
        listener.close()
