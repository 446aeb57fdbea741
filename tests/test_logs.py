"""Log lines: the client's address and nginx's request id in both nginx's access log and the
app's request log; what a URL or a header carries (the chat token, the room) in neither, nor
in any internal endpoint a scraper reads from outside the container (local mode only: an
nginx and an app of their own, whose logs the test reads)."""
import http.client
import os
import re
import time
import urllib.request

import pytest
from websockets.sync.client import connect

import stack
from chat_client import NO_CLIENT_PINGS, new_room, protocols, token
from local_processes import running_app, running_nginx
from repo import free_port

pytestmark = pytest.mark.local

APPS = {"uwsgi": "uwsgi-app", "flask": "flask-app"}
REDIS_URL = f"redis://127.0.0.1:{os.environ.get('LOCAL_REDIS_PORT', '6379')}/0"
# TEST-NET-3 (RFC 5737): an address no test client really has, so finding it proves it came
# from X-Forwarded-For through a trusted proxy.
CLIENT = "203.0.113.9"
FORGED_ID = "forged-request-id-0123456789abcdef"


@pytest.fixture(params=sorted(APPS))
def own_stack(request, tmp_path):
    """(backend, nginx's ws:// base, its status URL, the app's metrics URL, nginx's access
    log, the app's log) for an nginx of its own in front of an app of its own; nginx trusts
    loopback as a proxy, so X-Forwarded-For sets the client's address."""
    backend = request.param
    app_port, metrics_port, status_port = free_port(), free_port(), free_port()
    with running_app(APPS[backend], tmp_path / "app.log", port=app_port, REDIS_URL=REDIS_URL,
                     METRICS_HTTP_SOCKET=f"127.0.0.1:{metrics_port}"):
        upstream = {f"{APPS[backend].replace('-', '_')}_upstream": f"127.0.0.1:{app_port}"}
        with running_nginx(tmp_path, NGINX_REAL_IP_FROM="127.0.0.1", NGINX_STATUS_PORT=str(status_port),
                           **upstream) as base:
            yield (backend, base, f"http://127.0.0.1:{status_port}/stub_status",
                   f"http://127.0.0.1:{metrics_port}/metrics", tmp_path / "access.log", tmp_path / "app.log")


def lines_with(path, needle, timeout=10):
    """The lines of PATH containing NEEDLE, once there is one (both logs are written when a
    request ends: for a WebSocket when both sides have closed)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines() if needle in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)  # poll interval


def fields(line):
    return dict(re.findall(r"(\w+)=(\S+)", line))


def assert_same_request_in_both_logs(access_log, app_log, public_path, app_path, status):
    access = lines_with(access_log, f'"GET {public_path} HTTP/1.1" {status} ')
    assert len(access) == 1, access_log.read_text()
    assert access[0].split()[1] == CLIENT  # $remote_addr after real_ip
    request_id = fields(access[0])["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), access[0]
    app = lines_with(app_log, f"request_id={request_id} ")
    assert len(app) == 1, app_log.read_text()
    assert f'"GET {app_path}" {status} ' in app[0]
    assert fields(app[0])["client"] == CLIENT
    assert fields(app[0])["peer"] == "127.0.0.1"  # the connection's own: nginx
    return request_id


def test_an_http_request_has_nginxs_request_id_and_the_clients_address_in_both_logs(own_stack):
    backend, base, _status, _metrics, access_log, app_log = own_stack
    connection = http.client.HTTPConnection(base.removeprefix("ws://"), timeout=5)
    try:
        # A client's own id must not be what the app logs: nginx replaces it with its own.
        connection.request("GET", f"/{backend}/healthz?probe=1",
                           headers={"X-Forwarded-For": CLIENT, "X-Request-ID": FORGED_ID})
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert_same_request_in_both_logs(access_log, app_log, f"/{backend}/healthz", "/healthz", 200)
    assert FORGED_ID not in app_log.read_text()
    assert "probe=1" not in app_log.read_text() + access_log.read_text()


def test_a_chat_session_is_logged_with_its_request_id_and_no_secret_is_logged_or_scraped(own_stack):
    backend, base, status_url, metrics_url, access_log, app_log = own_stack
    room, secret = new_room(), token("log-reader")["token"]
    with connect(f"{base}/{backend}/ws/chat?room={room}", subprotocols=protocols(secret),
                 additional_headers={"X-Forwarded-For": CLIENT, "X-Request-ID": FORGED_ID},
                 **NO_CLIENT_PINGS) as ws:
        while '"history_end"' not in ws.recv(timeout=10):
            pass
        # While the session is open: everything nginx and the app publish for monitoring.
        scraped = {}
        for url in (status_url, metrics_url):
            with urllib.request.urlopen(url, timeout=5) as response:
                scraped[url] = response.read().decode()
        assert "Active connections:" in scraped[status_url]
        assert "wsstack_websocket_connections_open" in scraped[metrics_url]
    request_id = assert_same_request_in_both_logs(access_log, app_log, f"/{backend}/ws/chat", "/ws/chat", 101)
    # The app's own line at the session's end: how it closed, with the same id and address.
    closed = lines_with(app_log, "websocket closed ")
    assert closed == [f"websocket closed code=1000 initiator=client client={CLIENT} request_id={request_id}"], \
        app_log.read_text()
    logs = access_log.read_text() + app_log.read_text()
    for text in (*scraped.values(), logs):
        assert secret not in text and secret.split(".")[-1] not in text  # not even the signature
        assert room not in text and FORGED_ID not in text
    for text in scraped.values():
        assert CLIENT not in text and request_id not in text


def test_the_close_line_cuts_header_values_that_would_add_fields_or_lines():
    from wsstack.capacity import close_log_line, log_fields

    forged = {"HTTP_X_REAL_IP": "198.51.100.1 request_id=forged", "HTTP_X_REQUEST_ID": "abc\x1b[2J\nnext line"}
    assert close_log_line(*log_fields(forged), (1008, False)) == \
        "websocket closed code=1008 initiator=server client=198.51.100.1 request_id=abc"
    assert close_log_line(*log_fields({}), None) == "websocket closed code=1006 initiator=none client= request_id="


def test_an_open_websocket_keeps_only_its_routes_entries_of_the_environ_and_still_logs_its_close(monkeypatch, capsys):
    """After the handshake the request's environ is emptied (about 2.5 KiB per idle
    connection), all but the routes' own wsstack.* entries (the chat's admission); the close
    line still names the client and the request, read at the handshake. Run on a stand-in
    for the uwsgi module: the same capacity.upgrade() both apps' handshakes end in."""
    import sys
    import types

    from wsstack import capacity

    handshakes = []
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(
        websocket_handshake=lambda *args: handshakes.append(args), websocket_close_status=lambda: (1000, True)))
    admission = object()
    environ = {"HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==", "HTTP_ORIGIN": "http://127.0.0.1:8080",
               "HTTP_X_REAL_IP": CLIENT, "HTTP_X_REQUEST_ID": "0123abcd", "PATH_INFO": "/ws/chat",
               "QUERY_STRING": "room=lobby", "wsgi.input": object(), "wsstack.chat.admission": admission,
               "wsstack.subprotocol": "wsstack.chat.v1"}
    seen, slots = [], capacity.WORKER.open
    route = object()  # what a route passes on to its conversation (capacity.upgrade's argument)
    assert capacity.upgrade(environ, None, lambda argument: seen.append((argument, dict(environ))), route) == []
    assert handshakes == [("dGhlIHNhbXBsZSBub25jZQ==", "http://127.0.0.1:8080", "wsstack.chat.v1")]
    assert seen == [(route, {"wsstack.chat.admission": admission, "wsstack.subprotocol": "wsstack.chat.v1"})]
    assert capsys.readouterr().err == f"websocket closed code=1000 initiator=client client={CLIENT} request_id=0123abcd\n"
    assert capacity.WORKER.open == slots  # the slot was given back
