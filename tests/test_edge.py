"""nginx at the edge: stalled clients, what reaches the apps, the headers on every response,
the health check's limits and the worker settings (docs/operations.md, "Limits" and "TLS")."""
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stack import BASE_URL, http_get

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
# Static files (the page under both of its names, its assets, a missing file), nginx's own
# health answer, and responses the apps make.
EVERY_KIND_OF_PATH = ["/", "/index.html", "/style.css", "/chat.js", "/no-such-file", "/healthz",
                      "/uwsgi/healthz", "/flask/healthz", "/uwsgi/ws/echo", "/flask/no-such-thing"]


@pytest.mark.parametrize("path", EVERY_KIND_OF_PATH)
def test_every_response_carries_the_same_security_headers(path):
    headers = http_get(path).headers
    assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS


def test_health_answers_are_not_cached_and_the_rest_are_not_marked():
    assert http_get("/healthz").headers["cache-control"] == "no-store"
    assert "cache-control" not in http_get("/index.html").headers


def request(method, path, headers=None):
    url = urlsplit(BASE_URL)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
def test_websocket_locations_take_get_only(backend, method):
    for path in (f"/{backend}/ws/echo", f"/{backend}/ws/chat", f"/{backend}/auth/token"):
        status, headers, _body = request(method, path, {"Upgrade": "websocket", "Connection": "Upgrade"})
        assert (status, headers.get("allow")) == (405, "GET"), path
    # A GET is passed on, and the Allow header belongs to the 405 only.
    status, headers, _body = request("GET", f"/{backend}/healthz")
    assert status == 200 and "allow" not in headers


# --- Settings and observations that need an nginx of the test's own (local mode) -------------


def recording_upstream():
    """A stand-in app: answers every request 200 and keeps each request's raw header."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                received.append(data.decode("latin-1"))
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    return listener, received


def header_lines(raw_request):
    return {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
            for line in raw_request.split("\r\n")[1:] if ":" in line}


@pytest.mark.local
def test_only_a_websocket_upgrade_reaches_the_app(tmp_path):
    from local_processes import running_nginx

    listener, received = recording_upstream()
    upstream = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with running_nginx(tmp_path, uwsgi_app_upstream=upstream) as ws_url:
            port = urlsplit(ws_url).port
            for upgrade, forwarded, connection in [("h2c", None, "close"), ("TLS/1.2", None, "close"),
                                                   ("websocket, h2c", None, "close"),
                                                   ("WebSocket", "websocket", "upgrade")]:
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                client.request("GET", "/uwsgi/anything", headers={"Upgrade": upgrade, "Connection": "Upgrade",
                                                                  "HTTP2-Settings": "AAMAAABkAARAAAAA"})
                assert client.getresponse().status == 200
                client.close()
                seen = header_lines(received[-1])
                assert (seen.get("upgrade"), seen.get("connection")) == (forwarded, connection), upgrade
    finally:
        listener.close()


def closed_within(sock, seconds):
    """True when the peer closes (or resets) the connection within SECONDS, sending nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.local
def test_a_stalled_client_is_closed_after_the_client_header_timeout(tmp_path):
    from local_processes import running_nginx

    tls_port = free_port()
    # Short enough to wait for; the checks allow nginx's timer its usual slack, and fail
    # against nginx's 60 s default.
    with running_nginx(tmp_path, NGINX_CLIENT_HEADER_TIMEOUT="2s", NGINX_TLS_PORT=str(tls_port)) as ws_url:
        port = urlsplit(ws_url).port
        stalls = {
            "nothing sent": ("plain", b""),
            "half a request header": ("plain", b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-"),
            "no ClientHello": ("tls", b""),
            # a TLS record header announcing a ClientHello that never comes: nginx is in its handshake
            "half a ClientHello": ("tls", bytes.fromhex("16030100c8") + bytes.fromhex("010000c40303") + b"\x00" * 16),
        }
        for stall, (kind, sent) in stalls.items():
            with socket.create_connection(("127.0.0.1", tls_port if kind == "tls" else port)) as sock:
                sock.sendall(sent)
                assert closed_within(sock, 8), stall


def free_port():
    from repo import free_port as repo_free_port

    return repo_free_port()


@pytest.mark.parametrize("backend", ["uwsgi", "flask"])
def test_the_apps_public_health_names_no_process_even_when_asked(backend):
    # X-Health-Detail: 1 is what nginx's status listener sends; from a client nginx drops it.
    for headers in ({}, {"X-Health-Detail": "1"}):
        response = http_get(f"/{backend}/healthz", headers=headers)
        report = json.loads(response.body)
        assert response.status == 200 and report["app"] == f"{backend}-app", report
        assert not {"pid", "master_pid"} & set(report), report
        # What tells replicas apart instead: an opaque id per app instance.
        assert len(report["instance"]) == 16 and int(report["instance"], 16) >= 0, report


@pytest.mark.local
def test_public_health_is_rate_limited_and_the_detailed_health_is_internal(tmp_path):
    from local_processes import running_nginx

    status_port = free_port()
    with running_nginx(tmp_path, NGINX_HEALTH_REQUESTS_PER_SECOND="1", NGINX_HEALTH_REQUEST_BURST="2",
                       NGINX_STATUS_PORT=str(status_port)) as ws_url:
        base = "http" + ws_url.removeprefix("ws")
        statuses = [status_of(base + "/healthz") for _ in range(6)]
        # the first, and the burst of 2 above the rate; then 429 until the next second
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:], statuses
        time.sleep(1.5)  # the rate lets one more through
        status, body = get(base + "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "apps": ["uwsgi-app", "flask-app"]}
        # The status port has each app's own report, with the processes the public one leaves out.
        for app in ("uwsgi-app", "flask-app"):
            status, body = get(f"http://127.0.0.1:{status_port}/healthz/{app}")
            report = json.loads(body)
            assert status == 200 and report["app"] == app and report["master_pid"] > 0 and report["pid"] > 0, report
        # ...and asks no rate limit of the monitoring that reads it.
        assert {status_of(f"http://127.0.0.1:{status_port}/healthz/uwsgi-app") for _ in range(6)} == {200}


def get(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def status_of(url):
    return get(url)[0]


def nginx_workers(master_pid):
    return [pid for pid in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: worker process")]


@pytest.mark.local
def test_worker_settings_reach_nginx(tmp_path):
    from repo import render_nginx

    prefix = render_nginx(tmp_path, NGINX_WORKER_PROCESSES="3", NGINX_WORKER_CONNECTIONS="512",
                          NGINX_WORKER_RLIMIT_NOFILE="1024", NGINX_PORT=str(free_port()),
                          NGINX_STATUS_PORT=str(free_port()), NGINX_TLS_PORT=str(free_port()))
    process = subprocess.Popen(["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while len(nginx_workers(process.pid)) < 3:
            assert process.poll() is None and time.monotonic() < deadline, "nginx did not start 3 workers"
            time.sleep(0.1)
        time.sleep(0.5)
        workers = nginx_workers(process.pid)
        assert len(workers) == 3
        limits = Path(f"/proc/{workers[0]}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["1024", "1024"]
                   for line in limits.splitlines()), limits
    finally:
        process.terminate()
        process.wait(timeout=10)
    rendered = (prefix / "conf.d" / "workers.inc").read_text()
    assert "worker_connections 512;" in rendered


@pytest.mark.local
@pytest.mark.parametrize("setting, value, message", [
    ("NGINX_CLIENT_HEADER_TIMEOUT", "0s", "NGINX_CLIENT_HEADER_TIMEOUT='0s' must be an nginx time of at least 1s"),
    ("NGINX_CLIENT_HEADER_TIMEOUT", "soon", "NGINX_CLIENT_HEADER_TIMEOUT='soon' must be an nginx time"),
    ("NGINX_HEALTH_REQUESTS_PER_SECOND", "0", "NGINX_HEALTH_REQUESTS_PER_SECOND='0' must be a whole number >= 1"),
    ("NGINX_HEALTH_REQUEST_BURST", "x", "NGINX_HEALTH_REQUEST_BURST='x' must be a whole number >= 1"),
    ("NGINX_WORKER_PROCESSES", "0", "NGINX_WORKER_PROCESSES"),
    ("NGINX_WORKER_PROCESSES", "many", "NGINX_WORKER_PROCESSES"),
    ("NGINX_WORKER_CONNECTIONS", "10", "NGINX_WORKER_CONNECTIONS='10' must be a whole number >= 64"),
    ("NGINX_WORKER_CONNECTIONS", "30000", "NGINX_WORKER_CONNECTIONS=30000 exceeds NGINX_WORKER_RLIMIT_NOFILE=20000"),
])
def test_both_modes_refuse_bad_edge_settings(setting, value, message):
    from repo import REPO, load_stack_module

    stack = load_stack_module()
    with pytest.raises(SystemExit) as refused:
        stack.load_settings({setting: value})
    assert message in str(refused.value)
    script = REPO / "nginx" / "docker-entrypoint.d" / "16-limits.envsh"
    image_env = {name: value for name, value in
                 (line.split("=", 1) for line in (REPO / "k8s" / "base" / "nginx.env").read_text().splitlines()
                  if line.startswith("NGINX_"))}
    # Sourced, as the official entrypoint does with *.envsh.
    result = subprocess.run(["sh", "-c", f'. "{script}"'], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **image_env, setting: value})
    assert result.returncode != 0 and message in result.stderr, result.stderr
    good = subprocess.run(["sh", "-c", f'. "{script}"'], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **image_env})
    assert good.returncode == 0, good.stderr
    assert os.access(script, os.X_OK)  # the entrypoint skips scripts that are not executable


def plain_request(port, host_header):
    """(status, Location) of GET /index.html with this Host header, or None when nginx closes
    the connection without an answer."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        client.putrequest("GET", "/index.html", skip_host=True)
        client.putheader("Host", host_header)
        client.endheaders()
        response = client.getresponse()
        return response.status, response.getheader("location")
    except http.client.RemoteDisconnected:
        return None
    finally:
        client.close()


def tls_status(port, server_hostname):
    """Status of GET /index.html over TLS with this SNI (None: no SNI), or the refusal."""
    import ssl

    from repo import dev_certificate_dir

    context = ssl.create_default_context(cafile=str(dev_certificate_dir() / "ca.crt"))
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                context.wrap_socket(sock, server_hostname=server_hostname) as tls:
            tls.sendall(f"GET /index.html HTTP/1.1\r\nHost: {server_hostname or '127.0.0.1'}\r\n"
                        "Connection: close\r\n\r\n".encode())
            return tls.recv(64).split(b" ")[1].decode()
    except ssl.SSLError as refused:
        return refused.reason


@pytest.mark.local
def test_with_a_server_name_unknown_hosts_are_closed_on_both_ports(tmp_path):
    from local_processes import running_nginx

    tls_port = free_port()
    with running_nginx(tmp_path, NGINX_SERVER_NAME="localhost", NGINX_TLS_PORT=str(tls_port)) as ws_url:
        port = urlsplit(ws_url).port
        assert plain_request(port, f"localhost:{port}") == (200, None)
        assert plain_request(port, "127.0.0.1") == (200, None)  # health checks from inside
        assert plain_request(port, "attacker.example") is None
        assert tls_status(tls_port, "localhost") == "200"
        assert tls_status(tls_port, "attacker.example") == "TLSV1_UNRECOGNIZED_NAME"
        assert tls_status(tls_port, None) == "TLSV1_UNRECOGNIZED_NAME"  # no SNI: the default server


@pytest.mark.local
def test_without_a_server_name_every_host_is_served(tmp_path):
    from local_processes import running_nginx

    tls_port = free_port()
    with running_nginx(tmp_path, NGINX_TLS_PORT=str(tls_port)) as ws_url:
        port = urlsplit(ws_url).port
        assert plain_request(port, "attacker.example") == (200, None)
        assert tls_status(tls_port, "attacker.example") == "200"
        assert tls_status(tls_port, None) == "200"


@pytest.mark.local
def test_the_https_redirect_names_the_configured_server_not_the_clients_host(tmp_path):
    from local_processes import running_nginx

    tls_port = free_port()
    with running_nginx(tmp_path, NGINX_SERVER_NAME="localhost", NGINX_HTTPS_REDIRECT="on",
                       NGINX_TLS_PORT=str(tls_port)) as ws_url:
        port = urlsplit(ws_url).port
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost"):
            assert plain_request(port, host) == (301, f"https://localhost:{tls_port}/index.html"), host


@pytest.mark.local
@pytest.mark.parametrize("settings, message", [
    ({"NGINX_HTTPS_REDIRECT": "on"}, "NGINX_HTTPS_REDIRECT=on needs NGINX_SERVER_NAME"),
    ({"NGINX_SERVER_NAME": "a.example; include /etc/passwd"}, "must be one host name"),
    ({"NGINX_SERVER_NAME": "-x.example"}, "must be one host name"),
    ({"NGINX_SERVER_NAME": "a..example"}, "must be one host name"),
])
def test_both_modes_refuse_a_bad_server_name(tmp_path, settings, message):
    from repo import REPO, load_stack_module, render_nginx

    with pytest.raises(SystemExit) as refused:
        load_stack_module().load_settings(settings)
    assert message in str(refused.value)
    # the image's entrypoint and the local rendering source the same check
    script = REPO / "nginx" / "docker-entrypoint.d" / "17-server-name.envsh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(["sh", "-c", f'. "{script}"'], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **settings})
    assert result.returncode != 0 and message in result.stderr, result.stderr
    with pytest.raises(subprocess.CalledProcessError) as failed:
        render_nginx(tmp_path, **settings)
    assert message in failed.value.stderr


@pytest.mark.parametrize("path", ["/healthz", "/uwsgi/healthz", "/flask/healthz"])
def test_no_header_is_sent_twice(path):
    url = urlsplit(BASE_URL)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request("GET", path)
        names = [name.lower() for name, _value in connection.getresponse().getheaders()]
    finally:
        connection.close()
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
