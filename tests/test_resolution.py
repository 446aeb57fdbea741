"""nginx follows a backend to a new address without a restart (local mode).

What `docker compose up --force-recreate` or `--scale` does to nginx, reproduced with local
processes: the apps are reached by service name through the project's own DNS server
(scripts/localdns.py, dnsmasq on loopback, as `make run` uses it), and a backend comes back on
another 127.0.0.x address with its record updated. New connections must reach it within
NGINX_RESOLVER_VALID; connections to the other backend must not notice.
"""
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from websockets.sync.client import connect

from local_processes import running_nginx, start_app, stop, wait_healthy
from repo import free_port, load_script

pytestmark = pytest.mark.local

VALID = 2  # NGINX_RESOLVER_VALID of this test's nginx, in seconds
# Time for nginx's cached answer to expire, plus one poll and the new instance's first answer.
MARGIN = 1.5


class Dns:
    """A dnsmasq of the test's own, its records in a hosts file under tmp_path."""

    def __init__(self, tmp_path, records):
        self.localdns = load_script("localdns")
        self.port = free_port()
        self.hosts_file = tmp_path / "dns-hosts"
        self.records = dict(records)
        self.localdns.write_hosts(self.hosts_file, self.records)
        self.process = subprocess.Popen(self.localdns.dnsmasq_argv(self.hosts_file, self.port, VALID),
                                        stdout=open(tmp_path / "dns.log", "w"), stderr=subprocess.STDOUT)
        self._wait_for(records)

    def update(self, **records):
        """Rewrite the records, have dnsmasq reread them, and return once it answers with them."""
        self.records.update({name.replace("_", "-"): addresses for name, addresses in records.items()})
        self.localdns.write_hosts(self.hosts_file, self.records)
        self.process.send_signal(signal.SIGHUP)
        self._wait_for(self.records)

    def _wait_for(self, records):
        deadline = time.monotonic() + 10
        while True:
            try:
                if all(sorted(self.localdns.query_a(name, self.port)) == sorted(addresses)
                       for name, addresses in records.items()):
                    return
            except OSError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "dnsmasq did not answer"
            time.sleep(0.05)


class LossyRelay:
    """A UDP relay in front of a DNS server that drops the first DROP queries it gets: a lost
    datagram, as a DNS server that is reloading (aardvark-dns under podman) or a busy network
    loses one. Answers go back to whoever asked, by the query's id."""

    def __init__(self, dns_port, drop):
        self.dns_port, self.drop, self.queries = dns_port, drop, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.connect(("127.0.0.1", dns_port))
        self.askers = {}
        for loop in (self._queries, self._answers):
            threading.Thread(target=loop, daemon=True).start()

    def _queries(self):
        while True:
            query, asker = self.sock.recvfrom(4096)
            self.queries += 1
            if self.queries > self.drop:
                self.askers[query[:2]] = asker
                self.upstream.send(query)

    def _answers(self):
        while True:
            answer = self.upstream.recv(4096)
            if answer[:2] in self.askers:
                self.sock.sendto(answer, self.askers.pop(answer[:2]))


def through(nginx_ws, path, timeout=5):
    """(status, JSON body or None) of an HTTP GET through nginx."""
    try:
        with urllib.request.urlopen("http" + nginx_ws.removeprefix("ws") + path, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def echo(ws, text):
    ws.send(text)
    assert ws.recv(timeout=5) == text


@pytest.fixture
def apps_by_name(tmp_path):
    """uwsgi-app and flask-app on 127.0.0.1, both reached by name through their own nginx."""
    ports = {"uwsgi-app": free_port(), "flask-app": free_port()}
    dns = Dns(tmp_path, {"uwsgi-app": ["127.0.0.1"], "flask-app": ["127.0.0.1"]})
    started = []

    def start(app, host, log_name):
        process, url = start_app(app, tmp_path / log_name, host=host, port=ports[app], UWSGI_PROCESSES="1")
        started.append(process)
        wait_healthy(process, url)
        # The id its /healthz names it by (what tells instances apart through nginx)
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
            process.instance = json.loads(response.read())["instance"]
        return process

    try:
        first = {app: start(app, "127.0.0.1", f"{app}-first.log") for app in ports}
        with running_nginx(tmp_path, uwsgi_app_upstream=f"uwsgi-app:{ports['uwsgi-app']}",
                           flask_app_upstream=f"flask-app:{ports['flask-app']}",
                           NGINX_RESOLVER=f"127.0.0.1:{dns.port}", NGINX_RESOLVER_VALID=f"{VALID}s") as nginx_ws:
            yield nginx_ws, dns, first, start
    finally:
        for process in started:
            stop(process)
        stop(dns.process)


def poll_until_served_by(nginx_ws, instances, deadline_after):
    """Ask /uwsgi/healthz through nginx until every app instance in INSTANCES has answered; return
    (seconds it took, statuses seen). Fails if that takes longer than DEADLINE_AFTER."""
    started, seen, statuses = time.monotonic(), set(), []
    while not instances <= seen:
        assert time.monotonic() - started < deadline_after, f"only {seen} of {instances} reached; statuses {statuses}"
        status, body = through(nginx_ws, "/uwsgi/healthz")
        statuses.append(status)
        if status == 200:
            seen.add(body["instance"])
            # Paced below nginx's per-address request rate on the app locations
            # (NGINX_WS_HANDSHAKES_PER_SECOND): a 429 here would be this loop's, not a lost backend.
            time.sleep(0.02)
        else:
            time.sleep(0.1)
    return time.monotonic() - started, statuses


def test_a_backend_recreated_on_a_new_address_is_followed_within_the_ttl(apps_by_name):
    nginx_ws, dns, first, start = apps_by_name
    assert through(nginx_ws, "/uwsgi/healthz")[1]["instance"] == first["uwsgi-app"].instance
    with connect(nginx_ws + "/flask/ws/echo") as bystander, connect(nginx_ws + "/uwsgi/ws/echo") as old:
        echo(bystander, "before")
        echo(old, "before")

        # As compose --force-recreate: the old container goes, a new one comes with another address.
        stop(first["uwsgi-app"])
        recreated = start("uwsgi-app", "127.0.0.7", "uwsgi-app-recreated.log")
        dns.update(uwsgi_app=["127.0.0.7"])
        updated = time.monotonic()
        took, statuses = poll_until_served_by(nginx_ws, {recreated.instance}, VALID + MARGIN)

        # Refused connections (502) only until nginx's cached answer expired, then never again.
        # Each nginx worker caches on its own: the last copy of the old address has expired
        # VALID seconds after the update at the latest.
        assert set(statuses) <= {502, 200} and statuses[-1] == 200, statuses
        time.sleep(max(0.0, updated + VALID + 0.2 - time.monotonic()))
        for _ in range(20):
            status, body = through(nginx_ws, "/uwsgi/healthz")
            assert (status, body["instance"]) == (200, recreated.instance)
        with connect(nginx_ws + "/uwsgi/ws/echo") as fresh:
            echo(fresh, "after")

        # The WebSocket on the other backend never noticed.
        echo(bystander, "after")
    print(f"followed the new address after {took:.2f}s with {statuses.count(502)} answers of 502")


def test_a_backend_scaled_out_gets_new_connections_within_the_ttl(apps_by_name):
    nginx_ws, dns, first, start = apps_by_name
    with connect(nginx_ws + "/uwsgi/ws/echo") as existing:
        echo(existing, "before")
        # As compose --scale uwsgi-app=2: a second address for the same name.
        second = start("uwsgi-app", "127.0.0.8", "uwsgi-app-second.log")
        dns.update(uwsgi_app=["127.0.0.1", "127.0.0.8"])
        _took, statuses = poll_until_served_by(nginx_ws, {first["uwsgi-app"].instance, second.instance}, VALID + MARGIN)
        # Both instances were up all along: not one request failed.
        assert set(statuses) == {200}, statuses
        echo(existing, "after")


def test_a_lost_dns_answer_is_asked_again_not_answered_with_a_502(tmp_path):
    # nginx asks again after a fixed 5 s (its resolver's resend interval); resolver_timeout must
    # leave room for that, or one lost datagram is a 502 for every request waiting on the name
    # (it was: under podman, aardvark-dns drops queries while it reloads for a container change).
    port = free_port()
    dns = Dns(tmp_path, {"uwsgi-app": ["127.0.0.1"], "flask-app": ["127.0.0.1"]})
    relay = LossyRelay(dns.port, drop=1)
    app, url = start_app("uwsgi-app", tmp_path / "uwsgi-app.log", host="127.0.0.1", port=port, UWSGI_PROCESSES="1")
    try:
        wait_healthy(app, url)
        with running_nginx(tmp_path, uwsgi_app_upstream=f"uwsgi-app:{port}", flask_app_upstream=f"flask-app:{port}",
                           NGINX_RESOLVER=f"127.0.0.1:{relay.port}", NGINX_WORKER_PROCESSES="1") as nginx_ws:
            started = time.monotonic()
            status, body = through(nginx_ws, "/uwsgi/healthz", timeout=30)
            took = time.monotonic() - started
    finally:
        stop(app)
        stop(dns.process)
    assert (status, relay.queries) == (200, 2), (status, relay.queries)
    assert body["status"] == "ok"
    print(f"answered 200 after {took:.2f}s: the first query was lost, the second answered")
