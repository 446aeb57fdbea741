"""Helpers for the @pytest.mark.local tests, which read the repository and run local tools."""
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DOCKERFILES = sorted(REPO.glob("*/Dockerfile"))


def load_script(name):
    """scripts/NAME.py as a module (scripts/ is not a package, and is not in the tests image)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_stack_module():
    """scripts/stack.py, the local process runner, as a module."""
    return load_script("stack")


@functools.cache
def dev_certificate_dir():
    """A development CA and server certificate (nginx/dev-certs.sh) for the tests' own nginx."""
    directory = REPO / ".run" / "test-tls"
    subprocess.run([str(REPO / "nginx" / "dev-certs.sh"), str(directory)], check=True, capture_output=True)
    return directory


def render_nginx(tmp_path, **overrides):
    """Render nginx/templates into a fresh prefix the way both modes do; return the prefix."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").symlink_to(REPO / "nginx" / "nginx.conf")
    (prefix / "mime.types").symlink_to("/etc/nginx/mime.types")
    env = {
        "PATH": os.environ["PATH"],
        "NGINX_ENVSUBST_FILTER": "^NGINX_",
        "NGINX_HOST": "127.0.0.1",
        "NGINX_PORT": "18080",
        "NGINX_STATUS_HOST": "127.0.0.1",
        "NGINX_STATUS_PORT": "18081",
        "NGINX_PROXY_READ_TIMEOUT": "60s",
        "NGINX_SEND_TIMEOUT": "10s",
        "NGINX_CLIENT_HEADER_TIMEOUT": "10s",
        "NGINX_HEALTH_REQUESTS_PER_SECOND": "10",
        "NGINX_HEALTH_REQUEST_BURST": "20",
        "NGINX_WORKER_PROCESSES": "1",
        "NGINX_WORKER_CONNECTIONS": "16384",
        "NGINX_WORKER_RLIMIT_NOFILE": "20000",
        "NGINX_WS_CONNECTIONS_PER_IP": "1000",
        "NGINX_WS_HANDSHAKES_PER_SECOND": "100",
        "NGINX_WS_HANDSHAKE_BURST": "500",
        "NGINX_AUTH_REQUESTS_PER_MINUTE": "30",
        "NGINX_AUTH_REQUEST_BURST": "20",
        "NGINX_UWSGI_APP_UPSTREAM": "127.0.0.1:18001",
        "NGINX_FLASK_APP_UPSTREAM": "127.0.0.1:18002",
        "NGINX_RESOLVER": "127.0.0.1:18053",
        "NGINX_RESOLVER_VALID": "5s",
        "NGINX_HTML_ROOT": str(REPO / "nginx" / "html"),
        "NGINX_TLS_PORT": "18443",
        "NGINX_TLS_CERTIFICATE": str(dev_certificate_dir() / "server.crt"),
        "NGINX_TLS_CERTIFICATE_KEY": str(dev_certificate_dir() / "server.key"),
        "NGINX_HTTPS_REDIRECT": "off",
        "NGINX_SERVER_NAME": "",
        "NGINX_HSTS_MAX_AGE": "0",
        "NGINX_REAL_IP_FROM": "unix:",
        # Not NGINX_*: must survive rendering untouched even though it is set.
        "host": "must-not-be-substituted",
    }
    env.update(overrides)
    subprocess.run(
        [str(REPO / "scripts" / "render-nginx-templates.sh"), str(REPO / "nginx" / "templates"), str(prefix / "conf.d")],
        env=env, check=True, capture_output=True, text=True,
    )
    return prefix


def free_port():
    return free_ports(1)[0]


_ISSUED_PORTS = set()


def free_ports(count):
    """`count` distinct free ports, none of them handed out before by this process. A port is
    only bound when its process starts, which can be after other picks: in the bench, a
    replica's metrics port that came back as the nginx port picked before it was bound had the
    bench talk to the metrics server (a 404 for the echo URL). The bench picks here too."""
    import contextlib
    import socket

    picked = []
    with contextlib.ExitStack() as stack:
        while len(picked) < count:  # each socket stays bound until all are picked
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _ISSUED_PORTS:
                _ISSUED_PORTS.add(port)
                picked.append(port)
    return picked


def run_python(code, *paths, timeout=60):
    """Run `code` in a fresh interpreter of the local venv with `paths` first on sys.path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / p) for p in paths))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
