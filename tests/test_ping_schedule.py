"""Keep-alive pings of many idle WebSockets, on an app instance of its own pinging every 2 s.

The pings of every connection due in the same second of the clock go out together, just after
that second begins (uWSGI patch 0030 for the blocking receive, the compat layer's ping sweep
for flask-app): one wake-up of the worker for all of them, instead of one per connection at
the moment it happened to connect. The event loop writes the ping and takes the pong itself
(patches 0032 and 0033), without waking the connection's greenlet. What must not change: each
connection is pinged every interval, a message between pings (even in the pong's own TCP
segment) is answered at once, the client's own pings are answered, and a peer that stops
answering is still dropped after the pong tolerance.
"""
import threading
import time

import pytest

from local_processes import running_app_process
from wsstack.rawws import BINARY, PING, PONG, TEXT, RawWebSocket, encode_frame

PING_FREQ = 2
PONG_TOLERANCE = 3
CONNECTIONS = 12
HOLD = 4 * PING_FREQ + 1
APPS = ("uwsgi-app", "flask-app")

# Starts app instances of its own from the checkout (make test only).
pytestmark = pytest.mark.local


@pytest.fixture(scope="module", params=APPS)
def pinging_app(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("ping_schedule") / f"{request.param}.log"
    with running_app_process(request.param, log, UWSGI_PROCESSES="1",
                             UWSGI_WEBSOCKETS_PING_FREQ=str(PING_FREQ),
                             UWSGI_WEBSOCKETS_PONG_TOLERANCE=str(PONG_TOLERANCE)) as (_process, url):
        yield url.replace("http", "ws") + "/ws/echo"


def answer_pings(url, opened_at, until, pings, errors):
    """Hold one connection, answer its pings until `until` (time.time()), record when it opened
    (opened_at[0]) and when they came."""
    try:
        with RawWebSocket(url) as ws:
            opened_at.append(time.time())
            while time.time() < until:
                try:
                    frame = ws.recv_frame(timeout=max(0.05, until - time.time()))
                except TimeoutError:
                    break
                if frame.opcode == PING:
                    pings.append(time.time())
                    ws.send(PONG, frame.payload)
                else:
                    errors.append(f"unexpected frame {frame}")
    except Exception as exc:  # reported by the test, not lost in the thread
        errors.append(repr(exc))


def hold_idle(url):
    """CONNECTIONS connections opened at scattered moments within the second, held HOLD s."""
    until = time.time() + HOLD + 1
    pings = [[] for _ in range(CONNECTIONS)]
    opened = [[] for _ in range(CONNECTIONS)]
    errors, threads = [], []
    for i in range(CONNECTIONS):
        thread = threading.Thread(target=answer_pings, args=(url, opened[i], until, pings[i], errors))
        thread.start()
        threads.append(thread)
        time.sleep(1 / CONNECTIONS + 0.013)  # a new phase within the second for each
    for thread in threads:
        thread.join(HOLD + 10)
    assert not errors
    return [at for [at] in opened], pings


@pytest.fixture(scope="module")
def held(pinging_app):
    """One hold of CONNECTIONS idle connections per app, which the two tests below read."""
    return hold_idle(pinging_app)


def test_each_idle_connection_is_pinged_every_interval(held):
    _opened, pings = held
    for times in pings:
        assert len(times) >= HOLD // PING_FREQ - 1, times
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        # pings go out on whole seconds of the clock: one interval apart, give or take the
        # second the first one was rounded to, never an interval skipped
        assert all(PING_FREQ - 1 < gap < PING_FREQ + 1 for gap in gaps), gaps


def test_the_first_ping_comes_one_interval_after_the_handshake(held):
    # uWSGI pings an interval after the handshake's second (patch 0020) and the batch goes out
    # just after that second begins: the first ping's second is PING_FREQ after the opening's
    # (PING_FREQ - 1 when the 101 crossed a second on its way). A connection left out of its
    # second's batch is pinged with a later one: a second or more late.
    opened, pings = held
    late = [(round(at, 2), round(times[0], 2)) for at, times in zip(opened, pings)
            if int(times[0]) - int(at) not in (PING_FREQ - 1, PING_FREQ)]
    assert not late, late


def test_pings_due_in_the_same_second_go_out_together(held):
    opened, pings = held
    # the connections opened at every phase within the second...
    assert max(t % 1 for t in opened) - min(t % 1 for t in opened) > 0.7
    # ...and are pinged together, just after a second of the clock begins, not each at its
    # own phase (a loaded machine may delay the batch, never by half a second)
    phases = [t % 1 for times in pings for t in times]
    assert phases and max(phases) < 0.5, sorted(round(p, 2) for p in phases)


def test_a_message_between_pings_is_echoed_at_once(pinging_app):
    with RawWebSocket(pinging_app) as ws:
        frame = ws.recv_frame(timeout=PING_FREQ + 2)
        assert frame.opcode == PING
        ws.send(PONG, frame.payload)
        time.sleep(PING_FREQ / 4)  # waiting for its socket again, its next ping far off
        sent = time.monotonic()
        ws.send(TEXT, b"between pings")
        frame = ws.recv_message(timeout=PING_FREQ)
        assert (frame.opcode, frame.payload) == (TEXT, b"between pings")
        assert time.monotonic() - sent < PING_FREQ / 2, "answered at the next ping, not at once"


def first_ping(ws):
    frame = ws.recv_frame(timeout=PING_FREQ + 2)
    assert frame.opcode == PING, frame
    return frame


def test_a_message_in_the_tcp_segment_of_a_pong_is_echoed_at_once(pinging_app):
    # The event loop reads the pong (patch 0032): what came with it must reach the app, not
    # be taken with it or wait for the next ping.
    with RawWebSocket(pinging_app) as ws:
        for round_ in range(2):
            ping = first_ping(ws)
            sent = time.monotonic()
            ws.send_raw(encode_frame(PONG, ping.payload) + encode_frame(TEXT, b"with the pong %d" % round_))
            frame = ws.recv_message(timeout=PING_FREQ)
            assert (frame.opcode, frame.payload) == (TEXT, b"with the pong %d" % round_)
            assert time.monotonic() - sent < PING_FREQ / 2, "answered at the next ping, not at once"


def test_a_pong_cut_across_tcp_writes_counts_and_what_follows_is_echoed(pinging_app):
    with RawWebSocket(pinging_app) as ws:
        ping = first_ping(ws)
        pong = encode_frame(PONG, ping.payload + b" and more")
        ws.send_raw(pong[:3])
        time.sleep(0.2)  # the event loop reads the first bytes alone
        ws.send_raw(pong[3:] + encode_frame(BINARY, b"\x00after"))
        frame = ws.recv_message(timeout=PING_FREQ)
        assert (frame.opcode, frame.payload) == (BINARY, b"\x00after")
        # the pong counted: pinged again and again, never dropped for want of it
        deadline = time.monotonic() + PONG_TOLERANCE + PING_FREQ + 1
        while time.monotonic() < deadline:
            frame = ws.recv_frame(timeout=PING_FREQ + 2)
            assert frame.opcode == PING, frame
            ws.send(PONG, frame.payload)


def test_the_clients_own_ping_is_answered_while_the_connection_idles(pinging_app):
    with RawWebSocket(pinging_app) as ws:
        ws.send(PONG, first_ping(ws).payload)
        time.sleep(PING_FREQ / 4)  # idle again, its socket watched by the event loop
        ws.send(PING, b"are you there")
        frame = ws.recv_frame(timeout=PING_FREQ)
        assert (frame.opcode, frame.payload) == (PONG, b"are you there")


def test_a_peer_that_stops_answering_pings_is_dropped_after_the_pong_tolerance(pinging_app):
    with RawWebSocket(pinging_app) as ws:
        first = ws.recv_frame(timeout=PING_FREQ + 2)
        assert first.opcode == PING
        pinged = time.monotonic()
        # no pong: the connection ends once the tolerance has passed since the ping, at the
        # next check (a ping interval later at most)
        with pytest.raises(ConnectionError):
            while True:
                frame = ws.recv_frame(timeout=PING_FREQ + PONG_TOLERANCE + 3)
                assert frame.opcode == PING, frame
        waited = time.monotonic() - pinged
        assert PONG_TOLERANCE - 1 < waited < PONG_TOLERANCE + PING_FREQ + 2, waited
