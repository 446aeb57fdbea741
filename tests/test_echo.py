"""WebSocket echo on both backends through nginx."""
import asyncio
import random
import string
import time

import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect

from stack import PING_FREQ, PROXY_READ_TIMEOUT, ws_url

# Client pings would keep nginx's upstream read timer alive on their own (the app's pong is
# upstream traffic), hiding a missing server ping. Only the server may keep connections alive.
NO_CLIENT_PINGS = {"ping_interval": None}


def assert_silent(ws, seconds):
    """Nothing may arrive: no empty message, no stray frame (Flask-uWSGI-WebSocket issue #39)."""
    with pytest.raises(TimeoutError):
        extra = ws.recv(timeout=seconds)
        pytest.fail(f"unexpected message after the echo: {extra!r}")


def test_handshake(backend):
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["Upgrade"].lower() == "websocket"
        assert "upgrade" in ws.response.headers["Connection"].lower()


@pytest.mark.parametrize("text", ["hello", "héllo wörld – ☃ – 日本語 – 😀", " spaces and\nnewlines\t"])
def test_text_echo(backend, text):
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:
        ws.send(text)
        assert ws.recv(timeout=5) == text
        assert_silent(ws, 0.5)


def test_512_kib_echo(backend):
    text = "".join(random.choices(string.ascii_letters + string.digits, k=512 * 1024))
    with connect(ws_url(backend), max_size=2**21, **NO_CLIENT_PINGS) as ws:
        ws.send(text)
        assert ws.recv(timeout=10) == text
        assert_silent(ws, 0.5)


def test_100_messages_in_order_on_one_connection(backend):
    messages = [f"message {i} " + "x" * i for i in range(100)]
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:
        for message in messages:
            ws.send(message)
        assert [ws.recv(timeout=5) for _ in messages] == messages
        assert_silent(ws, 0.5)


def test_200_concurrent_connections_each_echo(backend):
    async def one_client(n):
        async with async_connect(ws_url(backend), open_timeout=20, **NO_CLIENT_PINGS) as ws:
            for i in range(3):
                await ws.send(f"client {n} message {i}")
                assert await asyncio.wait_for(ws.recv(), 10) == f"client {n} message {i}"
            return n

    async def all_clients():
        return await asyncio.gather(*(one_client(n) for n in range(200)))

    assert sorted(asyncio.run(all_clients())) == list(range(200))


def test_idle_connection_outlives_proxy_timeout_and_stays_silent(backend):
    # Held longer than nginx's proxy_read_timeout (5 s in make test): only the server's
    # pings (every UWSGI_WEBSOCKETS_PING_FREQ s) keep nginx from closing it.
    hold = max(10.0, 3 * PROXY_READ_TIMEOUT)
    assert PING_FREQ < PROXY_READ_TIMEOUT < hold
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        started = time.monotonic()
        assert_silent(ws, hold)
        assert time.monotonic() - started >= hold
        ws.send("after")
        assert ws.recv(timeout=5) == "after"
        assert_silent(ws, 1)
