"""RFC 6455 behaviour of both backends through nginx, and isolation from hostile clients.

The checks themselves live in common/wsstack/conformance.py, which is also the project's
`conformance` command (README); here each one is a test, for each backend.
"""
import os
from pathlib import Path

import pytest

from stack import ws_url
from wsstack import conformance
from wsstack.rawws import TEXT, RawWebSocket

MAX_SIZE = int(os.environ.get("UWSGI_WEBSOCKETS_MAX_SIZE", "1024")) * 1024
HOSTILE = [(name, func) for name, _rfc, func in conformance.CHECKS if name.endswith(("_1002", "_1007", "_1009"))]


@pytest.mark.parametrize("name, func", [(n, f) for n, _r, f in conformance.CHECKS], ids=[n for n, _r, _f in conformance.CHECKS])
def test_rfc6455(backend, name, func):
    passed, detail = conformance.run_check(func, ws_url(backend), MAX_SIZE)
    assert passed, detail


def uwsgi_processes(app):
    """PIDs of the local stack's uWSGI processes for `app` (master and workers)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{app}/uwsgi.ini".encode() in b" ".join(cmdline) and any(e.startswith(b"STACK_INSTANCE_ID=") for e in environ):
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
