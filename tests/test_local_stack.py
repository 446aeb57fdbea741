"""`make run`'s process runner and the apps' start-up checks (local mode only)."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from local_processes import start_app, wait_healthy
from repo import REPO, VENV_BIN, free_port, free_ports, load_stack_module

pytestmark = pytest.mark.local

APPS = ["uwsgi-app", "flask-app"]


def stack_env(tmp_path, **overrides):
    env = dict(os.environ)
    names = load_stack_module().PORT_SETTINGS
    env.update(zip(names, map(str, free_ports(len(names)))))
    env.update(LOCAL_RUN_DIR=str(tmp_path / "run"), UWSGI_WORKER_RELOAD_MERCY="3")
    env.update(overrides)
    return env


def processes_of(instance_id):
    """PIDs of every process whose environment carries this stack instance's id."""
    marker = f"STACK_INSTANCE_ID={instance_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # exited meanwhile, or a kernel thread
                pass
    return found


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"NGINX_PROXY_READ_TIMEOUT": "10s", "UWSGI_WEBSOCKETS_PING_FREQ": "20"}, "must exceed UWSGI_WEBSOCKETS_PING_FREQ"),
        ({"NGINX_PROXY_READ_TIMEOUT": "soon"}, "not an nginx time"),
        ({"NGINX_PORT": "80a"}, "NGINX_PORT='80a' is not a port number"),
        ({"NGINX_STATUS_PORT": "status"}, "NGINX_STATUS_PORT='status' is not a port number"),
        ({"NGINX_HOST": "192.0.2.1"}, "NGINX_HOST must be a loopback address"),
        ({"LOCAL_STOP_TIMEOUT": "0"}, "LOCAL_STOP_TIMEOUT='0' must be a whole number"),
        ({"NGINX_RESOLVER_VALID": "500ms"}, "NGINX_RESOLVER_VALID must be at least 1s"),
        ({"NGINX_RESOLVER_VALID": "often"}, "NGINX_RESOLVER_VALID='often' is not an nginx time"),
        ({"LOCAL_DNS_PORT": "70000"}, "LOCAL_DNS_PORT='70000' is not a port number"),
    ],
)
def test_invalid_settings_fail_fast_with_a_clear_message(tmp_path, overrides, message):
    run_stack_expecting_failure(tmp_path, overrides, message)


def test_a_port_already_in_use_is_refused_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        run_stack_expecting_failure(tmp_path, {"LOCAL_REDIS_PORT": str(port)}, f"LOCAL_REDIS_PORT={port} is already in use")


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx drops its workers to nobody only when started as root")
def test_a_demo_page_nginx_workers_cannot_reach_is_refused_with_the_reason():
    """Started as root, nginx serves the page from workers running as nobody: a checkout in a
    folder only its owner may enter (/root, `mktemp -d`) answered 404 to every page before."""
    import tempfile

    stack = load_stack_module()
    # not pytest's tmp_path: its folders are private themselves
    with tempfile.TemporaryDirectory() as base:
        Path(base).chmod(0o755)
        check_page_access_refusals(stack, Path(base))


def check_page_access_refusals(stack, tmp_path):
    root = tmp_path / "private" / "html"
    root.mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html>")
    (tmp_path / "private").chmod(0o700)
    with pytest.raises(SystemExit, match=r"cannot enter .*private \(mode 700\).*chmod o\+x"):
        stack.check_nginx_workers_can_read(root)
    (tmp_path / "private").chmod(0o755)
    (root / "index.html").chmod(0o600)
    with pytest.raises(SystemExit, match=r"cannot read .*index.html"):
        stack.check_nginx_workers_can_read(root)
    (root / "index.html").chmod(0o644)
    stack.check_nginx_workers_can_read(root)  # readable: no complaint


def test_a_dns_port_taken_on_udp_only_is_refused(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_dns:
        other_dns.bind(("127.0.0.1", 0))
        port = other_dns.getsockname()[1]
        run_stack_expecting_failure(tmp_path, {"LOCAL_DNS_PORT": str(port)}, f"LOCAL_DNS_PORT={port} is already in use")


def run_stack_expecting_failure(tmp_path, overrides, message):
    runner = subprocess.Popen([sys.executable, str(REPO / "scripts" / "stack.py")], env=stack_env(tmp_path, **overrides),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = runner.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # It started instead of refusing: stop it the way that stops its services too
        # (killing only the runner would leave them running, in sessions of their own).
        runner.send_signal(signal.SIGTERM)
        runner.communicate(timeout=60)
        raise AssertionError(f"the stack did not refuse {overrides}")
    assert runner.returncode != 0
    assert message in stderr
    assert "ready" not in stdout


def eventfds(pid):
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:[eventfd]":
                found.append(fd.name)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("variable, value", [
    ("UWSGI_PROCESSES", "two"), ("UWSGI_WEBSOCKETS_PING_FREQ", "0"), ("UWSGI_HTTP_SOCKET", "8000"),
    ("METRICS_HTTP_SOCKET", "9000"), ("UWSGI_STATS", "127.0.0.1:stats"),
])
def test_app_refuses_to_start_with_an_invalid_uwsgi_setting(variable, value):
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"127.0.0.1:{free_port()}")
    env[variable] = value
    result = subprocess.run(
        [str(VENV_BIN / "uwsgi"), "--ini", str(REPO / "uwsgi-app" / "uwsgi.ini")],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert f"startup check failed: {variable}" in result.stdout + result.stderr


# What the kubelet injects for the Service uwsgi-app when a pod keeps its service links.
SERVICE_LINKS = {"UWSGI_APP_SERVICE_HOST": "10.96.0.5", "UWSGI_APP_SERVICE_PORT": "8000",
                 "UWSGI_APP_SERVICE_PORT_HTTP": "8000", "UWSGI_APP_PORT": "tcp://10.96.0.5:8000",
                 "UWSGI_APP_PORT_8000_TCP": "tcp://10.96.0.5:8000", "UWSGI_APP_PORT_8000_TCP_PROTO": "tcp",
                 "UWSGI_APP_PORT_8000_TCP_PORT": "8000", "UWSGI_APP_PORT_8000_TCP_ADDR": "10.96.0.5"}


@pytest.mark.parametrize("app", APPS)
def test_app_names_kubernetes_service_links_instead_of_a_terse_strict_mode_error(app):
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"127.0.0.1:{free_port()}", **SERVICE_LINKS)
    result = subprocess.run([str(VENV_BIN / "uwsgi"), "--ini", str(REPO / app / "uwsgi.ini")],
                            env=env, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for name in SERVICE_LINKS:
        assert (f"{name}: not a uWSGI option; it looks like a Kubernetes service link variable of the Service "
                "'uwsgi-app'. Set enableServiceLinks: false in the pod spec") in output, name
    # It speaks before uWSGI does: the check's message comes first, strict mode's line after it.
    assert output.index("startup check failed") < output.index("[strict-mode] unknown config directive")


def test_app_names_a_misspelt_uwsgi_variable_and_accepts_real_options():
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"127.0.0.1:{free_port()}", UWSGI_PROCESES="2")
    result = subprocess.run([str(VENV_BIN / "uwsgi"), "--ini", str(REPO / "uwsgi-app" / "uwsgi.ini")],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert ("UWSGI_PROCESES: not a uWSGI option (uWSGI reads every UWSGI_* variable as the option 'proceses'); "
            "unset or rename it") in result.stdout + result.stderr


def test_option_name_check_passes_real_options_and_uwsgis_internal_variables(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "common"))
    from wsstack import startup_check

    options = startup_check.known_options(str(VENV_BIN / "uwsgi"))
    # The patched build's own options are listed, as are the plugins' (gevent).
    assert {"websockets-frame-rate", "gevent-early-monkey-patch", "http-socket", "stats"} <= options
    startup_check.check_option_names({"UWSGI_PROCESSES": "2", "UWSGI_GEVENT_EARLY_MONKEY_PATCH": "1",
                                      "UWSGI_RELOADS": "3", "PATH": "/bin"}, options)
    with pytest.raises(startup_check.StartupError, match="UWSGI_NGINX_PORT: not a uWSGI option; it looks like"):
        startup_check.check_option_names({"UWSGI_NGINX_PORT": "tcp://10.0.0.1:80"}, options)


@pytest.mark.parametrize("app", APPS)
def test_graceful_stop_closes_open_websockets_with_1001(tmp_path, app, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "common"))
    from wsstack.rawws import CLOSE, TEXT, RawWebSocket

    process, url = start_app(app, tmp_path / "uwsgi.log", UWSGI_WORKER_RELOAD_MERCY="30")
    try:
        wait_healthy(process, url)
        clients = [RawWebSocket(url.replace("http", "ws") + "/ws/echo") for _ in range(6)]  # on both workers
        for ws in clients:
            ws.send(TEXT, b"hello")
            assert ws.recv_message(timeout=5).payload == b"hello"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for ws in clients:
            frame = ws.expect_close(timeout=5)
            assert frame is not None and (frame.close_code, frame.close_reason) == (1001, "server shutting down")
            ws.send(CLOSE, frame.payload[:2])  # as a browser does
        process.wait(timeout=15)
        # Well within the 30 s mercy: the workers did not wait for it to run out.
        assert time.monotonic() - started < 5
        assert "Brutally killing" not in (tmp_path / "uwsgi.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_app_refuses_to_start_with_malformed_allowed_origins():
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"127.0.0.1:{free_port()}", ALLOWED_ORIGINS="ftp://files.example")
    result = subprocess.run(
        [str(VENV_BIN / "uwsgi"), "--ini", str(REPO / "uwsgi-app" / "uwsgi.ini")],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "ALLOWED_ORIGINS: 'ftp://files.example' is not an origin" in result.stdout + result.stderr


def fake_uwsgi(tmp_path, output):
    """A stand-in uwsgi binary that prints `output` whatever it is asked (--cflags, --version)."""
    fake = tmp_path / "uwsgi"
    fake.write_text(f"#!/bin/sh\necho '{output}'\n")
    fake.chmod(0o755)
    return str(fake)


def test_ssl_check_rejects_a_uwsgi_built_without_ssl(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "common"))
    from wsstack import startup_check

    fake = fake_uwsgi(tmp_path, "-O2 -DUWSGI_HAS_IFADDRS -DUWSGI_ZLIB")
    with pytest.raises(startup_check.StartupError, match="built without SSL"):
        startup_check.require_ssl(fake)
    startup_check.require_ssl(str(VENV_BIN / "uwsgi"))  # the bootstrap's build passes


def test_patch_check_rejects_a_stock_uwsgi(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "common"))
    from wsstack import startup_check

    stock = fake_uwsgi(tmp_path, "2.0.31")
    with pytest.raises(startup_check.StartupError, match="without the project's WebSocket patches"):
        startup_check.require_patches(stock, {})
    assert "STOCK" in startup_check.require_patches(stock, {"WSSTACK_ALLOW_STOCK_UWSGI": "1"})
    assert startup_check.require_patches(str(VENV_BIN / "uwsgi"), {}) == "with the project's patches"


@pytest.mark.parametrize("app", APPS)
def test_sigterm_stops_the_app_gracefully_and_promptly(tmp_path, app):
    log_path = tmp_path / "uwsgi.log"
    process, url = start_app(app, log_path)
    try:
        wait_healthy(process, url)
        log = log_path.read_text()
        # The start-up check ran inside uWSGI (exec-asap) against this very binary.
        assert (f"startup check passed: settings valid, {VENV_BIN / 'uwsgi'} built with SSL, "
                "with the project's patches") in log
        for _ in range(4):  # reach both workers
            urllib.request.urlopen(url + "/healthz", timeout=5).read()
        # No gevent loop may exist in the master before the fork: its wake-up eventfd would be
        # shared by all workers, and a stop signal could wake the wrong one (the stop then hangs).
        assert eventfds(process.pid) == []
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        assert time.monotonic() - started < 5  # idle workers: no need to use the 5 s mercy
        log = log_path.read_text()
        assert "graceful shutdown triggered" in log
        assert log.count("Gracefully killing worker") == 2
        assert "Brutally killing" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_stack_until_ready(env):
    """`make run`'s runner with its output on a pipe; returns it, its instance id and the
    output up to the ready line, once the ready line came."""
    runner = subprocess.Popen([sys.executable, str(REPO / "scripts" / "stack.py")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in runner.stdout:
        output.append(line)
        if line.startswith("stack: ready"):
            break
    ready = re.search(r"instance (\w+)", output[-1]) if output else None
    if not ready:
        runner.kill()
        runner.wait()
        raise AssertionError("".join(output))
    return runner, ready.group(1), output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_stopping_make_run_leaves_no_process_behind(tmp_path, signum):
    env = stack_env(tmp_path)
    runner, instance_id, output = start_stack_until_ready(env)
    try:
        assert len(processes_of(instance_id)) >= 6  # redis, 2 x (uWSGI master + workers), nginx master + workers

        # Open WebSockets through nginx get the apps' close 1001 (the apps stop before nginx)
        # and keep nothing alive after the stop.
        with contextlib.ExitStack() as open_clients:
            clients = [open_clients.enter_context(connect(f"ws://127.0.0.1:{env['NGINX_PORT']}/{backend}/ws/echo",
                                                          ping_interval=None))
                       for backend in ("uwsgi", "flask")]
            for ws in clients:
                ws.send("still here")
                assert ws.recv(timeout=5) == "still here"
            started = time.monotonic()
            runner.send_signal(signum)
            for ws in clients:
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        rest, _ = runner.communicate(timeout=60)
        output.append(rest)
        assert runner.returncode == 0, "".join(output)
        assert "stack: stopped" in rest
        assert time.monotonic() - started < 45
        assert processes_of(instance_id) == []
    finally:
        if runner.poll() is None:
            runner.kill()


def test_a_stack_whose_output_reader_died_still_stops_everything(tmp_path):
    # As when the program that started `make run` (a benchmark, a CI step) dies: our stdout is
    # a pipe nobody reads any more. Writing to it fails; the stop must go on regardless.
    runner, instance_id, _output = start_stack_until_ready(stack_env(tmp_path))
    try:
        runner.stdout.close()
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        assert processes_of(instance_id) == []
    finally:
        if runner.poll() is None:
            runner.kill()
