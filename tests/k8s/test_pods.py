"""The rendered manifests' pods, running under tests/k8s/kubelet.py (make test-k8s only).

What the integration suite cannot see from inside the tests container: how the pods were
started (user, filesystem, capabilities, environment, init), the ports they really listen on
against the NetworkPolicies, and the Deployment-level events: a rolling restart of each app
and a killed pod, with chat clients that must lose no message, and a failing liveness probe.
"""
import copy
import json
import re
import subprocess
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat_client import ChatClient, chat_url, new_room
from policies import connection_allowed, covering_policies, listening_ports

pytestmark = pytest.mark.k8s

APPS = {"uwsgi-app": "uwsgi", "flask-app": "flask"}


@pytest.fixture(autouse=True)
def through_an_nginx_pod(cluster, monkeypatch):
    """The suite's URL helpers (stack.py, chat_client.py) aimed at an nginx pod's address, and
    no token kept from another cluster: main.py runs every kustomization in one process, and
    each cluster's Redis holds a signing secret of its own (their nginx pods may share an address)."""
    import chat_client
    import stack

    nginx = cluster.deployments["nginx"].ready_pods()[0]
    monkeypatch.setattr(stack, "WS_BASE_URL", f"ws://{nginx.ip}:8080")
    monkeypatch.setattr(stack, "BASE_URL", f"http://{nginx.ip}:8080")
    monkeypatch.setattr(chat_client, "_tokens", {})


def inspect(podman_id):
    return json.loads(subprocess.run(["podman", "inspect", podman_id], capture_output=True, text=True,
                                     check=True).stdout)[0]


def in_pod(state, *argv):
    return subprocess.run(["podman", "exec", state.podman_id, *argv], capture_output=True, text=True,
                          check=True).stdout


def every_container(cluster):
    return [(pod, state) for pod in cluster.pods() for state in pod.containers]


def test_every_container_runs_with_its_security_context_and_limits(cluster):
    for pod, state in every_container(cluster):
        spec = state.spec
        context = {**pod.spec.get("securityContext", {}), **spec.get("securityContext", {})}
        status = dict(line.split(":\t", 1) for line in in_pod(state, "cat", "/proc/1/status").splitlines() if ":\t" in line)
        assert set(status["Uid"].split()) == {str(context["runAsUser"])}, pod.name
        assert set(status["Gid"].split()) == {str(context["runAsGroup"])}, pod.name
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0, pod.name
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", pod.name  # 2: a filter (RuntimeDefault)
        host = inspect(state.podman_id)["HostConfig"]
        assert host["ReadonlyRootfs"] is True, pod.name
        limits = spec["resources"]["limits"]
        assert host["Memory"] == {"Mi": 2**20, "Gi": 2**30}[limits["memory"][-2:]] * int(limits["memory"][:-2]), pod.name
        # The only writable paths are the pod's volumes.
        probe = subprocess.run(["podman", "exec", state.podman_id, "sh", "-c", "echo x > /probe-write"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, pod.name


def test_no_service_link_variable_reaches_a_pod(cluster):
    for pod, state in every_container(cluster):
        # What the container was started with (redis-server writes its title over /proc/1/environ).
        environ = dict(item.split("=", 1) for item in inspect(state.podman_id)["Config"]["Env"])
        # The API server's own Service is always there, links or not (as the kubelet does it).
        assert environ["KUBERNETES_SERVICE_HOST"] == "10.96.0.1", pod.name
        links = sorted(name for name in environ if re.fullmatch(r"(NGINX|UWSGI_APP|FLASK_APP|REDIS)_(SERVICE|PORT)\w*", name))
        assert links == [] or pod.deployment == "nginx" and links == ["NGINX_PORT"] and environ["NGINX_PORT"] == "8080", \
            (pod.name, links)


def test_app_pods_run_tini_as_pid_1_with_uwsgi_its_only_child(cluster):
    for pod, state in every_container(cluster):
        if pod.deployment in APPS:
            assert in_pod(state, "cat", "/proc/1/comm").strip() == "tini", pod.name
            children = in_pod(state, "cat", "/proc/1/task/1/children").split()
            assert len(children) == 1, pod.name
            assert in_pod(state, "cat", f"/proc/{children[0]}/comm").strip() == "uwsgi", pod.name


def test_nginx_resolves_the_apps_through_the_cluster_dns_by_their_full_names(cluster):
    for pod in cluster.deployments["nginx"].ready_pods():
        rendered = in_pod(pod.containers[0], "cat", "/etc/nginx/conf.d/default.conf")
        namespace = cluster.namespace
        assert f"set $uwsgi_app uwsgi-app.{namespace}.svc.cluster.local:8000;" in rendered
        assert f"resolver {cluster.dns_address} " in rendered
    for app in APPS:
        assert sorted(cluster.resolve(app)) == sorted(pod.ip for pod in cluster.deployments[app].ready_pods())


def test_every_listening_port_is_declared_and_opened_by_exactly_one_policy(cluster):
    policies = [obj for obj in cluster.objects if obj["kind"] == "NetworkPolicy"]
    assert policies
    for pod, state in every_container(cluster):
        listening = listening_ports(in_pod(state, "cat", "/proc/net/tcp", "/proc/net/tcp6"))
        declared = {port["containerPort"] for port in state.spec["ports"]}
        assert listening == declared, pod.name
        for port in listening:
            found = covering_policies(policies, pod.labels, state.spec, port)
            assert len(found) == 1, (pod.name, port, found)


def test_the_stacks_own_connections_are_allowed_by_the_policies(cluster):
    """Every TCP connection between pods, seen in the pods' own tables while a WebSocket is
    open, is one the NetworkPolicies allow (the plugin that would enforce them is absent)."""
    policies = [obj for obj in cluster.objects if obj["kind"] == "NetworkPolicy"]
    pods_by_ip = {pod.ip: pod for pod in cluster.pods()}
    room = new_room()
    with ChatClient("uwsgi", room, "a"), ChatClient("flask", room, "b"):
        seen = 0
        for pod, state in every_container(cluster):
            table = in_pod(state, "cat", "/proc/net/tcp")
            for local_port, remote_ip, remote_port in established(table):
                peer = pods_by_ip.get(remote_ip)
                if peer is None:
                    continue  # the host: the probes and this test's clients
                if local_port in {p["containerPort"] for p in state.spec["ports"]}:
                    seen += 1
                    assert connection_allowed(policies, peer, pod, state.spec, local_port), (peer.name, pod.name, local_port)
    assert seen >= 3  # nginx -> each app, each app -> redis


def established(table):
    for line in table.splitlines()[1:]:
        fields = line.split()
        if fields[3] != "01":
            continue
        local, remote = fields[1], fields[2]
        ip_hex, port_hex = remote.split(":")
        ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
        yield int(local.split(":")[1], 16), ip, int(port_hex, 16)


class Listener(threading.Thread):
    """A chat client that, whenever its connection closes, comes back with last_id."""

    def __init__(self, backend, room, user):
        super().__init__(daemon=True)
        self.backend, self.room, self.user = backend, room, user
        self.texts, self.closes, self.errors = [], [], []
        self.last_id = None
        self.done = threading.Event()
        self.client = self.connect()

    def connect(self):
        deadline = time.monotonic() + 60
        while True:
            try:
                client = ChatClient(self.backend, self.room, self.user,
                                    url=chat_url(self.backend, self.room, self.last_id))
            except (OSError, InvalidStatus, ConnectionClosed) as exc:
                if time.monotonic() > deadline:
                    raise
                self.errors.append(repr(exc))
                time.sleep(0.5)
                continue
            self.record(client.history)
            return client

    def record(self, events):
        for event in events:
            self.texts.append(event["text"])
            self.last_id = event["id"]

    def run(self):
        while not self.done.is_set():
            try:
                event = self.client.next_event(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
                self.client = self.connect()
                continue
            if event["type"] == "message":
                self.record([event])
        self.client.close()


def chat_through(event, backend, listeners=4, other=None):
    """Listeners on `backend` and a writer on the other backend while `event()` runs; returns
    (sent texts, listeners) once every listener has had the time to catch up."""
    room = new_room()
    other = other or next(b for b in APPS.values() if b != backend)
    group = [Listener(backend, room, f"l{i}") for i in range(listeners)]
    for listener in group:
        listener.start()
    writer = ChatClient(other, room, "writer")
    sent, stop = [], threading.Event()

    def write():
        while not stop.is_set():
            text = f"m{len(sent)}"
            writer.say(text)
            sent.append(text)
            time.sleep(0.1)
    def drain():  # the writer gets its own messages too: read them, or they pile up on the app
        while not stop.is_set():
            try:
                writer.next_event(timeout=0.5)
            except TimeoutError:
                pass
    writing = threading.Thread(target=write, daemon=True)
    draining = threading.Thread(target=drain, daemon=True)
    writing.start()
    draining.start()
    try:
        event()
        time.sleep(2)
    finally:
        stop.set()
        writing.join()
        draining.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(len(listener.texts) < len(sent) for listener in group):
        time.sleep(0.2)
    for listener in group:
        listener.done.set()
        listener.join(10)
    writer.close()
    return sent, group


@pytest.mark.parametrize("app", sorted(APPS))
def test_a_rolling_restart_sends_1001_and_the_clients_resume_without_loss(cluster, app):
    deployment = cluster.deployments[app]
    before = {pod.name: pod for pod in deployment.ready_pods()}
    sent, listeners = chat_through(deployment.rolling_restart, APPS[app])
    after = {pod.name for pod in deployment.ready_pods()}
    assert len(after) == deployment.replicas and not after & set(before)
    for listener in listeners:
        assert listener.texts == sent, (listener.user, listener.closes, listener.errors)
        assert listener.closes and set(listener.closes) == {1001}, listener.closes
    for pod in before.values():
        # Each old pod stopped by itself within its grace period: exit 0, not the SIGKILL's 137.
        assert [code for code, why in pod.containers[0].exits] == [0], (pod.name, pod.containers[0].exits)


def test_a_killed_app_pod_is_replaced_and_its_clients_resume_without_loss(cluster):
    deployment = cluster.deployments["uwsgi-app"]
    victim = deployment.ready_pods()[0]
    replicas = deployment.replicas

    def kill_and_wait():
        victim.kill()
        deadline = time.monotonic() + 90
        while len([p for p in deployment.ready_pods() if p is not victim]) < replicas:
            assert time.monotonic() < deadline, "no replacement pod ready within 90 s"
            time.sleep(0.5)
    sent, listeners = chat_through(kill_and_wait, "uwsgi")
    assert victim.name not in {pod.name for pod in deployment.ready_pods()}
    for listener in listeners:
        assert listener.texts == sent, (listener.user, listener.closes, listener.errors)


def test_a_failing_liveness_probe_restarts_the_container_in_its_pod(cluster):
    """A copy of the uwsgi-app Deployment whose liveness probe asks for a page that does not
    exist (404): the kubelet kills the container after failureThreshold failures (preStop, then
    SIGTERM) and starts it again in the same pod."""
    if cluster.namespace != "default":
        pytest.skip("once is enough: runs on k8s/base")
    obj = copy.deepcopy(cluster.deployments["uwsgi-app"].obj)
    obj["metadata"]["name"] = "liveness-check"
    obj["spec"]["replicas"] = 1
    # Its own name label: no Service selects it, nginx never sends it a client.
    obj["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "liveness-check"}
    obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "liveness-check"
    container = obj["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"].update(httpGet={"path": "/no-such-page", "port": "http"}, periodSeconds=1,
                                      failureThreshold=2)
    deployment = cluster.add_deployment(obj)
    [pod] = deployment.pods
    state = pod.containers[0]
    deadline = time.monotonic() + 90
    while state.restarts < 1 or not state.started:
        assert time.monotonic() < deadline, state.exits
        time.sleep(0.5)
    code, why = state.exits[0]
    assert why == "livenessProbe failed 2 times" and code == 0, state.exits
    assert deployment.pods == [pod]  # the same pod, its address kept: a container restart
    cluster.remove_deployment("liveness-check")
