"""RFC 6455 behaviour of both backends through nginx, and isolation from hostile clients.

The checks themselves live in common/wsstack/conformance.py, which is also the project's
`conformance` command (docs/upstream-defects.md); here each one is a test, for each backend.
"""
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo import REPO
from stack import ws_url
from wsstack import conformance
from wsstack.rawws import CLOSE, PING, PONG, TEXT, RawWebSocket

MAX_SIZE = int(os.environ.get("UWSGI_WEBSOCKETS_MAX_SIZE", "1024")) * 1024
HOSTILE = [(name, func) for name, _rfc, func in conformance.CHECKS if name.endswith(("_1002", "_1007", "_1009"))]


@pytest.mark.parametrize("name, func", [(n, f) for n, _r, f in conformance.CHECKS], ids=[n for n, _r, _f in conformance.CHECKS])
def test_rfc6455(backend, name, func):
    passed, detail = conformance.run_check(func, ws_url(backend), MAX_SIZE)
    assert passed, detail


def uwsgi_processes(app):
    """PIDs of the local stack's uWSGI processes for `app` (master and workers).

    Only this checkout's: stacks of other checkouts may run on the same machine, and their
    workers coming and going must not count here.
    """
    ini = str(REPO / app / "uwsgi.ini").encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ini in cmdline and any(e.startswith(b"STACK_INSTANCE_ID=") for e in environ):
            found.add(int(proc.name))
    return found


@pytest.mark.local
def test_hostile_input_never_crashes_a_worker_or_disturbs_other_connections(backend):
    app = f"{backend}-app"
    before = uwsgi_processes(app)
    assert len(before) >= 3  # master and two workers
    bystanders = [RawWebSocket(ws_url(backend)) for _ in range(8)]  # on both workers
    try:
        for name, func in HOSTILE:
            passed, detail = conformance.run_check(func, ws_url(backend), MAX_SIZE)
            assert passed, f"{name}: {detail}"
        for i, ws in enumerate(bystanders):
            ws.send(TEXT, f"still here {i}".encode())
            frame = ws.recv_message(timeout=5)
            assert frame.payload == f"still here {i}".encode()
    finally:
        for ws in bystanders:
            ws.close()
    assert uwsgi_processes(app) == before


# --- Lifecycle: a worker killed outright, nginx reloaded -------------------------------------

def parent_pid(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def echo_once(backend, text):
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send(TEXT, text.encode())
        return ws.recv_message(timeout=5).payload.decode()


@pytest.mark.local
def test_a_killed_worker_is_respawned_and_new_connections_succeed_at_once(backend):
    processes = uwsgi_processes(f"{backend}-app")
    workers = sorted(pid for pid in processes if parent_pid(pid) in processes)
    os.kill(workers[0], signal.SIGKILL)
    # At once: the other worker takes new connections while the master respawns this one.
    assert [echo_once(backend, f"after kill {i}") for i in range(10)] == [f"after kill {i}" for i in range(10)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = uwsgi_processes(f"{backend}-app")
        if len(now) == len(processes) and workers[0] not in now:
            break
        time.sleep(0.1)
    assert len(now) == len(processes) and workers[0] not in now, "the killed worker was not respawned"


def nginx_master():
    # nginx rewrites its process title over its environment, so the pid file tells.
    run_dir = Path(os.environ.get("LOCAL_RUN_DIR", Path(__file__).resolve().parent.parent / ".run"))
    return int((run_dir / "nginx" / "nginx.pid").read_text())


@pytest.mark.local
def test_an_nginx_reload_keeps_open_websockets(backend):
    with RawWebSocket(ws_url(backend)) as ws:
        ws.send(TEXT, b"before reload")
        assert ws.recv_message(timeout=5).payload == b"before reload"
        master = nginx_master()
        old_workers = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                       if pid != master and Path(f"/proc/{pid}/stat").exists() and parent_pid(pid) == master}
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # new workers up: the reload happened
            current = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                       if Path(f"/proc/{pid}/stat").exists() and parent_pid(pid) == master}
            if current - old_workers:
                break
            time.sleep(0.1)
        assert current - old_workers, "nginx did not start new workers"
        # The connection opened before the reload still works (until worker_shutdown_timeout)...
        ws.send(TEXT, b"after reload")
        assert ws.recv_message(timeout=5).payload == b"after reload"
    # ...and new connections go to the new workers.
    assert echo_once(backend, "new connection") == "new connection"


# --- Fuzz: random frame sequences, bounded in count and time --------------------------------

VALID_CLOSE_CODES = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
frames = st.lists(
    st.builds(
        dict,
        opcode=st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB, 0xF]),
        payload=st.one_of(st.binary(max_size=200), st.text(max_size=60).map(str.encode)),
        fin=st.booleans(),
        rsv=st.sampled_from([0, 0, 0, 0, 1, 4]),
        mask=st.sampled_from([True, True, True, False]),
    ),
    min_size=1, max_size=6,
)


@pytest.mark.local
def test_fuzzed_frames_get_a_well_formed_answer_and_never_crash_a_worker(backend):
    before = uwsgi_processes(f"{backend}-app")

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(sequence=frames)
    def run(sequence):
        with RawWebSocket(ws_url(backend)) as ws:
            try:
                for frame in sequence:
                    ws.send(frame["opcode"], frame["payload"], fin=frame["fin"], rsv=frame["rsv"], mask=frame["mask"])
                ws.send(PING, b"probe")
            except OSError:
                pass  # the server already closed: its close frame must be waiting below
            try:
                while True:
                    answer = ws.recv_frame(timeout=5)
                    if answer.opcode == PONG and answer.payload == b"probe":
                        return  # still a healthy connection
                    if answer.opcode == CLOSE:
                        assert answer.close_code in VALID_CLOSE_CODES or answer.payload == b"", answer
                        return
            except ConnectionError:
                pytest.fail(f"connection dropped without a close frame after {sequence!r}")

    run()
    assert uwsgi_processes(f"{backend}-app") == before


# --- Message-rate limit per connection ---------------------------------------------------------

BURST = int(os.environ.get("WS_MESSAGE_BURST", "200"))


def test_a_connection_flooding_messages_is_closed_with_1008_and_others_are_unaffected(backend):
    with RawWebSocket(ws_url(backend)) as bystander, RawWebSocket(ws_url(backend)) as flood:
        for i in range(BURST * 2):
            try:
                flood.send(TEXT, f"{i}".encode())
            except OSError:
                break  # closed on us mid-flood: the close frame is read below
        echoed = 0
        while True:
            frame = flood.recv_message(timeout=10)
            if frame.opcode == CLOSE:
                break
            echoed += 1
        assert frame.close_code == 1008 and frame.close_reason == "message rate limit exceeded"
        assert BURST <= echoed < BURST * 2  # the burst went through, the flood did not
        bystander.send(TEXT, b"unaffected")
        assert bystander.recv_message(timeout=5).payload == b"unaffected"
