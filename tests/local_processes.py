"""Start an app or an nginx of the project's own, outside the running stack (local tests).

Tests that need settings the shared stack cannot have (one worker, tiny limits, short
timeouts) start their own processes from the same config files, on free loopback ports.
"""
import contextlib
import http.client
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from repo import REPO, VENV_BIN, free_port, render_nginx


def start_app(app, log_path, host="127.0.0.1", port=None, uwsgi_args=(), **env_overrides):
    """An app instance on HOST:PORT (a free port by default); returns (uWSGI master, base URL).

    `uwsgi_args` follow the app's ini on the command line, so they override it (a test
    fixture's --module, for instance).
    """
    port = port or free_port()
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"{host}:{port}", UWSGI_WORKER_RELOAD_MERCY="5")
    env.update(env_overrides)
    log = open(log_path, "w")
    process = subprocess.Popen(
        [str(VENV_BIN / "uwsgi"), "--ini", str(REPO / app / "uwsgi.ini"), *uwsgi_args],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    return process, f"http://{host}:{port}"


def wait_healthy(process, url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited during start-up"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not healthy after {timeout}s")


def stop(process, sig=signal.SIGTERM, timeout=15):
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_app(app, log_path, **env_overrides):
    """A healthy app of its own; yields its base URL (http://127.0.0.1:PORT)."""
    with running_app_process(app, log_path, **env_overrides) as (_process, url):
        yield url


@contextlib.contextmanager
def running_app_process(app, log_path, **env_overrides):
    """running_app, yielding (uWSGI master process, base URL)."""
    process, url = start_app(app, log_path, **env_overrides)
    try:
        wait_healthy(process, url)
        yield process, url
    finally:
        stop(process)


def process_tree_cpu_seconds(pid):
    """CPU time (user + system) of a process and its children, from /proc."""
    total, todo = 0.0, [pid]
    ticks = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        todo.extend(int(child) for child in children)
    return total


@contextlib.contextmanager
def running_nginx(tmp_path, uwsgi_app_upstream=None, flask_app_upstream=None, **overrides):
    """An nginx of its own rendered from the project's template; yields its ws:// base URL.

    By default it proxies to the running local stack's apps.
    """
    port = free_port()
    overrides.setdefault("NGINX_TLS_PORT", str(free_port()))
    overrides.setdefault("NGINX_STATUS_PORT", str(free_port()))
    prefix = render_nginx(
        tmp_path, NGINX_PORT=str(port),
        NGINX_UWSGI_APP_UPSTREAM=uwsgi_app_upstream or '127.0.0.1:' + os.environ.get('LOCAL_UWSGI_APP_PORT', '8001'),
        NGINX_FLASK_APP_UPSTREAM=flask_app_upstream or '127.0.0.1:' + os.environ.get('LOCAL_FLASK_APP_PORT', '8002'),
        **overrides,
    )
    # Its error log (stderr) goes to TMP_PATH/nginx.log and its access log (stdout) to
    # TMP_PATH/access.log, where tests can read what nginx saw.
    with open(tmp_path / "nginx.log", "w") as log, open(tmp_path / "access.log", "w") as access_log:
        process = subprocess.Popen(["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                                   stdout=access_log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:  # readiness: nginx answers (its /healthz needs the apps; any answer, a redirect too, will do)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                connection.request("GET", "/index.html")
                connection.getresponse().read()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
            finally:
                connection.close()
        yield f"ws://127.0.0.1:{port}"
    finally:
        stop(process, timeout=10)
