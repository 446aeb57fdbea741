"""Abuse limits in nginx: connections and handshakes per client address (local mode).

Each test runs its own nginx, rendered from the same template with tiny limits, in front of
the running local stack's apps, so the limits can be reached in a few requests.
"""
import time

import pytest

from local_processes import running_nginx
from wsstack.rawws import TEXT, HandshakeError, RawWebSocket

pytestmark = pytest.mark.local


@pytest.fixture
def limited_nginx(tmp_path, request):
    with running_nginx(tmp_path, **request.param) as url:
        yield url


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
