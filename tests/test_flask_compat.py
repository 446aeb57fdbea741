"""Each part of flask-app/uwsgi_websocket_compat.py is needed: without it, the upstream failure returns."""
import contextlib
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
from websockets.sync.client import connect

from repo import REPO, VENV_BIN, free_port, run_python
from wsstack.rawws import BINARY, TEXT, RawWebSocket

pytestmark = pytest.mark.local

IMPORT_STEPS = textwrap.dedent(
    """
    import json, sys
    import flask.app
    import uwsgi_websocket_compat as compat      # every fix applied: imports fine

    def attempt(**kwargs):
        for name in [m for m in sys.modules if m.startswith("flask_uwsgi_websocket")]:
            del sys.modules[name]                 # also forgets fix 2's placeholder entry
        if hasattr(flask.app, "setupmethod"):
            del flask.app.setupmethod             # undo fix 1
        try:
            compat.import_package(**kwargs)
            return "ok"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    print(json.dumps({
        "without any fix": attempt(skip=("FLASK3_SETUPMETHOD", "PY311_ASYNCIO")),
        "without PY311_ASYNCIO": attempt(skip=("PY311_ASYNCIO",)),
        "without FLASK3_SETUPMETHOD": attempt(skip=("FLASK3_SETUPMETHOD",)),
        "with both": attempt(),
    }))
    """
)


def test_import_fixes_are_each_needed():
    result = run_python(IMPORT_STEPS, "flask-app", "common")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert "cannot import name 'setupmethod' from 'flask.app'" in outcome["without any fix"]
    assert "cannot import name 'setupmethod'" in outcome["without FLASK3_SETUPMETHOD"]
    assert outcome["without PY311_ASYNCIO"].startswith("AttributeError") and "coroutine" in outcome["without PY311_ASYNCIO"]
    assert outcome["with both"] == "ok"


ROUTING = textwrap.dedent(
    """
    import json
    from flask import Flask
    from werkzeug.test import EnvironBuilder
    import uwsgi_websocket_compat as compat

    upgrade = EnvironBuilder(path="/ws/echo", headers={"Upgrade": "websocket", "Connection": "Upgrade"}).get_environ()
    plain = EnvironBuilder(path="/ws/echo").get_environ()
    result = {}
    for label, cls in (("stock", compat.flask_uwsgi_websocket.GeventWebSocket), ("compat", compat.GeventWebSocket)):
        ws = cls(Flask(label))
        ws.route("/ws/echo")(lambda client: None)
        for kind, environ in (("upgrade", upgrade), ("plain", plain)):
            try:
                ws.url_map.bind_to_environ(environ).match()
                result[f"{label} {kind}"] = "match"
            except Exception as exc:
                result[f"{label} {kind}"] = type(exc).__name__
    print(json.dumps(result))
    """
)


def test_websocket_rules_fix_is_needed_for_routing():
    result = run_python(ROUTING, "flask-app", "common")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        # Werkzeug >= 2 refuses a WebSocket request on a plain Rule: the package 404s every route.
        "stock upgrade": "WebsocketMismatch",
        "stock plain": "match",
        # Fixed: the upgrade matches; a plain GET mismatches, which the middleware turns into 426.
        "compat upgrade": "match",
        "compat plain": "WebsocketMismatch",
    }


FixtureApp = namedtuple("FixtureApp", "url pid")


@pytest.fixture
def fixture_app(request):
    """uWSGI running tests/fixtures/flask_echo_app.py with the shared ini, one worker, pinging
    every second unless the parameter (fix, "0" or "1"[, settings]) says otherwise."""
    port = free_port()
    fix, enabled, *settings = request.param
    env = dict(
        os.environ,
        UWSGI_HTTP_SOCKET=f"127.0.0.1:{port}",
        UWSGI_PROCESSES="1",
        UWSGI_WEBSOCKETS_PING_FREQ="1",
        UWSGI_WORKER_RELOAD_MERCY="1",
    )
    env.update({f"COMPAT_FIX_{fix}": enabled}, **(settings[0] if settings else {}))
    process = subprocess.Popen(
        [str(VENV_BIN / "uwsgi"), "--ini", str(REPO / "common" / "uwsgi-base.ini"),
         "--pythonpath", str(REPO / "flask-app"), "--pythonpath", str(REPO / "tests" / "fixtures"),
         "--module", "flask_echo_app:app"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"ws://127.0.0.1:{port}/ws/echo"
    deadline = time.monotonic() + 30
    while True:  # readiness: the first successful handshake
        try:
            with connect(url, open_timeout=1):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.1)
    yield FixtureApp(url, process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def received_within(url, seconds):
    """Echo one message, then collect whatever else arrives in `seconds` while idle."""
    with connect(url, ping_interval=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        extra = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                extra.append(ws.recv(timeout=left))
            except TimeoutError:
                break
        return extra


@pytest.mark.parametrize("fixture_app", [("GEVENT_EMPTY_MESSAGES", "0")], indirect=True)
def test_without_the_middleware_fix_empty_messages_reach_the_client(fixture_app):
    extra = received_within(fixture_app.url, 3)
    assert extra and set(extra) <= {""}, extra  # upstream issue #39, reproduced


@pytest.mark.parametrize("fixture_app", [("GEVENT_EMPTY_MESSAGES", "1")], indirect=True)
def test_with_the_middleware_fix_nothing_else_arrives(fixture_app):
    assert received_within(fixture_app.url, 3) == []


def echoed_opcode(url):
    with RawWebSocket(url) as ws:
        ws.send(BINARY, bytes(range(256)))
        frame = ws.recv_message(timeout=5)
        assert frame.payload == bytes(range(256))
        return frame.opcode


@pytest.mark.parametrize("fixture_app", [("BINARY_FRAMES", "0")], indirect=True)
def test_without_the_binary_fix_binary_comes_back_as_text(fixture_app):
    assert echoed_opcode(fixture_app.url) == TEXT


@pytest.mark.parametrize("fixture_app", [("BINARY_FRAMES", "1")], indirect=True)
def test_with_the_binary_fix_binary_stays_binary(fixture_app):
    assert echoed_opcode(fixture_app.url) == BINARY


def worker_wakeups(master_pid):
    """Times the app's worker has gone to sleep and woken up (voluntary context switches)."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    [worker] = children
    status = Path(f"/proc/{worker}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))


def wakeups_while_idle(app, connections=20, seconds=6):
    with contextlib.ExitStack() as stack:
        for _ in range(connections):
            ws = stack.enter_context(connect(app.url, ping_interval=None))
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
        time.sleep(0.5)  # let the handshakes' work finish
        before = worker_wakeups(app.pid)
        time.sleep(seconds)
        return worker_wakeups(app.pid) - before


QUIET = {"UWSGI_WEBSOCKETS_PING_FREQ": "60"}  # no ping due during the test


@pytest.mark.parametrize("fixture_app", [("GEVENT_EMPTY_MESSAGES", "0", QUIET)], indirect=True)
def test_without_the_middleware_fix_idle_connections_wake_the_worker(fixture_app):
    # The package's listener greenlet gives up its select() every `timeout` (5) seconds and
    # reads the socket, whether or not anything arrived.
    assert wakeups_while_idle(fixture_app) >= 1


@pytest.mark.parametrize("fixture_app", [("GEVENT_EMPTY_MESSAGES", "1", QUIET)], indirect=True)
def test_with_the_middleware_fix_idle_connections_let_the_worker_sleep(fixture_app):
    assert wakeups_while_idle(fixture_app) == 0


@pytest.mark.parametrize("fixture_app", [("GEVENT_EMPTY_MESSAGES", "1")], indirect=True)
def test_a_failing_view_closes_its_connection_with_1011(fixture_app):
    with RawWebSocket(fixture_app.url.replace("/ws/echo", "/ws/fail")) as ws:
        ws.send(TEXT, b"trigger")
        frame = ws.expect_close(timeout=5)
    assert frame is not None and frame.close_code == 1011, frame
    # The worker lives on.
    assert echoed_opcode(fixture_app.url) == BINARY


ONE_CALL_AT_A_TIME = textwrap.dedent(
    """
    import json, socket, types
    import gevent, gevent.event

    # A uWSGI stand-in whose send blocks on b"slow", as a write to a full socket does: the
    # compat layer's calls for one connection must then queue behind it, one at a time.
    uwsgi = types.ModuleType("uwsgi")
    log, inside, unblock = [], [], gevent.event.Event()

    def send(message):
        inside.append(message)
        if len(inside) > 1:
            log.append(f"interleaved {inside}")
        if message == b"slow":
            unblock.wait()
        log.append(message.decode())
        inside.remove(message)

    uwsgi.websocket_send = uwsgi.websocket_send_binary = send
    import uwsgi_websocket_compat as compat   # outside uWSGI: the metrics count locally
    compat.uwsgi, compat._try_recv = uwsgi, lambda: None

    ours, theirs = socket.socketpair()
    state = {}

    flushed = gevent.event.Event()

    def view():
        gevent.getcurrent().uwsgi_wsgi_req = 1
        state["client"] = client = compat.GeventClient({}, ours.fileno(), 5)
        client.send(b"slow")          # the view's own send: blocks until unblock is set
        flushed.wait()                # no call of its own until the survivor's flush is done
        client.send(b"after")
        client._finish()

    def forwarder(text):
        client = state["client"]
        client.send(text.encode())    # queued (not the view's greenlet), then written here:
        client.flush()                # waits for the view's blocked send to end
        flushed.set()

    view_greenlet = gevent.spawn(view)
    gevent.sleep(0.01)
    doomed, survivor = gevent.spawn(forwarder, "a"), gevent.spawn(forwarder, "b")
    gevent.sleep(0.01)
    doomed.kill()                     # killed while waiting for the socket (a chat forwarder's end)
    unblock.set()
    finished = gevent.joinall([view_greenlet, survivor], timeout=5)
    print(json.dumps({"log": log, "finished": len(finished)}))
    """
)


def test_one_uwsgi_call_at_a_time_and_a_killed_waiter_blocks_nobody():
    # Sends from other greenlets wait while the view's send is blocked, and none interleaves
    # with it; one of them killed while waiting must not keep the others waiting: the compat
    # layer's own queue of waiters (no Semaphore per idle connection) wakes them all to retry.
    result = run_python(ONE_CALL_AT_A_TIME, "flask-app", "common")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["finished"] == 2, outcome
    # the killed forwarder's queued b"a" goes out with b"b": queued sends are the connection's
    assert outcome["log"] == ["slow", "a", "b", "after"], outcome


KEEPALIVE_IN_THE_EVENT_LOOP = textwrap.dedent(
    """
    import json, socket, sys, time, types
    import gevent

    # A uWSGI stand-in for patches 0032 and 0033: the event loop's pong taking and ping writing
    # say whether they dealt with the wake-up themselves (`handled`).
    uwsgi = types.ModuleType("uwsgi")
    uwsgi.websocket_opcode = lambda: 1  # what the message was: text
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    handled, calls, reads, sent = [True], [], [], []

    def in_the_event_loop(name):
        def call():
            # the hub, carrying the view's request for the call (uWSGI finds it there)
            current = gevent.getcurrent()
            calls.append((name, current is gevent.get_hub(), getattr(current, "uwsgi_wsgi_req", None)))
            if name == "absorb":
                ours.recv(100)  # what uWSGI's read takes off the socket
            return handled[0]
        return call

    def try_recv():
        reads.append(1)
        return b"message" if sent else None

    import uwsgi_websocket_compat as compat   # outside uWSGI: the metrics count locally
    compat.uwsgi, compat._try_recv = uwsgi, try_recv
    sys.modules["uwsgi"] = uwsgi  # after the import: metrics counts locally without one
    compat._absorb_pongs, compat._ping_nowait = in_the_event_loop("absorb"), in_the_event_loop("ping")
    state = {}

    def view():
        gevent.getcurrent().uwsgi_wsgi_req = 7
        state["client"] = client = compat.GeventClient({}, ours.fileno(), 5)
        state["received"] = client.recv()

    def settle():
        gevent.sleep(0.05)
        return len(reads)

    view_greenlet = gevent.spawn(view)
    at_start = settle()                       # the view read once, found nothing and waits
    theirs.send(b"a pong")                    # taken in the event loop: the view sleeps on
    after_pong = settle()
    hub, later = gevent.get_hub(), int(time.time()) + 1000   # refiled far off: the real sweep stays out
    hub.loop.run_callback(state["client"]._ping_due, later)   # the sweep: the ping is written there
    after_ping = settle()
    handled[0] = False
    hub.loop.run_callback(state["client"]._ping_due, later)   # could not be: the view pings
    after_refused_ping = settle()
    sent.append(1)
    theirs.send(b"a message")                 # not just pongs: the view reads
    view_greenlet.join(5)
    state["client"]._finish()
    print(json.dumps({"reads": [at_start, after_pong, after_ping, after_refused_ping], "calls": calls,
                      "received": state.get("received", b"").decode()}))
    """
)


def test_pongs_and_pings_the_event_loop_deals_with_leave_the_waiting_view_asleep():
    # uWSGI takes the pong (patch 0032) and writes the ping (0033) from the event loop for the
    # compat layer's watcher and sweep; only what they could not deal with wakes the view.
    result = run_python(KEEPALIVE_IN_THE_EVENT_LOOP, "flask-app", "common")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["reads"][:3] == [1, 1, 1], outcome  # neither the pong nor the ping woke it
    assert outcome["reads"][3] == 2, outcome  # the refused ping did
    assert outcome["received"] == "message", outcome
    # each call from the hub, with the view's request
    assert [name for name, *_ in outcome["calls"]] == ["absorb", "ping", "ping", "absorb"], outcome
    assert all(in_hub and request == 7 for _, in_hub, request in outcome["calls"]), outcome
