"""nginx behind a proxy (NGINX_REAL_IP_FROM): which client address the limits and the apps see,
and which scheme reaches the apps, with an nginx of its own rendered from the project's
template in front of a server that answers with the headers it got (local mode only)."""
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from local_processes import running_nginx

pytestmark = pytest.mark.local


class HeaderEcho(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({name.lower(): value for name, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeaderEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(base, headers):
    """(status, the headers the app got) for GET /uwsgi/echo-headers through nginx."""
    connection = http.client.HTTPConnection(base.removeprefix("ws://"), timeout=5)
    try:
        connection.request("GET", "/uwsgi/echo-headers", headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.status == 200 else None
    finally:
        connection.close()


def test_by_default_no_proxy_is_trusted(tmp_path, upstream):
    with running_nginx(tmp_path, uwsgi_app_upstream=upstream) as base:
        status, seen = get(base, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert status == 200
    # A client cannot choose its own address, nor claim https over plain http.
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert " 127.0.0.1 \"GET /uwsgi/echo-headers" in (tmp_path / "access.log").read_text()


def test_from_a_trusted_proxy_the_client_address_and_scheme_are_the_forwarded_ones(tmp_path, upstream):
    with running_nginx(tmp_path, uwsgi_app_upstream=upstream, NGINX_REAL_IP_FROM="127.0.0.0/8") as base:
        # The rightmost address the trusted hops did not add themselves is the client's.
        status, seen = get(base, {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 127.0.0.2",
                                  "X-Forwarded-Proto": "https"})
        assert (status, seen["x-real-ip"], seen["x-forwarded-proto"]) == (200, "203.0.113.7", "https")
        # Only http or https is passed on.
        _, seen = get(base, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "gopher"})
        assert seen["x-forwarded-proto"] == "http"
        # A trusted hop that forwards no address: the connection's own, and its scheme.
        _, seen = get(base, {"X-Forwarded-Proto": "https"})
        assert (seen["x-real-ip"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
    assert " 203.0.113.7 \"GET /uwsgi/echo-headers" in (tmp_path / "access.log").read_text()


def test_behind_a_trusted_proxy_the_limits_count_each_client_apart(tmp_path, upstream):
    limits = {"NGINX_WS_HANDSHAKES_PER_SECOND": "1", "NGINX_WS_HANDSHAKE_BURST": "1"}
    with running_nginx(tmp_path, uwsgi_app_upstream=upstream, NGINX_REAL_IP_FROM="127.0.0.1", **limits) as base:
        # Every request comes from the proxy's address; each client still has its own budget.
        first = [get(base, {"X-Forwarded-For": f"203.0.113.{n}"})[0] for n in range(1, 6)]
        again = [get(base, {"X-Forwarded-For": "203.0.113.1"})[0] for _ in range(3)]
    assert first == [200] * 5
    assert 429 in again


def test_the_address_setting_is_checked_at_start(tmp_path):
    import subprocess

    from repo import REPO

    script = REPO / "nginx" / "docker-entrypoint.d" / "12-real-ip.envsh"
    for value, ok in [("unix:", True), ("10.0.0.0/8", True), ("fd00::/8", True), ("", False), ("pods", False),
                      ("10.0.0.0/8 10.1.0.0/16", False)]:
        result = subprocess.run(["sh", "-c", f'. "{script}"'], env={"PATH": "/usr/bin:/bin", "NGINX_REAL_IP_FROM": value},
                                capture_output=True, text=True)
        assert (result.returncode == 0) is ok, (value, result.stderr)
        if not ok:
            assert f"12-real-ip.envsh: NGINX_REAL_IP_FROM='{value}' must be an address" in result.stderr
