"""The uWSGI WebSocket engine under load, at stop and at close, on processes of its own (local mode).

One connection flooding small frames, buffers left at their peak size, a graceful stop with
clients in every state, and what uwsgi.websocket_close() lets onto the wire.
"""
import json
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from local_processes import running_app_process, start_app, stop, wait_healthy
from repo import REPO
from test_backpressure import ONE_WORKER, assert_echoes, one_worker_behind_nginx, stall  # noqa: F401 (fixture)
from wsstack.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawWebSocket, encode_frame

pytestmark = pytest.mark.local

MAX_SIZE = 1024 * 1024  # websockets-max-size of the ini (1024 KiB)


# --- 2. One connection cannot stall its worker -------------------------------------------------

FLOOD_BYTES = 3 * 512 * 1024  # 1.5 MiB of 6-byte frames: some 260000 of them
FLOODS = {
    "pongs": lambda: encode_frame(PONG) * (FLOOD_BYTES // 6),
    "unread pings": lambda: encode_frame(PING) * (FLOOD_BYTES // 6),
    "empty fragments": lambda: encode_frame(TEXT, fin=False) + encode_frame(CONT, fin=False) * (FLOOD_BYTES // 6),
}
PROBES = 8
PROBE_INTERVAL = 0.02
MOST_PROBE_LATENCY = 0.1


class Probes:
    """PROBES connections, each echoing a small message every PROBE_INTERVAL in a thread of
    its own until stopped; they record every round trip's time."""

    def __init__(self, url):
        self.connections = [RawWebSocket(url) for _ in range(PROBES)]
        self.latencies = [[] for _ in self.connections]
        self.done = threading.Event()
        self.pool = ThreadPoolExecutor(PROBES)
        self.futures = [self.pool.submit(self._run, i) for i in range(PROBES)]

    def _run(self, i):
        ws, n = self.connections[i], 0
        while not self.done.is_set():
            message = f"probe {i} {n}".encode()
            started = time.monotonic()
            ws.send(TEXT, message)
            frame = ws.recv_message(timeout=10)
            self.latencies[i].append(time.monotonic() - started)
            assert frame.payload == message, frame
            n += 1
            self.done.wait(PROBE_INTERVAL)

    def wait_rounds(self, rounds, timeout=10):
        """Until every probe made `rounds` more round trips (or one failed)."""
        targets = [len(samples) + rounds for samples in self.latencies]
        deadline = time.monotonic() + timeout
        while any(len(s) < t for s, t in zip(self.latencies, targets)):
            for future in self.futures:
                if future.done():
                    future.result()  # raises what the probe met
            assert time.monotonic() < deadline, "the probes stopped answering"
            time.sleep(PROBE_INTERVAL)

    def stop(self):
        """Stops them; returns the longest round trip, after raising what any probe met."""
        self.done.set()
        try:
            for future in self.futures:
                future.result(timeout=15)
        finally:
            self.pool.shutdown()
            for ws in self.connections:
                ws.close()
        return max(max(samples) for samples in self.latencies)


@pytest.mark.parametrize("flood", FLOODS)
@pytest.mark.parametrize("one_worker_behind_nginx", [({}, {})], indirect=True)
def test_a_connection_flooding_small_frames_stalls_no_one_and_is_closed_with_1008(one_worker_behind_nginx, flood):
    """Guards the worker's other connections against one client's stream of tiny frames that
    are not messages (pongs, pings whose pongs it never reads, empty non-final fragments):
    they count against the per-connection rate limit (WS_MAX_MESSAGES_PER_SECOND, WS_MESSAGE_BURST)
    and the engine yields between them. A first ~1000 KiB message grows the connection's
    read buffer, so one read then holds some 170000 frames.
    Old behaviour: the worker parsed the whole flood without serving anyone else (probe round
    trips up to 2-2.6 s) and the flooder was never closed: it could go on for ever."""
    url, _log = one_worker_behind_nginx
    data = FLOODS[flood]()
    with RawWebSocket(url) as flooder:
        big = b"m" * (1000 * 1024)
        flooder.send(TEXT, big)
        assert flooder.recv_message(timeout=10).payload == big
        probes = Probes(url)
        try:
            probes.wait_rounds(3)
            baseline = statistics.median(s for samples in probes.latencies for s in samples)
            flooder.sock.settimeout(10)
            try:
                flooder.send_raw(data)
            except OSError:
                pass  # closed on us mid-flood: the close frame is read below
            try:
                closed = flooder.expect_close(timeout=5)
                ending = "no close frame" if closed is None else f"close {closed.close_code} {closed.close_reason!r}"
            except TimeoutError:
                closed, ending = None, "still open 5 s after the flood"
            probes.wait_rounds(3)  # past the end of the flood's processing, too
        finally:
            worst = probes.stop()
    summary = f"longest probe round trip {worst * 1000:.0f} ms (median before the flood {baseline * 1000:.1f} ms); flooder: {ending}"
    assert worst <= MOST_PROBE_LATENCY and closed is not None and closed.close_code == 1008, summary
    assert closed.close_reason == "frame rate limit exceeded", summary


# --- 3. Buffers shrink back --------------------------------------------------------------------

CONNECTIONS = 20
LARGE = MAX_SIZE - 4096  # "1 MiB minus a bit": within websockets-max-size
MOST_KEPT_PER_CONNECTION = 64 * 1024


def worker_pid(master_pid):
    [worker] = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return int(worker)


def rss_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_an_idle_connection_does_not_keep_the_buffers_of_its_largest_message(tmp_path, app):
    """Guards memory per idle connection: after a large message, a connection's read buffer
    and send buffer go back to a small size. Compared with the same 20 connections before
    their large messages, on a worker that already echoed one large message (so the heap's
    own high-water mark is in both measurements). Old behaviour: each connection kept both
    buffers at their peak, some 2 MiB per connection (about 40 MiB for 20)."""
    with running_app_process(app, tmp_path / "app.log", **ONE_WORKER) as (process, url):
        url = url.replace("http", "ws") + "/ws/echo"
        worker = worker_pid(process.pid)
        large = os.urandom(LARGE)
        with RawWebSocket(url) as warm_up:
            warm_up.send(BINARY, large)
            assert warm_up.recv_message(timeout=10).payload == large
        connections = [RawWebSocket(url) for _ in range(CONNECTIONS)]
        try:
            for ws in connections:
                assert_echoes(ws, 1, timeout=5)
            idle = rss_bytes(worker)
            for ws in connections:
                ws.send(BINARY, large)
                assert ws.recv_message(timeout=10).payload == large
                # The next echo shows the server is done with the large one.
                assert_echoes(ws, 1, timeout=5)
            after = rss_bytes(worker)
        finally:
            for ws in connections:
                ws.close()
    kept = after - idle
    assert kept <= CONNECTIONS * MOST_KEPT_PER_CONNECTION, (
        f"worker RSS grew by {kept / 1024:.0f} KiB ({kept / CONNECTIONS / 1024:.0f} KiB per idle connection) "
        f"from {idle / 1024:.0f} KiB")


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_frames_that_arrive_after_waits_with_nothing_buffered_are_read_whole(tmp_path, app):
    """Patch 0022 releases a connection's read buffer while it waits with nothing in it and
    allocates it again for the next read (the fuzz harness checks that the wait holds none).
    Here the bytes come in pieces, each after the server went back to waiting: a large
    fragmented message whose headers are cut, with a ping between its fragments cut too; the
    pong and the message come back whole, and the connection goes on echoing."""
    with running_app_process(app, tmp_path / "app.log", **ONE_WORKER) as (_process, url):
        with RawWebSocket(url.replace("http", "ws") + "/ws/echo") as ws:
            assert_echoes(ws, 1, timeout=5)
            large = os.urandom(300 * 1024)
            first, rest = encode_frame(BINARY, large[:100000], fin=False), encode_frame(CONT, large[100000:])
            ping = encode_frame(PING, b"after a wait")
            for piece in (first[:1], first[1:2], first[2:9], first[9:], ping[:3], ping[3:], rest[:5], rest[5:]):
                ws.send_raw(piece)
                time.sleep(0.05)  # not a timing check: lets the server read the piece and wait again
            pong = ws.recv_message(timeout=10, skip_pings=False)
            while pong.opcode == PING:  # one of the server's own keep-alive pings
                ws.send(PONG, pong.payload)
                pong = ws.recv_message(timeout=10, skip_pings=False)
            assert (pong.opcode, pong.payload) == (PONG, b"after a wait")
            echoed = ws.recv_message(timeout=10)
            assert (echoed.opcode, len(echoed.payload), echoed.payload == large) == (BINARY, len(large), True)
            assert_echoes(ws, 3, timeout=5)


# --- 5. Graceful stop with clients in every state ----------------------------------------------

STOP_MERCY = 5  # UWSGI_WORKER_RELOAD_MERCY, well below the socket-timeout of 30 s
BUSY_MESSAGE = 900 * 1024
BUSY_MESSAGES = 10


class BusyClient:
    """Sends BUSY_MESSAGES messages of BUSY_MESSAGE bytes (each its own content) from one
    thread and reads the echoes slowly from another, so that the server's echo keeps
    waiting on a full socket: writes are in progress whenever the stop comes."""

    def __init__(self, url, tag):
        self.ws = RawWebSocket(url)
        self.ws.sock.settimeout(STOP_MERCY + 10)
        self.messages = [bytes([tag]) * (BUSY_MESSAGE - 1) + bytes([0x30 + i]) for i in range(BUSY_MESSAGES)]
        self.sent = 0
        self.chunks = []  # (time of arrival, bytes)
        self.ended = threading.Event()
        threading.Thread(target=self._write, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def _write(self):
        try:
            for message in self.messages:
                self.ws.send(TEXT, message)
                self.sent += 1
        except OSError:
            pass  # the server closed: what it sent is read and checked below

    def _read(self):
        try:
            while True:
                chunk = self.ws.sock.recv(16384)
                if not chunk:
                    break
                self.chunks.append((time.monotonic(), chunk))
                time.sleep(0.004)  # pacing: some 4 MiB/s, slower than the server can write
        except OSError:
            pass
        finally:
            self.ended.set()

    def received(self):
        return sum(len(chunk) for _t, chunk in self.chunks)

    def frames(self):
        """Ends the connection; the frames received, parsed by rawws, each with the arrival
        time of its last byte."""
        try:  # not close(): rawws still sets the socket's timeout while parsing
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already reset by the server
        self.ended.wait(5)
        arrivals, data = [], b""
        for arrived, chunk in list(self.chunks):
            data += chunk
            arrivals.append((len(data), arrived))
        self.ws.buffer, parsed = data, []
        while self.ws.buffer:
            try:
                frame = self.ws.recv_frame(timeout=0.1)
            except (OSError, ConnectionError):
                parsed.append((None, None))  # a truncated frame at the end
                break
            end = len(data) - len(self.ws.buffer)
            parsed.append((frame, next(t for size, t in arrivals if size >= end)))
        return parsed


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_a_graceful_stop_closes_every_client_with_1001_even_with_one_socket_full(tmp_path, app):
    """Guards the stop (SIGTERM to the master, as make run and docker stop send it): every
    client gets a well-formed close 1001 within worker-reload-mercy, also those receiving a
    large echo at that moment (the close frame comes between frames, never inside one),
    while one client whose socket is full (it never reads) does not hold up the others.
    Old behaviour: the stop handler's close to the full socket blocked for socket-timeout
    (30 s), so the others got nothing before the mercy ran out and the master killed the
    worker; and a 1001 could land inside a data frame being written."""
    log = tmp_path / "uwsgi.log"
    process, url = start_app(app, log, UWSGI_WORKER_RELOAD_MERCY=str(STOP_MERCY), **ONE_WORKER)
    busy = []
    try:
        wait_healthy(process, url)
        url = url.replace("http", "ws") + "/ws/echo"
        full = RawWebSocket(url)  # first: a stop handler going through its clients in order meets it first
        stall(full)
        idle = [RawWebSocket(url) for _ in range(3)]
        for ws in idle:
            assert_echoes(ws, 1, timeout=5)
        busy = [BusyClient(url, tag) for tag in (ord("a"), ord("b"))]
        deadline = time.monotonic() + 10
        # Readiness: echoes are flowing to both and they have sent more than the server echoed.
        while not all(client.received() > BUSY_MESSAGE and client.sent >= 4 for client in busy):
            assert time.monotonic() < deadline, [(c.sent, c.received()) for c in busy]
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        problems = []
        for i, ws in enumerate(idle):
            try:
                frame = ws.expect_close(timeout=STOP_MERCY + 1 - (time.monotonic() - started))
            except TimeoutError:
                frame = None
            late = time.monotonic() - started
            if frame is None or frame.close_code != 1001 or late > STOP_MERCY:
                problems.append(f"idle client {i}: {frame and (frame.close_code, frame.close_reason)} after {late:.1f} s")
        for i, client in enumerate(busy):
            client.ended.wait(STOP_MERCY + 5 - (time.monotonic() - started))
            frames = client.frames()
            data = [frame for frame, _t in frames if frame is not None and frame.opcode in (TEXT, BINARY, CONT)]
            closes = [(frame, t - started) for frame, t in frames if frame is not None and frame.opcode == CLOSE]
            intact = all(f.opcode == TEXT and f.fin and f.payload == client.messages[n] for n, f in enumerate(data))
            # 1001 and the reason: a close frame written into the middle of a data frame.
            inside = any(b"\x03\xe9server shutting down" in f.payload for f in data)
            if not intact or not closes or closes[0][0].close_code != 1001 or closes[0][1] > STOP_MERCY:
                problems.append(f"busy client {i}: {client.received()} bytes, {len(data)} data frames (intact: {intact}, "
                                f"a 1001 inside one: {inside}), "
                                f"closes {[(f.close_code, round(late, 1)) for f, late in closes]}, "
                                f"truncated at the end: {frames[-1:] == [(None, None)]}")
        exited = True
        try:
            process.wait(timeout=STOP_MERCY + 3)
        except Exception:
            exited = False
        stopped_after = time.monotonic() - started
        assert not problems and exited, (problems, f"app exited: {exited} after {stopped_after:.1f} s")
    finally:
        for client in busy:
            client.ws.close()
        stop(process, signal.SIGKILL)  # a no-op when the stop under test worked


# --- 6. What uwsgi.websocket_close() lets onto the wire ---------------------------------------

@pytest.fixture(scope="module")
def close_app(tmp_path_factory):
    """tests/fixtures/close_app.py under the project's uwsgi-app ini; its ws:// URL."""
    log = tmp_path_factory.mktemp("close_app") / "uwsgi.log"
    fixture_args = ("--pythonpath", str(REPO / "tests" / "fixtures"), "--module", "close_app:application")
    with running_app_process("uwsgi-app", log, uwsgi_args=fixture_args) as (_process, url):
        yield url.replace("http", "ws") + "/ws/close"


def close_with(url, code, reason=""):
    """What the client gets when the app closes with (code, reason): the app's report (a
    text message) if the call raised, else None; and the close frame."""
    with RawWebSocket(url) as ws:
        ws.send(TEXT, json.dumps({"code": code, "reason": reason}).encode())
        frame = ws.recv_message(timeout=5)
        report = None
        if frame.opcode == TEXT:
            report = frame.payload.decode()
            frame = ws.recv_message(timeout=5)
        assert frame.opcode == CLOSE, frame
        try:
            ws.send(CLOSE, frame.payload[:2])
        except OSError:
            pass  # it did not wait for our answer: not what these tests are about
        return report, frame


NEVER_ON_THE_WIRE = [1004, 1005, 1006, 1015, 999, 1016, 2999, 5000, 65535, 66536, -1]


@pytest.mark.parametrize("code", NEVER_ON_THE_WIRE)
def test_websocket_close_refuses_a_code_that_must_not_be_sent(close_app, code):
    """RFC 6455 7.4: 1004 is reserved, 1005, 1006 and 1015 are only for reporting, codes
    below 1000 and 1016-2999 are not defined, and nothing above 4999 exists; 66536 and -1
    were cut to 16 bits (1000, 65535). Old behaviour: any code went out as it came, the
    client got the close frame with it (or its 16-bit wrap)."""
    report, frame = close_with(close_app, code)
    assert report is not None and report.startswith("ValueError"), f"sent close {frame.close_code} for {code}"
    assert frame.close_code == 1000


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 3000, 4999])
def test_websocket_close_sends_a_valid_code(close_app, code):
    """The counterpart: a code an application may send goes out unchanged, with its reason."""
    report, frame = close_with(close_app, code, "bye")
    assert report is None and (frame.close_code, frame.close_reason) == (code, "bye")


@pytest.mark.parametrize("reason", ["é" * 100, "€" * 67, "a" + "€" * 66, "ab" + "𝄞" * 50], ids=["2-byte", "3-byte", "offset 3-byte", "4-byte"])
def test_a_long_close_reason_is_cut_at_a_character_boundary(close_app, reason):
    """A control frame carries at most 125 bytes, so the reason at most 123; cut there, it
    must stay valid UTF-8 (RFC 6455 7.1.6), so the cut is at the last whole character.
    Old behaviour: cut at byte 123 whatever it was, mid-character for all but the 3-byte case
    (the client, a browser too, then fails the connection for invalid UTF-8)."""
    encoded = reason.encode()
    assert len(encoded) > 123
    report, frame = close_with(close_app, 1000, reason)
    sent = frame.payload[2:]
    assert report is None and frame.close_code == 1000, report
    assert len(sent) <= 123 and encoded.startswith(sent), f"{len(sent)} bytes: {sent!r}"
    try:
        sent.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssertionError(f"the reason on the wire is not UTF-8 ({exc}): {len(sent)} bytes ending {sent[-4:]!r}")
    assert len(sent) > 123 - len(reason[-1].encode()), f"cut shorter than needed: {len(sent)} bytes"
