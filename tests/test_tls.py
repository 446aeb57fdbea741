"""TLS at nginx: https and wss on the TLS port, protocol versions, the certificate, the
http->https redirect, HSTS, and the development certificate (nginx/dev-certs.sh).

The black-box tests trust only STACK_TLS_CA_FILE (make test: the stack's development CA; the
tests container: the same CA, read from the compose volume) and check the host name.
"""
import contextlib
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import urllib.parse
import warnings
from pathlib import Path

import pytest
from websockets.sync.client import connect

from local_processes import running_nginx
from repo import REPO, dev_certificate_dir, free_port, load_stack_module, render_nginx
from stack import TLS_BASE_URL, TLS_CA_FILE, WSS_BASE_URL
from test_local_stack import run_stack_expecting_failure

TLS_HOST = urllib.parse.urlsplit(TLS_BASE_URL).hostname
TLS_PORT = urllib.parse.urlsplit(TLS_BASE_URL).port or 443
OLD_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}


def trusting_the_stack_ca():
    """Default verification (certificate chain and host name) against the stack's CA only."""
    return ssl.create_default_context(cafile=TLS_CA_FILE)


def handshake(context, host=TLS_HOST, port=TLS_PORT, server_hostname=None):
    """(protocol version, cipher name) that nginx and the client agreed on."""
    with socket.create_connection((host, port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=server_hostname or host) as tls:
            return tls.version(), tls.cipher()[0]


def legacy_client(version):
    """A client able to offer TLS 1.0 or 1.1: OpenSSL 3 only does below security level 1."""
    with warnings.catch_warnings():  # Python deprecates the old versions; offering them is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("ALL:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
    return context


def https_get(base_url, path, context):
    """One request without following redirects: (status, headers with lower-case names, body)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_wss_echo_trusting_only_the_stack_ca(backend):
    with connect(f"{WSS_BASE_URL}/{backend}/ws/echo", ssl=trusting_the_stack_ca(), ping_interval=None) as ws:
        assert ws.socket.version() in ("TLSv1.2", "TLSv1.3")
        ws.send("over tls ☃")
        assert ws.recv(timeout=5) == "over tls ☃"
        ws.send(b"\x00\xffbinary")
        assert ws.recv(timeout=5) == b"\x00\xffbinary"


def test_a_current_client_negotiates_tls_1_3():
    version, _cipher = handshake(trusting_the_stack_ca())
    assert version == "TLSv1.3"


def test_a_client_limited_to_tls_1_2_gets_forward_secrecy_and_aead():
    context = trusting_the_stack_ca()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(context)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("-GCM-" in cipher or "CHACHA20" in cipher), cipher


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_tls_1_0_and_1_1_are_refused_by_the_server(version):
    with pytest.raises(ssl.SSLError) as refused:
        handshake(legacy_client(OLD_VERSIONS[version]))
    # An alert nginx sent, not the client declining to offer the version ("NO_PROTOCOLS_AVAILABLE").
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value


def test_a_client_that_does_not_trust_the_ca_is_refused():
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        handshake(ssl.create_default_context())  # the system's authorities only
    assert refused.value.verify_message == "unable to get local issuer certificate"


def test_a_name_the_certificate_does_not_cover_is_refused():
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        handshake(trusting_the_stack_ca(), server_hostname="not-this-server.example")
    assert "Hostname mismatch" in refused.value.verify_message


def test_https_serves_the_demo_page_and_the_health_check():
    status, headers, body = https_get(TLS_BASE_URL, "/", trusting_the_stack_ca())
    assert status == 200 and b"<html" in body.lower()
    assert "default-src 'self'" in headers["content-security-policy"]
    status, _headers, body = https_get(TLS_BASE_URL, "/healthz", trusting_the_stack_ca())
    assert (status, body) == (200, b'{"status": "ok", "apps": ["uwsgi-app", "flask-app"]}\n')


# --- Settings that need an nginx of the test's own (local mode) -----------------------------


@contextlib.contextmanager
def own_nginx(tmp_path, **settings):
    """An nginx from the project's template with these settings, in front of the stack's apps.
    Yields (http base URL, https base URL, a context trusting its CA)."""
    tls_port = str(free_port())
    with running_nginx(tmp_path, NGINX_TLS_PORT=tls_port, **settings) as ws_url:
        context = ssl.create_default_context(cafile=str(dev_certificate_dir() / "ca.crt"))
        yield "http" + ws_url.removeprefix("ws"), f"https://127.0.0.1:{tls_port}", context


@pytest.mark.local
def test_redirect_on_sends_http_to_the_tls_port_keeping_path_and_query(tmp_path):
    with own_nginx(tmp_path, NGINX_HTTPS_REDIRECT="on", NGINX_SERVER_NAME="localhost") as (http_url, https_url, context):
        # to the configured name (tests/test_edge.py: whatever Host the client sent)
        https_url = https_url.replace("127.0.0.1", "localhost")
        for path in ("/", "/uwsgi/healthz?probe=1&x=%2F", "/flask/ws/echo"):
            status, headers, _body = https_get(http_url, path, None)
            assert (status, headers.get("location")) == (301, https_url + path)
            assert https_get(https_url, path.replace("/ws/echo", "/healthz"), context)[0] == 200
        # Health checks ask over plain http on the container's port: never redirected.
        status, headers, _body = https_get(http_url, "/healthz", None)
        assert status == 200 and "location" not in headers


@pytest.mark.local
def test_redirect_off_serves_plain_http(tmp_path):
    with own_nginx(tmp_path, NGINX_HTTPS_REDIRECT="off") as (http_url, _https_url, _context):
        status, headers, _body = https_get(http_url, "/uwsgi/healthz", None)
        assert status == 200 and "location" not in headers


HSTS_PATHS = ["/", "/index.html", "/healthz", "/uwsgi/healthz", "/flask/healthz", "/no-such-file"]


@pytest.mark.local
def test_hsts_on_every_https_response_and_never_on_http(tmp_path):
    with own_nginx(tmp_path, NGINX_HSTS_MAX_AGE="31536000") as (http_url, https_url, context):
        for path in HSTS_PATHS:
            _status, headers, _body = https_get(https_url, path, context)
            assert headers.get("strict-transport-security") == "max-age=31536000", path
            _status, headers, _body = https_get(http_url, path, None)
            assert "strict-transport-security" not in headers, path


@pytest.mark.local
def test_hsts_max_age_0_sends_no_header(tmp_path):
    with own_nginx(tmp_path, NGINX_HSTS_MAX_AGE="0") as (_http_url, https_url, context):
        for path in HSTS_PATHS:
            _status, headers, _body = https_get(https_url, path, context)
            assert "strict-transport-security" not in headers, path


@pytest.mark.local
@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_the_legacy_client_does_offer_the_old_version(version):
    """The control for test_tls_1_0_and_1_1_are_refused_by_the_server: the same client
    completes a handshake with a server that allows the version, so the refusal is nginx's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.set_ciphers("ALL:@SECLEVEL=0")
        server_context.minimum_version = OLD_VERSIONS[version]
    server_context.load_cert_chain(dev_certificate_dir() / "server.crt", dev_certificate_dir() / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve_one():
            connection, _ = listener.accept()
            with contextlib.suppress(OSError), server_context.wrap_socket(connection, server_side=True):
                pass

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        negotiated, _cipher = handshake(legacy_client(OLD_VERSIONS[version]), "127.0.0.1", listener.getsockname()[1])
        server.join(timeout=10)
    assert negotiated == version


@pytest.mark.local
def test_rendered_config_allows_only_tls_1_2_and_1_3_with_strong_suites(tmp_path):
    conf = (render_nginx(tmp_path) / "conf.d" / "default.conf").read_text()
    directives = dict(line.strip().rstrip(";").split(None, 1) for line in conf.splitlines()
                      if line.strip().startswith("ssl_"))
    assert directives["ssl_protocols"].split() == ["TLSv1.2", "TLSv1.3"]
    for cipher in directives["ssl_ciphers"].split(":"):
        assert cipher.startswith("ECDHE-") and ("-GCM-" in cipher or "CHACHA20" in cipher), cipher
    assert directives["ssl_session_tickets"] == "off"
    assert "listen 127.0.0.1:18443 ssl;" in conf
    # OpenSSL knows every suite named (a typo would silently drop one).
    listed = subprocess.run(["openssl", "ciphers", directives["ssl_ciphers"]], capture_output=True, text=True, check=True)
    assert set(listed.stdout.strip().split(":")) >= set(directives["ssl_ciphers"].split(":"))


# --- The development certificate and the container's TLS start-up --------------------------


def certificate_text(path):
    return subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout


def dev_certs(directory):
    return subprocess.run([str(REPO / "nginx" / "dev-certs.sh"), str(directory)], capture_output=True, text=True, check=True)


@pytest.mark.local
def test_dev_certs_makes_a_ca_and_a_server_certificate_for_the_stacks_names(tmp_path):
    dev_certs(tmp_path / "tls")
    text = certificate_text(tmp_path / "tls" / "server.crt")
    for name in ("DNS:localhost", "DNS:nginx", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1"):
        assert name in text
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text
    assert "CA:TRUE" in certificate_text(tmp_path / "tls" / "ca.crt")
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "tls" / "ca.crt"),
                               str(tmp_path / "tls" / "server.crt")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for key in ("ca.key", "server.key"):
        assert (tmp_path / "tls" / key).stat().st_mode & 0o077 == 0, key
    assert (tmp_path / "tls" / "ca.crt").stat().st_mode & 0o004


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user")
def test_dev_certs_works_in_a_directory_of_roots_writable_by_all(tmp_path):
    # A Kubernetes emptyDir: root's, mode 0777; nginx (uid 101) may write in it but not chmod it.
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o777)
        result = subprocess.run(["setpriv", "--reuid=101", "--regid=101", "--clear-groups",
                                 str(REPO / "nginx" / "dev-certs.sh"), str(shared)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (shared / "server.crt").stat().st_uid == 101 and (shared / "ca.crt").stat().st_mode & 0o004
    finally:
        shutil.rmtree(shared)


@pytest.mark.local
def test_dev_certs_reuses_valid_files_and_replaces_a_server_certificate_about_to_expire(tmp_path):
    directory = tmp_path / "tls"
    dev_certs(directory)
    first = {name: (directory / name).read_bytes() for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    assert dev_certs(directory).stdout == ""  # nothing made
    assert {name: (directory / name).read_bytes() for name in first} == first

    # Signed by the same CA with the same key, but valid for 10 days only: renewed (30 days ahead).
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(directory / "server.key"), "-days", "10",
                    "-CA", str(directory / "ca.crt"), "-CAkey", str(directory / "ca.key"), "-subj", "/CN=localhost",
                    "-out", str(directory / "server.crt")], capture_output=True, check=True)
    assert "created a server certificate" in dev_certs(directory).stdout
    assert (directory / "ca.crt").read_bytes() == first["ca.crt"]
    assert "DNS:nginx" in certificate_text(directory / "server.crt")


@pytest.mark.local
def test_make_run_makes_the_development_certificate_in_its_run_dir_and_says_where(tmp_path, capfd):
    stack_runner = load_stack_module()
    settings = stack_runner.load_settings({"LOCAL_RUN_DIR": str(tmp_path)})
    paths = stack_runner.tls_certificate(settings, tmp_path)
    assert paths == (str(tmp_path / "tls" / "server.crt"), str(tmp_path / "tls" / "server.key"))
    assert f"local CA {tmp_path / 'tls' / 'ca.crt'}" in capfd.readouterr().out
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "tls" / "ca.crt"), paths[0]],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.local
def test_make_run_uses_a_given_certificate_and_makes_none(tmp_path):
    stack_runner = load_stack_module()
    given = {"NGINX_TLS_CERTIFICATE": str(dev_certificate_dir() / "server.crt"),
             "NGINX_TLS_CERTIFICATE_KEY": str(dev_certificate_dir() / "server.key")}
    settings = stack_runner.load_settings({"LOCAL_RUN_DIR": str(tmp_path), **given})
    assert stack_runner.tls_certificate(settings, tmp_path) == (given["NGINX_TLS_CERTIFICATE"],
                                                                given["NGINX_TLS_CERTIFICATE_KEY"])
    assert not (tmp_path / "tls").exists()


def run_container_tls_start(tmp_path, **settings):
    """nginx/docker-entrypoint.d/15-tls-certificate.envsh sourced as the image's entrypoint
    does, with the image's defaults; it prints what it exported."""
    env = {"PATH": f"{REPO / 'nginx'}:{os.environ['PATH']}", "NGINX_PORT": "8080", "NGINX_TLS_PORT": "8443",
           "NGINX_TLS_CERTIFICATE": "", "NGINX_TLS_CERTIFICATE_KEY": "", "NGINX_HTTPS_REDIRECT": "off",
           "NGINX_HSTS_MAX_AGE": "0", "TLS_DEV_DIR": str(tmp_path / "volume")}
    env.update(settings)
    script = REPO / "nginx" / "docker-entrypoint.d" / "15-tls-certificate.envsh"
    assert os.access(script, os.X_OK), "the official entrypoint ignores scripts without the executable bit"
    return subprocess.run(["sh", "-ec", f'. "{script}"; echo "cert=$NGINX_TLS_CERTIFICATE key=$NGINX_TLS_CERTIFICATE_KEY"'],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.local
def test_container_start_makes_the_development_certificate_and_nginx_accepts_it(tmp_path):
    result = run_container_tls_start(tmp_path)
    volume = tmp_path / "volume"
    assert result.returncode == 0, result.stderr
    assert f"cert={volume}/server.crt key={volume}/server.key" in result.stdout
    assert f"local CA {volume}/ca.crt" in result.stdout
    prefix = render_nginx(tmp_path, NGINX_TLS_CERTIFICATE=str(volume / "server.crt"),
                          NGINX_TLS_CERTIFICATE_KEY=str(volume / "server.key"))
    checked = subprocess.run(["nginx", "-t", "-q", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.local
def test_container_start_keeps_a_given_certificate_and_makes_none(tmp_path):
    given = {"NGINX_TLS_CERTIFICATE": str(dev_certificate_dir() / "server.crt"),
             "NGINX_TLS_CERTIFICATE_KEY": str(dev_certificate_dir() / "server.key")}
    result = run_container_tls_start(tmp_path, **given)
    assert result.returncode == 0, result.stderr
    assert f"cert={given['NGINX_TLS_CERTIFICATE']} key={given['NGINX_TLS_CERTIFICATE_KEY']}" in result.stdout
    assert not (tmp_path / "volume").exists()


INVALID_TLS_SETTINGS = [
    ({"NGINX_TLS_PORT": "abc"}, "NGINX_TLS_PORT='abc' is not a port number"),
    ({"NGINX_TLS_PORT": "21999", "NGINX_PORT": "21999"}, "NGINX_TLS_PORT must differ from NGINX_PORT"),
    ({"NGINX_TLS_CERTIFICATE": "/etc/hostname"}, "NGINX_TLS_CERTIFICATE_KEY is missing"),
    ({"NGINX_TLS_CERTIFICATE": "/etc/hostname", "NGINX_TLS_CERTIFICATE_KEY": "/nonexistent.key"},
     "NGINX_TLS_CERTIFICATE_KEY=/nonexistent.key is not a readable file"),
    ({"NGINX_HTTPS_REDIRECT": "true"}, "NGINX_HTTPS_REDIRECT='true' must be on or off"),
    ({"NGINX_HSTS_MAX_AGE": "-1"}, "NGINX_HSTS_MAX_AGE='-1' must be a whole number of seconds"),
]


@pytest.mark.local
@pytest.mark.parametrize("settings, message", INVALID_TLS_SETTINGS)
def test_container_start_refuses_invalid_tls_settings(tmp_path, settings, message):
    result = run_container_tls_start(tmp_path, **settings)
    assert result.returncode != 0
    assert message in result.stderr
    assert "cert=" not in result.stdout


@pytest.mark.local
@pytest.mark.parametrize("settings, message", INVALID_TLS_SETTINGS)
def test_make_run_refuses_invalid_tls_settings_before_starting_anything(tmp_path, settings, message):
    run_stack_expecting_failure(tmp_path, settings, message)
    assert not (tmp_path / "run" / "tls").exists()  # refused before making a certificate
