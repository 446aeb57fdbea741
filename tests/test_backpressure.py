"""Stalled readers and full workers (local mode): what one client can do to the others.

Each test runs its own app with ONE worker (so every connection shares the worker under
test) behind its own nginx, both from the project's config files, with short timeouts.
"""
import time
import urllib.request

import pytest

from local_processes import running_app, running_nginx, start_app
from wsstack.rawws import BINARY, TEXT, HandshakeError, RawWebSocket

pytestmark = pytest.mark.local

CHUNK = 256 * 1024
MOST_SENT = 64 * 1024 * 1024  # far beyond what the socket buffers along the way can hold
ONE_WORKER = {"UWSGI_PROCESSES": "1", "WS_MAX_MESSAGES_PER_SECOND": "1000", "WS_MESSAGE_BURST": "1000"}


@pytest.fixture
def one_worker_behind_nginx(tmp_path, backend, request):
    """(ws:// URL of the backend's echo through nginx, the app's log path)."""
    app_settings, nginx_settings = request.param
    app_log = tmp_path / "app.log"
    with running_app(f"{backend}-app", app_log, **ONE_WORKER, **app_settings) as app_url:
        upstream = app_url.removeprefix("http://")
        with running_nginx(tmp_path, **{f"{backend}_app_upstream": upstream}, **nginx_settings) as nginx_url:
            yield f"{nginx_url}/{backend}/ws/echo", app_log


def stall(ws):
    """Send echo requests without ever reading the answers, until the server stops taking
    them: by then the server's echo is stuck on a full pipe. Returns the bytes sent."""
    ws.sock.settimeout(1.0)
    payload, sent = b"s" * CHUNK, 0
    while sent < MOST_SENT:
        try:
            ws.send(BINARY, payload)
        except TimeoutError:  # nothing accepted for a second
            return sent
        sent += CHUNK
    raise AssertionError(f"the server kept reading {sent} bytes that it could not echo")


def drain(ws, deadline_seconds):
    """Read everything the server still delivers; (bytes received, how the connection ended)."""
    ws.sock.settimeout(1.0)
    received, deadline = 0, time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            chunk = ws.sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, "reset"
        if not chunk:
            return received, "closed"
        received += len(chunk)
    return received, "still open"


def assert_echoes(ws, count, timeout):
    for i in range(count):
        message = f"bystander {i}".encode()
        ws.send(TEXT, message)
        assert ws.recv_message(timeout=timeout).payload == message


@pytest.mark.parametrize(
    "one_worker_behind_nginx, cut_by",
    [
        # The app gives up on a send after UWSGI_SOCKET_TIMEOUT (nginx would wait far longer).
        (({"UWSGI_SOCKET_TIMEOUT": "2"}, {"NGINX_SEND_TIMEOUT": "120s"}), "app"),
        # nginx gives up on the stalled client after NGINX_SEND_TIMEOUT (the app would wait far longer).
        (({"UWSGI_SOCKET_TIMEOUT": "120"}, {"NGINX_SEND_TIMEOUT": "2s"}), "nginx"),
    ],
    indirect=["one_worker_behind_nginx"], ids=["bounded-by-app", "bounded-by-nginx"],
)
def test_a_stalled_reader_is_cut_off_and_blocks_nobody(one_worker_behind_nginx, cut_by):
    url, app_log = one_worker_behind_nginx
    with RawWebSocket(url) as bystander, RawWebSocket(url) as stalled:
        assert_echoes(bystander, 1, timeout=5)
        sent = stall(stalled)
        stalled_at = time.monotonic()
        # The same worker is blocked sending to the stalled client; the bystander does not wait
        # for that send's 2 s timeout (a blocked worker would make each answer take that long).
        assert_echoes(bystander, 20, timeout=1.5)
        assert time.monotonic() - stalled_at < 2
        # Past the 2 s bound (plus slack), the server has ended the stalled connection: what
        # the client reads now is the tail of the echoes that made it out, then the end.
        time.sleep(4)  # the client keeps not reading: that is the scenario under test
        received, ending = drain(stalled, deadline_seconds=10)
        assert ending in ("closed", "reset")
        assert received < sent
        # The worker is the same and keeps serving.
        assert_echoes(bystander, 5, timeout=5)
    # Only two parties could have ended it, and the app says whether it was the one.
    # (nginx logs its "client timed out" at info level, below the configured warn.)
    app_gave_up = "TIMEOUT !!!" in app_log.read_text()
    assert app_gave_up == (cut_by == "app")


@pytest.mark.parametrize(
    "one_worker_behind_nginx", [({"WS_MAX_CONNECTIONS_PER_WORKER": "3", "UWSGI_GEVENT": "10"}, {})], indirect=True,
)
def test_a_full_worker_refuses_new_websockets_with_503(one_worker_behind_nginx):
    url, _ = one_worker_behind_nginx
    held = [RawWebSocket(url) for _ in range(3)]
    try:
        with pytest.raises(HandshakeError) as refused:
            RawWebSocket(url)
        assert refused.value.status == 503
        assert refused.value.headers["retry-after"] == ["5"]
        assert b"WS_MAX_CONNECTIONS_PER_WORKER" in refused.value.body
        # The refusal is about WebSockets only: the full worker still answers its health check.
        health_url = url.replace("ws://", "http://").replace("/ws/echo", "/healthz")
        assert urllib.request.urlopen(health_url, timeout=5).status == 200
        for ws in held:  # the connections it holds are untouched
            assert_echoes(ws, 1, timeout=5)
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the worker frees the slot once it sees the close
            try:
                with RawWebSocket(url) as ws:
                    assert_echoes(ws, 1, timeout=5)
                break
            except HandshakeError as exc:
                assert exc.status == 503 and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for ws in held:
            ws.close()


@pytest.mark.parametrize("backend_app", ["uwsgi-app", "flask-app"])
def test_a_cap_that_leaves_no_free_core_is_refused_at_start(tmp_path, backend_app):
    process, _ = start_app(backend_app, tmp_path / "app.log", WS_MAX_CONNECTIONS_PER_WORKER="10", UWSGI_GEVENT="10")
    try:
        assert process.wait(timeout=30) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "WS_MAX_CONNECTIONS_PER_WORKER=10 must be lower than the gevent cores" in (tmp_path / "app.log").read_text()
