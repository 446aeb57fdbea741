"""Abuse limits in nginx: connections and handshakes per client address (local mode).

Each test runs its own nginx, rendered from the same template with tiny limits, in front of
the running local stack's apps, so the limits can be reached in a few requests.
"""
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from repo import free_port, render_nginx
from wsstack.rawws import TEXT, HandshakeError, RawWebSocket

pytestmark = pytest.mark.local


@pytest.fixture
def limited_nginx(tmp_path, request):
    port = free_port()
    prefix = render_nginx(
        tmp_path, NGINX_PORT=str(port),
        NGINX_UWSGI_APP_UPSTREAM=f"127.0.0.1:{os.environ.get('LOCAL_UWSGI_APP_PORT', '8001')}",
        NGINX_FLASK_APP_UPSTREAM=f"127.0.0.1:{os.environ.get('LOCAL_FLASK_APP_PORT', '8002')}",
        **request.param,
    )
    process = subprocess.Popen(["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:  # readiness: nginx answers its own health check
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)
    yield f"ws://127.0.0.1:{port}"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)


@pytest.mark.parametrize("limited_nginx", [{"NGINX_WS_CONNECTIONS_PER_IP": "3"}], indirect=True)
def test_connections_beyond_the_per_ip_limit_get_429(limited_nginx, backend):
    url = f"{limited_nginx}/{backend}/ws/echo"
    held = [RawWebSocket(url) for _ in range(3)]
    try:
        with pytest.raises(HandshakeError) as refused:
            RawWebSocket(url)
        assert refused.value.status == 429
        held.pop().close()
        time.sleep(0.2)  # nginx notices the closed connection on its next event loop turn
        with RawWebSocket(url) as ws:  # a slot is free again
            ws.send(TEXT, b"fits")
            assert ws.recv_message(timeout=5).payload == b"fits"
    finally:
        for ws in held:
            ws.close()


@pytest.mark.parametrize(
    "limited_nginx", [{"NGINX_WS_HANDSHAKES_PER_SECOND": "1", "NGINX_WS_HANDSHAKE_BURST": "2"}], indirect=True,
)
def test_handshakes_beyond_the_per_ip_rate_get_429(limited_nginx, backend):
    url = f"{limited_nginx}/{backend}/ws/echo"
    statuses = []
    for _ in range(4):
        try:
            RawWebSocket(url).close()
            statuses.append(101)
        except HandshakeError as exc:
            statuses.append(exc.status)
    assert statuses == [101, 101, 101, 429]  # the rate's one, plus a burst of two, then refused
