"""TEST INFRASTRUCTURE: run rendered Kubernetes manifests with podman, as a kubelet would.

No cluster and no kubelet are available here; podman is. This starts every Deployment's pod
template the way the kubelet starts it, so that what only shows at run time (the environment
the kubelet builds, the security context, probes, termination) is exercised for real. What it
reproduces, and what it does not, is listed in docs/kubernetes.md ("What make test-k8s runs");
a pod-spec field it does not implement is refused (UnsupportedField), never ignored.

One podman pod per Kubernetes pod (its infra container holds the network namespace, so a
restarted container keeps the pod's address, as a pod sandbox does), on a podman network of
its own without podman's DNS. Service names are answered by a dnsmasq this module starts on
the network's gateway address: <service>.<namespace>.svc.cluster.local resolves to the pods
that are Ready and not terminating, which is what the endpoints controller and CoreDNS give a
headless Service. The pods search <namespace>.svc.cluster.local, svc.cluster.local and
cluster.local with ndots:5, like the kubelet's resolv.conf.
"""
import copy
import hashlib
import http.client
import ipaddress
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import localdns  # noqa: E402  (make run's dnsmasq helpers)

CLUSTER_DOMAIN = "cluster.local"
# The API server's own Service, whose variables the kubelet gives every pod, links or not.
MASTER_SERVICE = {"name": "kubernetes", "ip": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}
# The kubelet's restart back-off: 10 s, doubled after each restart, at most 5 min.
BACKOFF_START, BACKOFF_MAX = 10, 300
PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                  "failureThreshold": 3}
# What this module implements; anything else in a pod spec is refused.
POD_FIELDS = {"containers", "securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken",
              "enableServiceLinks", "volumes", "topologySpreadConstraints", "restartPolicy"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "envFrom", "ports", "lifecycle", "startupProbe",
                    "readinessProbe", "livenessProbe", "securityContext", "resources", "volumeMounts",
                    "imagePullPolicy"}
SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "allowPrivilegeEscalation",
                   "readOnlyRootFilesystem", "capabilities", "supplementalGroups", "privileged"}


class UnsupportedField(Exception):
    pass


def log(message):
    print(f"kubelet: {message}", flush=True)


def podman(*args, check=True, timeout=120):
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result


def render(kustomization):
    """The objects kustomize makes of a kustomization (kubectl's built-in kustomize)."""
    out = subprocess.run([str(REPO / ".venv" / "bin" / "kubectl"), "kustomize", str(REPO / kustomization)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def env_name(service_name):
    """A Service name as the kubelet spells it in variable names (envvars.go)."""
    return service_name.upper().replace("-", "_")


def service_link_variables(services):
    """The Docker-link variables the kubelet makes for these Services (pkg/kubelet/envvars)."""
    env = {}
    for service in services:
        name, ip, ports = env_name(service["name"]), service["ip"], service["ports"]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{env_name(port['name'])}"] = str(port["port"])
        for index, port in enumerate(ports):
            protocol = port.get("protocol", "TCP")
            url = f"{protocol.lower()}://{ip}:{port['port']}"
            if index == 0:
                env[f"{name}_PORT"] = url
            prefix = f"{name}_PORT_{port['port']}_{protocol.upper()}"
            env.update({prefix: url, f"{prefix}_PROTO": protocol.lower(), f"{prefix}_PORT": str(port["port"]),
                        f"{prefix}_ADDR": ip})
    return env


EXPANSION = re.compile(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))")


def expand(value, *mappings):
    """Kubernetes' $(VAR) expansion: $$ is a literal $, an unknown $(VAR) stays as written."""
    def replace(match):
        if match.group(1) == "$":
            return "$"
        for mapping in mappings:
            if match.group(2) in mapping:
                return mapping[match.group(2)]
        return match.group(0)
    return EXPANSION.sub(replace, value)


def quantity_bytes(value):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?|k)?", str(value)).groups()
    return int(number) * units.get(unit, 1)


def quantity_cpus(value):
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


def selects(selector, labels):
    return bool(selector) and selector.items() <= labels.items()


@dataclass
class ContainerState:
    spec: dict
    name: str
    restarts: int = 0
    started: bool = False
    ready: bool = False
    exits: list = field(default_factory=list)  # (exit code, why) of every run that ended


class Pod:
    """One Kubernetes pod: a podman pod and its containers, each watched by a thread."""

    def __init__(self, cluster, deployment, template, template_hash):
        self.cluster, self.deployment, self.template_hash = cluster, deployment, template_hash
        self.metadata = copy.deepcopy(template["metadata"])
        self.spec = copy.deepcopy(template["spec"])
        self.name = f"{deployment}-{template_hash}-{secrets.token_hex(3)[:5]}"
        self.podman_name = f"{cluster.prefix}-{self.name}"
        self.labels = {**self.metadata.get("labels", {}), "pod-template-hash": template_hash}
        self.ip = None
        self.terminating = threading.Event()
        self.gone = threading.Event()
        self.volume_dir = cluster.run_dir / "pods" / self.name
        self.containers = [ContainerState(spec, spec["name"]) for spec in self.spec["containers"]]
        self.threads = []
        self.check_fields()

    def check_fields(self):
        unknown = set(self.spec) - POD_FIELDS
        if unknown:
            raise UnsupportedField(f"{self.deployment}: pod spec fields not reproduced: {sorted(unknown)}")
        if self.spec.get("automountServiceAccountToken", True):
            raise UnsupportedField(f"{self.deployment}: a service account token is not reproduced")
        if self.spec.get("restartPolicy", "Always") != "Always":
            raise UnsupportedField(f"{self.deployment}: only restartPolicy Always (a Deployment's) is reproduced")
        for container in self.spec["containers"]:
            unknown = set(container) - CONTAINER_FIELDS
            if unknown:
                raise UnsupportedField(f"{self.deployment}/{container['name']}: fields not reproduced: {sorted(unknown)}")
        for context in [self.spec.get("securityContext", {})] + [c.get("securityContext", {}) for c in self.spec["containers"]]:
            unknown = set(context) - SECURITY_FIELDS
            if unknown:
                raise UnsupportedField(f"{self.deployment}: securityContext fields not reproduced: {sorted(unknown)}")

    @property
    def ready(self):
        return all(c.ready for c in self.containers) and not self.terminating.is_set()

    # --- sandbox and volumes -------------------------------------------------------------

    def create_sandbox(self):
        cluster = self.cluster
        search = [f"{cluster.namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]
        podman("pod", "create", "--name", self.podman_name, "--hostname", self.name, "--network", cluster.network,
               "--dns", cluster.dns_address, *[arg for domain in search for arg in ("--dns-search", domain)],
               "--dns-opt", "ndots:5", "--label", f"k8s-test={cluster.prefix}")
        podman("pod", "start", self.podman_name)
        infra = podman("pod", "inspect", self.podman_name, "--format", "{{.InfraContainerID}}").stdout.strip()
        self.ip = podman("inspect", infra, "--format",
                         "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").stdout.strip()
        self.make_volumes()

    def make_volumes(self):
        """emptyDir: a directory per pod, shared by its containers and kept across their restarts
        (mode 0777, as the kubelet makes it); configMap and secret: their keys as files."""
        self.volumes = {}
        for volume in self.spec.get("volumes", []):
            path = self.volume_dir / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                if volume["emptyDir"].get("medium"):
                    raise UnsupportedField(f"{self.deployment}: emptyDir medium {volume['emptyDir']['medium']}")
                path.chmod(0o777)
                self.volumes[volume["name"]] = (path, False)
            elif "configMap" in volume or "secret" in volume:
                kind, ref = ("configMap", volume["configMap"]) if "configMap" in volume else ("secret", volume["secret"])
                data = self.cluster.config_data(kind, ref["name" if kind == "configMap" else "secretName"])
                items = ref.get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    target.chmod(item.get("mode", ref.get("defaultMode", 0o644)))
                path.chmod(0o755)
                self.volumes[volume["name"]] = (path, True)
            else:
                raise UnsupportedField(f"{self.deployment}: volume {volume['name']} of a kind not reproduced")

    # --- the container's run-time settings ---------------------------------------------

    def environment(self, container):
        """The kubelet's makeEnvironmentVariables: service links (unless disabled) under
        envFrom, under env, each env value expanded against what precedes it."""
        links = [MASTER_SERVICE]
        if self.spec.get("enableServiceLinks", True):
            links += self.cluster.services_for_links
        service_env = service_link_variables(links)
        env = {}
        for source in container.get("envFrom", []):
            kind = "configMap" if "configMapRef" in source else "secret"
            data = self.cluster.config_data(kind, source[f"{kind}Ref"]["name"])
            for key, value in data.items():
                env[source.get("prefix", "") + key] = value
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env, service_env)
            else:
                env[item["name"]] = self.value_from(item["valueFrom"])
        for name, value in service_env.items():
            env.setdefault(name, value)
        return env

    def value_from(self, source):
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {"metadata.name": self.name, "metadata.namespace": self.cluster.namespace,
                      "status.podIP": self.ip, "spec.nodeName": "podman"}
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            if label:
                return self.labels.get(label.group(1), "")
            return fields[path]
        for kind in ("configMap", "secret"):
            if f"{kind}KeyRef" in source:
                ref = source[f"{kind}KeyRef"]
                return self.cluster.config_data(kind, ref["name"])[ref["key"]]
        raise UnsupportedField(f"{self.deployment}: valueFrom {sorted(source)}")

    def security_args(self, container, image_user):
        context = {**self.spec.get("securityContext", {}), **container.get("securityContext", {})}
        args = []
        user = context.get("runAsUser")
        image_uid = image_user.split(":")[0] if image_user else "0"
        if context.get("runAsNonRoot"):
            if user is None and not image_uid.isdigit():
                raise RuntimeError(f"{self.deployment}: runAsNonRoot and the image has a non-numeric user {image_user!r}")
            if (user if user is not None else int(image_uid)) == 0:
                raise RuntimeError(f"{self.deployment}: container has runAsNonRoot and image will run as root")
        if user is not None or "runAsGroup" in context:
            uid = user if user is not None else image_uid
            args += ["--user", f"{uid}:{context['runAsGroup']}" if "runAsGroup" in context else str(uid)]
        for group in context.get("supplementalGroups", []):
            args += ["--group-add", str(group)]
        if context.get("privileged"):
            args.append("--privileged")
        if context.get("readOnlyRootFilesystem"):
            # Only the pod's volumes are writable (podman would add tmpfs of its own otherwise).
            args += ["--read-only", "--read-only-tmpfs=false"]
        if context.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for capability in context.get("capabilities", {}).get("drop", []):
            args.append(f"--cap-drop={capability}")
        for capability in context.get("capabilities", {}).get("add", []):
            args.append(f"--cap-add={capability}")
        seccomp = context.get("seccompProfile", {}).get("type", "Unconfined")
        if seccomp == "Unconfined":  # the kubelet's default without SeccompDefault
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":  # RuntimeDefault: podman's default profile
            raise UnsupportedField(f"{self.deployment}: seccompProfile {seccomp}")
        return args

    def resource_args(self, container):
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        args = []
        if "memory" in limits:
            args += ["--memory", str(quantity_bytes(limits["memory"])), "--memory-swap", str(quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", str(quantity_cpus(limits["cpu"]))]
        if "cpu" in requests:  # the kubelet's cpu.shares: 1024 per requested CPU
            args += ["--cpu-shares", str(max(2, int(quantity_cpus(requests["cpu"]) * 1024)))]
        return args

    def run_container(self, state):
        container = state.spec
        image = self.cluster.images.get(container["image"], container["image"])
        image_user = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
        env = self.environment(container)
        argv = ["run", "--detach", "--pull=never", "--pod", self.podman_name,
                "--name", f"{self.podman_name}-{state.name}-{state.restarts}", "--restart=no",
                "--label", f"k8s-test={self.cluster.prefix}", *self.cluster.run_args,
                *self.security_args(container, image_user), *self.resource_args(container)]
        for name, value in env.items():
            argv += ["--env", f"{name}={value}"]
        for mount in container.get("volumeMounts", []):
            path, read_only = self.volumes[mount["name"]]
            if set(mount) - {"name", "mountPath", "readOnly"}:
                raise UnsupportedField(f"{self.deployment}: volumeMount fields {sorted(mount)}")
            argv += ["--volume", f"{path}:{mount['mountPath']}:{'ro' if read_only or mount.get('readOnly') else 'rw'}"]
        # command replaces the image's ENTRYPOINT and drops its CMD; args replace CMD.
        if "command" in container:
            argv += ["--entrypoint", json.dumps([expand(a, env) for a in container["command"]])]
        argv.append(image)
        argv += [expand(a, env) for a in container.get("args", [])]
        return podman(*argv).stdout.strip()

    # --- probes and hooks (executed by the "kubelet", from outside the container) -----------

    def port_number(self, container, port):
        if isinstance(port, int):
            return port
        return {p["name"]: p["containerPort"] for p in container.get("ports", [])}[port]

    def handler(self, container, podman_id, action, timeout):
        """Run a probe or hook action; True when it succeeds."""
        if "httpGet" in action:
            get = action["httpGet"]
            port = self.port_number(container, get["port"])
            host = get.get("host", self.ip)
            try:
                if get.get("scheme", "HTTP") == "HTTPS":
                    connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                             context=ssl._create_unverified_context())
                else:
                    connection = http.client.HTTPConnection(host, port, timeout=timeout)
                headers = {"User-Agent": "kube-probe/1.30", "Accept": "*/*",
                           **{h["name"]: h["value"] for h in get.get("httpHeaders", [])}}
                connection.request("GET", get.get("path", "/"), headers=headers)
                status = connection.getresponse().status
                connection.close()
                return 200 <= status < 400
            except OSError:
                return False
        if "tcpSocket" in action:
            try:
                with socket.create_connection((self.ip, self.port_number(container, action["tcpSocket"]["port"])),
                                              timeout=timeout):
                    return True
            except OSError:
                return False
        if "exec" in action:
            try:
                return podman("exec", podman_id, *action["exec"]["command"], check=False,
                              timeout=timeout + 10).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        if "sleep" in action:
            time.sleep(action["sleep"]["seconds"])
            return True
        raise UnsupportedField(f"{self.deployment}: probe or hook {sorted(action)}")

    def running(self, podman_id):
        result = podman("inspect", podman_id, "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                        check=False)
        return result.stdout.split() if result.returncode == 0 else ["gone", "-1", "false"]

    def stop_container(self, state, podman_id, grace):
        """The kubelet's killContainer: preStop within the grace period, then the image's stop
        signal (podman stop, as the CRI's StopContainer) and SIGKILL when the rest runs out."""
        started = time.monotonic()
        hook = state.spec.get("lifecycle", {}).get("preStop")
        if hook:
            hook_thread = threading.Thread(target=self.handler, args=(state.spec, podman_id, hook, grace), daemon=True)
            hook_thread.start()
            hook_thread.join(grace)
        # At least 2 s for the signal after a preStop hook that took the whole grace period.
        remaining = max(2, int(round(grace - (time.monotonic() - started))))
        podman("stop", "--time", str(remaining), podman_id, check=False, timeout=remaining + 60)

    def watch(self, state):
        """One container's life: start, probes, restarts with back-off, until the pod goes."""
        backoff = BACKOFF_START
        while not self.terminating.is_set():
            try:
                podman_id = self.run_container(state)
            except RuntimeError as exc:  # the kubelet's CreateContainerError
                log(f"{self.name}/{state.name}: {exc}")
                state.exits.append((None, str(exc)))
                if self.terminating.wait(backoff):
                    return
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            state.podman_id = podman_id
            why = self.probe_until_exit(state, podman_id)
            if self.terminating.is_set():  # delete() records how it ended
                return
            status, code, oom = self.running(podman_id)
            state.started = state.ready = False
            self.cluster.endpoints_changed()
            if why is None:
                why = "OOMKilled" if oom == "true" else "exited"
            state.exits.append((int(code), why))
            log(f"{self.name}/{state.name}: {why} (exit {code}); restart {state.restarts + 1} in {backoff}s")
            if self.terminating.wait(backoff):
                return
            state.restarts += 1
            backoff = min(backoff * 2, BACKOFF_MAX)

    def probe_until_exit(self, state, podman_id):
        """Run the probes on their own schedules until the container ends; a liveness or
        startup failure kills it (and returns why), a stop of the pod returns None."""
        spec = state.spec
        probes = {kind: {**PROBE_DEFAULTS, **spec[kind]} for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                  if kind in spec}
        started_at = time.monotonic()
        next_run = {kind: started_at + probe["initialDelaySeconds"] for kind, probe in probes.items()}
        failures = dict.fromkeys(probes, 0)
        successes = dict.fromkeys(probes, 0)
        state.started = "startupProbe" not in probes
        state.ready = "readinessProbe" not in probes and state.started
        self.cluster.endpoints_changed()
        # One `podman wait` per container tells when it ends; polling podman for its state
        # would cost more CPU than the pods themselves.
        exited = threading.Event()
        threading.Thread(target=lambda: (podman("wait", podman_id, check=False, timeout=None), exited.set()),
                         daemon=True).start()
        while not self.terminating.is_set():
            if exited.is_set():
                return None
            now = time.monotonic()
            for kind, probe in probes.items():
                if now < next_run[kind] or (kind != "startupProbe" and not state.started) or \
                        (kind == "startupProbe" and state.started):
                    continue
                next_run[kind] = now + probe["periodSeconds"]
                ok = self.handler(spec, podman_id, probe, probe["timeoutSeconds"])
                if ok:
                    failures[kind], successes[kind] = 0, successes[kind] + 1
                else:
                    failures[kind], successes[kind] = failures[kind] + 1, 0
                if kind == "startupProbe" and ok:
                    state.started = True
                    now = time.monotonic()
                    next_run = {k: now for k in probes}
                    if "readinessProbe" not in probes:
                        state.ready = True
                        self.cluster.endpoints_changed()
                elif kind == "readinessProbe":
                    ready = successes[kind] >= probe["successThreshold"] if ok else \
                        (state.ready and failures[kind] < probe["failureThreshold"])
                    if ready != state.ready:
                        state.ready = ready
                        self.cluster.endpoints_changed()
                if kind in ("livenessProbe", "startupProbe") and failures[kind] >= probe["failureThreshold"]:
                    why = f"{kind} failed {failures[kind]} times"
                    log(f"{self.name}/{state.name}: {why}; killing it")
                    state.ready = False
                    self.cluster.endpoints_changed()
                    grace = probe.get("terminationGracePeriodSeconds", self.spec.get("terminationGracePeriodSeconds", 30))
                    self.stop_container(state, podman_id, grace)
                    return why
            due = [next_run[kind] for kind in probes if (kind == "startupProbe") != state.started]
            exited.wait(max(0.05, min(due, default=now + 1) - time.monotonic()) if due else 1)
        return None

    # --- life cycle ------------------------------------------------------------------------

    def start(self):
        self.create_sandbox()
        for state in self.containers:
            thread = threading.Thread(target=self.watch, args=(state,), name=f"{self.name}/{state.name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def delete(self, grace=None):
        """kubectl delete pod: out of the endpoints at once, then each container's stop."""
        if self.terminating.is_set():
            self.gone.wait()
            return
        self.terminating.set()
        self.cluster.endpoints_changed()
        grace = self.spec.get("terminationGracePeriodSeconds", 30) if grace is None else grace
        stoppers = [threading.Thread(target=self.stop_container, args=(state, state.podman_id, grace))
                    for state in self.containers if getattr(state, "podman_id", None)]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for thread in self.threads:
            thread.join(30)
        self.collect_exits()
        self.save_logs()
        podman("pod", "rm", "--force", self.podman_name, check=False)
        self.gone.set()

    def collect_exits(self):
        for state in self.containers:
            if getattr(state, "podman_id", None):
                _, code, _ = self.running(state.podman_id)
                state.exits.append((int(code), "deleted"))

    def save_logs(self):
        for state in self.containers:
            (self.cluster.run_dir / f"{self.name}.{state.name}.log").write_text(self.logs(state.name))

    def kill(self):
        """The pod vanishes at once (its node died, or kubectl delete --force --grace-period=0)."""
        self.terminating.set()
        podman("pod", "rm", "--force", "--time", "0", self.podman_name, check=False)
        self.cluster.endpoints_changed()
        self.gone.set()

    def logs(self, container=None):
        state = self.containers[0] if container is None else next(c for c in self.containers if c.name == container)
        if not getattr(state, "podman_id", None):
            return ""
        result = podman("logs", state.podman_id, check=False)
        return result.stdout + result.stderr


class Deployment:
    """The Deployment and ReplicaSet controllers, for one Deployment: keep `replicas` pods of
    the current template, replace any that disappear, and roll out a new template."""

    def __init__(self, cluster, obj):
        self.cluster, self.obj = cluster, obj
        self.name = obj["metadata"]["name"]
        self.replicas = obj["spec"].get("replicas", 1)
        self.template = obj["spec"]["template"]
        self.pods = []
        self.lock = threading.RLock()
        self.paused = False

    def template_hash(self):
        return hashlib.sha256(json.dumps(self.template, sort_keys=True).encode()).hexdigest()[:10]

    def new_pod(self):
        pod = Pod(self.cluster, self.name, self.template, self.template_hash())
        with self.lock:
            self.pods.append(pod)
        pod.start()
        return pod

    def reconcile(self):
        """Replace pods that are gone (killed, not deleted by a rollout)."""
        with self.lock:
            if self.paused:
                return
            vanished = [pod for pod in self.pods if pod.gone.is_set()]
            for pod in vanished:
                self.pods.remove(pod)
            missing = self.replicas - len([p for p in self.pods if not p.terminating.is_set()])
        for _ in range(missing):
            log(f"{self.name}: {missing} replica(s) missing, creating a pod")
            self.new_pod()

    def ready_pods(self):
        with self.lock:
            return [pod for pod in self.pods if pod.ready]

    def rolling_restart(self, timeout=300):
        """kubectl rollout restart + rollout status: a new template (the restartedAt
        annotation), pods replaced within maxSurge and maxUnavailable (25 % each by default)."""
        strategy = self.obj["spec"].get("strategy", {})
        if strategy.get("type") == "Recreate":
            raise UnsupportedField("rollout of a Recreate Deployment")
        rolling = strategy.get("rollingUpdate", {})
        surge = self.percent(rolling.get("maxSurge", "25%"), round_up=True)
        unavailable = self.percent(rolling.get("maxUnavailable", "25%"), round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1  # what the API server would refuse; kept from a deadlock here
        with self.lock:
            self.paused = True
            annotations = self.template["metadata"].setdefault("annotations", {})
            annotations["kubectl.kubernetes.io/restartedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            new_hash = self.template_hash()
        deadline = time.monotonic() + timeout
        stopping = []
        try:
            while True:
                with self.lock:
                    old = [p for p in self.pods if p.template_hash != new_hash and not p.terminating.is_set()]
                    new = [p for p in self.pods if p.template_hash == new_hash and not p.terminating.is_set()]
                if not old and len(new) >= self.replicas and all(p.ready for p in new):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout of {self.name} not done within {timeout}s")
                ready_total = len([p for p in old + new if p.ready])
                # Scale the new ReplicaSet up within the surge, the old one down within availability.
                for _ in range(min(self.replicas + surge - len(old) - len(new), self.replicas - len(new))):
                    self.new_pod()
                removable = ready_total - (self.replicas - unavailable)
                for pod in old[:max(0, removable)]:
                    # Terminating pods count neither as old nor as available: the next round
                    # may start the next new pod while this one still stops.
                    deleting = threading.Thread(target=pod.delete)
                    deleting.start()
                    stopping.append(deleting)
                    while not pod.terminating.is_set():
                        time.sleep(0.05)
                time.sleep(0.5)
        finally:
            for deleting in stopping:
                deleting.join()
            with self.lock:
                self.pods = [p for p in self.pods if not p.gone.is_set()]
            with self.lock:
                self.paused = False

    def percent(self, value, round_up):
        if isinstance(value, int):
            return value
        share = self.replicas * int(value.rstrip("%")) / 100
        return int(-(-share // 1)) if round_up else int(share)


class Cluster:
    """The namespace's objects, the pods, the Service DNS, on one podman network."""

    def __init__(self, objects, prefix, run_dir, images, run_args=(), config_overrides=None):
        self.objects = objects
        # Absolute: dnsmasq reads its hosts file from / .
        self.prefix, self.run_dir, self.images, self.run_args = prefix, Path(run_dir).resolve(), images, list(run_args)
        namespaces = {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"}
        assert len(namespaces) == 1, namespaces
        self.namespace = namespaces.pop() or "default"
        self.config_maps = {o["metadata"]["name"]: dict(o.get("data", {})) for o in objects if o["kind"] == "ConfigMap"}
        for data in self.config_maps.values():
            for key, value in (config_overrides or {}).items():
                if key in data:
                    data[key] = value
        self.secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
        self.services = [o for o in objects if o["kind"] == "Service"]
        # Addresses for the variables only: there is no kube-proxy, nothing answers on them.
        self.services_for_links = [
            {"name": s["metadata"]["name"], "ip": f"10.96.0.{10 + i}", "ports": s["spec"]["ports"]}
            for i, s in enumerate(self.services) if s["spec"].get("clusterIP") != "None"]
        self.deployments = {o["metadata"]["name"]: Deployment(self, o) for o in objects if o["kind"] == "Deployment"}
        self.network = f"{prefix}-net"
        self.dns_lock = threading.Lock()
        self.stopping = threading.Event()

    def config_data(self, kind, name):
        if kind == "configMap":
            return self.config_maps[name]
        import base64
        secret = self.secrets[name]
        return {**{k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()},
                **secret.get("stringData", {})}

    def pods(self):
        return [pod for deployment in self.deployments.values() for pod in list(deployment.pods)]

    def endpoints_changed(self):
        """Service name -> the addresses of the ready pods it selects (DNS, TTL 0... as CoreDNS
        answers a headless Service; nginx caches them NGINX_RESOLVER_VALID)."""
        if not hasattr(self, "hosts_file"):
            return
        with self.dns_lock:
            records = {}
            for service in self.services:
                name = f"{service['metadata']['name']}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
                records[name] = [pod.ip for pod in self.pods() if pod.ip and pod.ready
                                 and selects(service["spec"].get("selector", {}), pod.labels)]
            localdns.write_hosts(self.hosts_file, records)
            if self.dns.poll() is None:
                self.dns.send_signal(signal.SIGHUP)

    def start(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        podman("network", "create", "--disable-dns", "--label", f"k8s-test={self.prefix}", self.network)
        subnet = json.loads(podman("network", "inspect", self.network).stdout)[0]["subnets"][0]
        self.dns_address = subnet["gateway"]
        assert ipaddress.ip_address(self.dns_address).is_private
        hosts_file = self.run_dir / "services.hosts"
        localdns.write_hosts(hosts_file, {})
        # On the network's gateway, inside the podman network only; --bind-dynamic because the
        # bridge gets its address when the first pod joins.
        argv = localdns.dnsmasq_argv(hosts_file, 53, 0, listen=self.dns_address)
        argv[argv.index("--bind-interfaces")] = "--bind-dynamic"
        with open(self.run_dir / "dnsmasq.log", "w") as dns_log:
            self.dns = subprocess.Popen(argv, stdout=dns_log, stderr=subprocess.STDOUT)
        self.hosts_file = hosts_file
        threads = []
        for deployment in self.deployments.values():
            for _ in range(deployment.replicas):
                threads.append(threading.Thread(target=deployment.new_pod))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.controller = threading.Thread(target=self.control_loop, daemon=True)
        self.controller.start()

    def add_deployment(self, obj, timeout=120):
        """kubectl apply of one more Deployment; returns once its pods are Ready."""
        deployment = Deployment(self, obj)
        for _ in range(deployment.replicas):
            deployment.new_pod()
        self.deployments[deployment.name] = deployment
        deadline = time.monotonic() + timeout
        while len(deployment.ready_pods()) < deployment.replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment.name} not ready within {timeout}s")
            time.sleep(0.5)
        return deployment

    def remove_deployment(self, name):
        deployment = self.deployments.pop(name)
        for pod in list(deployment.pods):
            pod.delete()

    def control_loop(self):
        while not self.stopping.wait(1):
            for deployment in self.deployments.values():
                deployment.reconcile()

    def wait_ready(self, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(d.ready_pods()) >= d.replicas for d in self.deployments.values()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"not every Deployment ready within {timeout}s: " + ", ".join(
            f"{name} {len(d.ready_pods())}/{d.replicas}" for name, d in self.deployments.items()))

    def resolve(self, service):
        return localdns.query_a(f"{service}.{self.namespace}.svc.{CLUSTER_DOMAIN}", 53, server=self.dns_address)

    def stop(self):
        self.stopping.set()
        if hasattr(self, "controller"):
            self.controller.join()
        threads = [threading.Thread(target=pod.delete) for pod in self.pods() if not pod.gone.is_set()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def teardown(self):
        """Remove everything this cluster made, whatever state it is in."""
        self.stopping.set()
        for name in podman("pod", "ps", "--filter", f"label=k8s-test={self.prefix}", "--format", "{{.Name}}",
                           check=False).stdout.split():
            podman("pod", "rm", "--force", "--time", "0", name, check=False)
        for name in podman("ps", "-a", "--filter", f"label=k8s-test={self.prefix}", "--format", "{{.Names}}",
                           check=False).stdout.split():
            podman("rm", "--force", "--time", "0", name, check=False)
        if hasattr(self, "dns"):
            self.dns.terminate()
            self.dns.wait(10)
        podman("network", "rm", "--force", self.network, check=False)
