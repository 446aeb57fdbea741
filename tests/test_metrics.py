"""Observability: the apps' /metrics, nginx's stub_status, uWSGI's stats server (all internal
only), and nginx's access log of WebSocket sessions."""
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from chat_client import new_room, raw_chat, token
from stack import http_get, ws_url
from wsstack import exposition
from wsstack.rawws import BINARY, TEXT, RawWebSocket

BACKENDS = {"uwsgi": "uwsgi-app", "flask": "flask-app"}
NO_CLIENT_PINGS = {"ping_interval": None}


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.headers, resp.read().decode()


def parse(text):
    """{(sample name, sorted labels): value} from a Prometheus text exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_all(urls):
    """Every instance's samples, summed (Prometheus would sum over `instance` the same way)."""
    total = {}
    for url in urls:
        for key, value in parse(fetch(url)[2]).items():
            total[key] = total.get(key, 0) + value
    return total


def open_connections(samples):
    return sum(value for (name, _), value in samples.items() if name == "wsstack_websocket_connections_open")


def wait_until_idle(urls, timeout=20):
    """Samples once no WebSocket is open on any instance: the closes of earlier tests are counted."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape_all(urls)
        if open_connections(samples) == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)  # poll interval


def deltas(before, after):
    return {key: after.get(key, 0) - before.get(key, 0) for key in after if after.get(key, 0) != before.get(key, 0)}


def sample(name, app, **labels):
    return name, tuple(sorted(dict(labels, backend=app).items()))


# --- the exposition format, without a stack ------------------------------------------------------------------------

def test_exposition_escapes_label_values_and_help_as_the_format_requires():
    family = exposition.Family("demo_total", "counter", 'help with \\ and\nnewline')
    family.add(3, path='a "quoted" \\ value\non two lines', code="1000")
    family.add(0, path="plain", code="1001")
    text = exposition.render([family])
    assert text.endswith("\n")
    assert '# HELP demo_total help with \\\\ and\\nnewline' in text.splitlines()
    [parsed] = text_string_to_metric_families(text)
    assert parsed.type == "counter" and parsed.documentation == 'help with \\ and\nnewline'
    assert [(s.labels, s.value) for s in parsed.samples] == [
        ({"path": 'a "quoted" \\ value\non two lines', "code": "1000"}, 3), ({"path": "plain", "code": "1001"}, 0)]


# --- through the public port ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/metrics", "/uwsgi/metrics", "/flask/metrics", "/stub_status", "/nginx_status",
                                  "/uwsgi/stub_status", "/flask/stub_status", "/uwsgi/", "/flask/"])
def test_public_port_exposes_no_metrics_status_or_stats(path):
    resp = http_get(path)
    assert resp.status == 404, resp.body[:200]
    for marker in (b"wsstack_", b"Active connections", b'"workers"', b"listen_queue"):
        assert marker not in resp.body


# --- the shared stack's internal endpoints (local: their addresses come from make run's settings) ----------------

def local_internal_addresses():
    from repo import load_stack_module

    stack = load_stack_module()
    settings = stack.load_settings(os.environ)

    def replicas(setting):
        return [f"{host}:{port}" for host, port in stack.replica_addresses(settings, setting)]

    return {
        "metrics": {"uwsgi": [f"http://{a}/metrics" for a in replicas("LOCAL_UWSGI_APP_METRICS_PORT")],
                    "flask": [f"http://{a}/metrics" for a in replicas("LOCAL_FLASK_APP_METRICS_PORT")]},
        "stats": [f"http://{a}" for a in replicas("LOCAL_UWSGI_APP_STATS_PORT") + replicas("LOCAL_FLASK_APP_STATS_PORT")],
        "stub_status": f"http://{settings['NGINX_STATUS_HOST']}:{settings['NGINX_STATUS_PORT']}/stub_status",
        "processes": int(os.environ.get("UWSGI_PROCESSES", "2")),
    }


@pytest.fixture(scope="module")
def internal():
    return local_internal_addresses()


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_are_valid_prometheus_text_with_every_family_declared(internal, backend):
    for url in internal["metrics"][backend]:
        status, headers, text = fetch(url)
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = {family.name: family for family in text_string_to_metric_families(text)}
        assert {name: family.type for name, family in families.items()} == {
            "wsstack_websocket_connections_open": "gauge",
            "wsstack_websocket_connections": "counter",  # the parser drops a counter's _total
            "wsstack_websocket_messages_received": "counter",
            "wsstack_websocket_messages_sent": "counter",
            "wsstack_websocket_closes": "counter",
            "wsstack_websocket_handshake_failures": "counter",
        }
        for family in families.values():
            assert family.documentation
            assert {s.labels["backend"] for s in family.samples} == {BACKENDS[backend]}
        # HELP, TYPE, then that family's samples only: no family is split or undeclared.
        declared = None
        for line in text.splitlines():
            if line.startswith("# HELP "):
                declared = line.split()[2]
            elif line.startswith("# TYPE "):
                assert line.split()[2] == declared
            else:
                assert re.fullmatch(r"[a-z_]+\{[^}]*\} \d+", line) and line.startswith(declared + "{"), line
        reasons = {s.labels["reason"] for s in families["wsstack_websocket_handshake_failures"].samples}
        assert reasons == {"not_upgrade", "bad_key", "bad_version", "origin", "worker_full", "chat_params",
                           "unauthorized", "backplane"}


def echo_workload(backend):
    """Five WebSockets, each ending differently, and every kind of bad handshake nginx lets through."""
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:  # 4 text + 1 binary, client closes 1000
        for i in range(4):
            ws.send(f"message {i}")
            assert ws.recv(timeout=5) == f"message {i}"
        ws.send(b"\x00\xff")
        assert ws.recv(timeout=5) == b"\x00\xff"
    with connect(ws_url(backend), **NO_CLIENT_PINGS) as ws:  # 2 text, client closes 4001
        for text in ("a", "b"):
            ws.send(text)
            assert ws.recv(timeout=5) == text
        ws.close(4001, "application code")
    raw = RawWebSocket(ws_url(backend))  # 1 text, then the client vanishes: no close frame (1006)
    raw.send(TEXT, b"gone")
    assert raw.recv_message(timeout=5).payload == b"gone"
    raw.close()
    with RawWebSocket(ws_url(backend)) as raw:  # invalid UTF-8: uWSGI closes 1007 (patch 0005)
        raw.send(TEXT, b"\xff\xfe")
        assert raw.expect_close(timeout=5).close_code == 1007
    room = f"metrics-{time.monotonic_ns()}"  # empty: history_end and the presence list (2 texts out)
    with raw_chat(backend, room, "m") as raw:  # binary in chat: the app closes 1003
        assert json.loads(raw.recv_message(timeout=5).payload)["type"] == "history_end"
        assert json.loads(raw.recv_message(timeout=5).payload)["type"] == "presence"
        raw.send(BINARY, b"\x01")
        assert raw.expect_close(timeout=5).close_code == 1003

    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert http_get(f"/{backend}/ws/echo").status == 426  # not an upgrade
    assert http_get(f"/{backend}/ws/echo", dict(upgrade, **{"Sec-WebSocket-Key": "short"})).status == 400
    assert http_get(f"/{backend}/ws/echo", dict(upgrade, **{"Sec-WebSocket-Version": "8"})).status == 426
    assert http_get(f"/{backend}/ws/echo", dict(upgrade, Origin="https://evil.example")).status == 403
    assert http_get(f"/{backend}/ws/chat?room=bad%20room", upgrade).status == 400
    assert http_get(f"/{backend}/ws/chat?room=fine", upgrade).status == 401  # no token


def expected_deltas(backend):
    app = BACKENDS[backend]
    closes = "wsstack_websocket_closes_total"
    expected = {
        sample("wsstack_websocket_connections_total", app): 5,
        sample("wsstack_websocket_messages_received_total", app, type="text"): 7,
        sample("wsstack_websocket_messages_received_total", app, type="binary"): 2,
        sample("wsstack_websocket_messages_sent_total", app, type="text"): 9,
        sample("wsstack_websocket_messages_sent_total", app, type="binary"): 1,
        sample(closes, app, code="1000", initiator="client"): 1,
        sample(closes, app, code="4000-4999", initiator="client"): 1,
        sample(closes, app, code="1006", initiator="none"): 1,
        sample(closes, app, code="1007", initiator="server"): 1,
        sample(closes, app, code="1003", initiator="server"): 1,
    }
    for reason in ("not_upgrade", "bad_key", "bad_version", "origin", "chat_params", "unauthorized"):
        expected[sample("wsstack_websocket_handshake_failures_total", app, reason=reason)] = 1
    return expected


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_known_workload_changes_the_counters_by_exactly_its_counts(internal, backend):
    urls = internal["metrics"][backend]  # every replica: nginx spreads the connections over them
    before = wait_until_idle(urls)
    echo_workload(backend)
    expected = expected_deltas(backend)
    deadline = time.monotonic() + 15
    while True:  # the server ends a connection shortly after the client does
        after = wait_until_idle(urls)
        if deltas(before, after) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # poll interval
    assert deltas(before, after) == expected
    assert open_connections(after) == 0


@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_open_connections_gauge_counts_live_websockets(internal, backend):
    urls = internal["metrics"][backend]
    baseline = open_connections(wait_until_idle(urls))
    with contextlib.ExitStack() as clients:
        for _ in range(3):
            ws = clients.enter_context(connect(ws_url(backend), **NO_CLIENT_PINGS))
            ws.send("x")
            ws.recv(timeout=5)
        assert open_connections(scrape_all(urls)) == baseline + 3
    assert open_connections(wait_until_idle(urls)) == 0


@pytest.mark.local
def test_nginx_stub_status_answers_on_the_internal_port_only(internal):
    with connect(ws_url("uwsgi"), **NO_CLIENT_PINGS), connect(ws_url("flask"), **NO_CLIENT_PINGS):
        status, _, text = fetch(internal["stub_status"])
    assert status == 200
    match = re.fullmatch(r"Active connections: (\d+) \nserver accepts handled requests\n (\d+) (\d+) (\d+) \n"
                         r"Reading: \d+ Writing: \d+ Waiting: \d+ \n", text)
    assert match, text
    active, accepts, handled, requests = map(int, match.groups())
    assert active >= 3  # the two WebSockets and this request
    # (requests may be fewer than connections: a failed TLS handshake or a client that closed
    # before sending its request is a connection without one)
    assert accepts >= handled >= active and requests >= active
    other = internal["stub_status"].rsplit("/", 1)[0] + "/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(other)
    assert refused.value.code == 404


@pytest.mark.local
def test_uwsgi_stats_servers_answer_json_on_their_internal_ports(internal):
    for url in internal["stats"]:
        status, _, text = fetch(url)
        stats = json.loads(text)
        assert status == 200 and stats["version"].endswith("-wsstack")
        assert len(stats["workers"]) == internal["processes"]


@pytest.mark.local
def test_the_stats_dump_shows_every_open_chats_token(internal):
    """Why the stats server must stay internal (inside the container in the images): a
    WebSocket is an in-flight request for its whole life, and the dump lists its headers."""
    document = token("seen-in-stats", fresh=True)
    with raw_chat("uwsgi", new_room(), "seen-in-stats", token_document=document):
        dumps = [fetch(url)[2] for url in internal["stats"]]
    assert any(document["token"] in dump for dump in dumps)


@pytest.mark.local
def test_compose_publishes_no_internal_port():
    import yaml

    from repo import REPO

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    published = {name: service.get("ports", []) for name, service in services.items() if service.get("ports")}
    assert list(published) == ["nginx"]
    # Container ports: NGINX_PORT's 8080 and the TLS port, never the status port 8081.
    targets = [port[port.rindex("${"):] if port.endswith("}") else port.rsplit(":", 1)[1] for port in published["nginx"]]
    assert targets == ["8080", "${NGINX_TLS_PORT:-8443}"]


# --- apps of the test's own ---------------------------------------------------------------------------------------

def own_app(app, tmp_path, **env):
    from local_processes import running_app
    from repo import free_port

    port = free_port()
    return running_app(app, tmp_path / "app.log", METRICS_HTTP_SOCKET=f"127.0.0.1:{port}", **env), \
        f"http://127.0.0.1:{port}"


def status_of(url, **headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.local
@pytest.mark.parametrize("app", BACKENDS.values())
def test_metrics_answer_on_the_metrics_socket_only_and_only_metrics(app, tmp_path):
    running, metrics_url = own_app(app, tmp_path)
    with running as app_url:
        assert status_of(app_url + "/metrics") == 404  # the public socket: what nginx proxies
        assert status_of(metrics_url + "/metrics") == 200
        assert status_of(metrics_url + "/healthz") == 404
        assert status_of(metrics_url + "/ws/echo", Upgrade="websocket", Connection="Upgrade",
                         **{"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) == 404
        # Headers cannot make a public request look internal.
        assert status_of(app_url + "/metrics", Host=metrics_url.split("//")[1], **{"X-Forwarded-Port": "1"}) == 404


@pytest.mark.local
def test_app_refuses_a_metrics_socket_on_its_public_port():
    from repo import REPO, VENV_BIN, free_port

    port = free_port()  # same port, other address: every request would look internal
    env = dict(os.environ, UWSGI_HTTP_SOCKET=f"127.0.0.1:{port}", METRICS_HTTP_SOCKET=f"127.0.0.2:{port}")
    result = subprocess.run([str(VENV_BIN / "uwsgi"), "--ini", str(REPO / "uwsgi-app" / "uwsgi.ini")],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert ("startup check failed: UWSGI_HTTP_SOCKET, METRICS_HTTP_SOCKET must use different ports"
            in result.stdout + result.stderr)


def worker_pids(stats_url):
    return {worker["pid"] for worker in json.loads(fetch(stats_url)[2])["workers"] if worker["pid"]}


@pytest.mark.local
@pytest.mark.parametrize("app", BACKENDS.values())
def test_counters_are_shared_by_workers_and_a_dead_workers_connections_stop_counting(app, tmp_path):
    from repo import free_port

    stats_url = f"http://127.0.0.1:{free_port()}"
    running, metrics_url = own_app(app, tmp_path, UWSGI_PROCESSES="2", UWSGI_STATS=stats_url[len("http://"):],
                                   WS_MAX_CONNECTIONS_PER_WORKER="2", UWSGI_GEVENT="10")
    with running as app_url, contextlib.ExitStack() as clients:
        url = metrics_url + "/metrics"
        opened = 0
        while opened < 2:  # two WebSockets; a worker that is full answers 503
            try:
                clients.enter_context(connect(app_url.replace("http", "ws") + "/ws/echo", **NO_CLIENT_PINGS))
                opened += 1
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
        # The client has its 101 a moment before the server counts the connection.
        deadline = time.monotonic() + 10
        while open_connections(parse(fetch(url)[2])) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval
        # Every scrape is a new connection that any worker may take; all must agree.
        # Which worker accepts is up to the kernel (one may win every time on a busy machine),
        # so scrape until both have answered.
        texts, served_by = set(), set()
        before = {w["id"]: w["requests"] for w in json.loads(fetch(stats_url)[2])["workers"]}
        deadline = time.monotonic() + 15
        while served_by != {1, 2} and time.monotonic() < deadline:
            for _ in range(20):
                texts.add(fetch(url)[2])
            after = {w["id"]: w["requests"] for w in json.loads(fetch(stats_url)[2])["workers"]}
            served_by = {wid for wid in after if after[wid] > before.get(wid, 0)}
        assert len(texts) == 1
        assert open_connections(parse(texts.pop())) == 2
        assert served_by == {1, 2}, "all scrapes went to one worker: nothing shows the counters are shared"

        # A worker killed with connections open is respawned; its connections no longer count.
        for pid in worker_pids(stats_url):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if open_connections(parse(fetch(url)[2])) == 0:
                    break
            except OSError:
                pass  # no worker yet
            assert time.monotonic() < deadline, "the dead workers' connections are still counted"
            time.sleep(0.1)  # poll interval


@pytest.mark.local
@pytest.mark.parametrize("app", BACKENDS.values())
def test_a_full_worker_counts_its_503_refusals(app, tmp_path):
    running, metrics_url = own_app(app, tmp_path, UWSGI_PROCESSES="1", WS_MAX_CONNECTIONS_PER_WORKER="1",
                                   UWSGI_GEVENT="10")
    with running as app_url:
        with connect(app_url.replace("http", "ws") + "/ws/echo", **NO_CLIENT_PINGS) as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"  # an echo: the server has counted this connection
            for _ in range(3):
                with pytest.raises(InvalidStatus) as refused:
                    connect(app_url.replace("http", "ws") + "/ws/echo")
                assert refused.value.response.status_code == 503
            samples = parse(fetch(metrics_url + "/metrics")[2])
        assert samples[sample("wsstack_websocket_handshake_failures_total", app, reason="worker_full")] == 3
        assert samples[sample("wsstack_websocket_connections_open", app)] == 1


# --- nginx's access log -------------------------------------------------------------------------------------------

@pytest.mark.local
@pytest.mark.parametrize("backend", BACKENDS)
def test_access_log_records_upstream_timing_and_websocket_session_duration(backend, tmp_path):
    from local_processes import running_nginx
    from repo import load_stack_module

    held = 2.0
    settings = load_stack_module().load_settings(os.environ)  # the shared stack's ports, defaults included
    upstream = f"127.0.0.1:{settings['LOCAL_' + BACKENDS[backend].replace('-', '_').upper() + '_PORT']}"
    with running_nginx(tmp_path, **{f"{BACKENDS[backend].replace('-', '_')}_upstream": upstream}) as nginx_url:
        with connect(f"{nginx_url}/{backend}/ws/echo", **NO_CLIENT_PINGS) as ws:
            ws.send("x" * 1000)
            assert ws.recv(timeout=5) == "x" * 1000
            time.sleep(held)  # the session's length is what the log must show
        log = tmp_path / "access.log"
        deadline = time.monotonic() + 10
        while True:  # nginx writes the line once both sides have closed
            lines = [line for line in log.read_text().splitlines() if f'"GET /{backend}/ws/echo HTTP/1.1" 101 ' in line]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # poll interval
    assert len(lines) == 1, log.read_text()
    fields = dict(re.findall(r"(\w+)=(\S+)", lines[0]))
    assert fields["upstream"] == upstream and fields["upstream_status"] == "101"
    assert float(fields["request_time"]) >= held
    assert float(fields["upstream_time"]) >= held
    assert 0 <= float(fields["connect"]) <= float(fields["header"]) < held
    assert int(fields["upstream_sent"]) > 1000 and int(fields["upstream_received"]) > 1000  # the frames, both ways
    assert int(fields["sent"]) > 1000 and int(fields["received"]) > 0
