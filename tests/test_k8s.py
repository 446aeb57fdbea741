"""The Kubernetes manifests (k8s/), checked offline: each kustomization is rendered by the real
kustomize (the one built into kubectl, from tests/requirements-k8s.in), every object is
validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are
errors), and the manifests are compared with what they must agree with: the compose file, the
images, the uWSGI and nginx configs, the running apps. No cluster is involved."""
import functools
import ipaddress
import re
import subprocess

import pytest
import yaml

from repo import REPO, VENV_BIN, render_nginx, run_python
from stack import http_get, nginx_seconds
from test_config import dockerfile_env, ini_defaults

pytestmark = pytest.mark.local

KUSTOMIZATIONS = sorted(path.parent.relative_to(REPO).as_posix() for path in (REPO / "k8s").rglob("kustomization.yaml"))
OVERLAYS = [path for path in KUSTOMIZATIONS if path.startswith("k8s/overlays/")]
# 1.30: the oldest release with the preStop `sleep` action on by default; 1.37: the newest
# schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30", "1.37"]
APPS = ["uwsgi-app", "flask-app"]
# The app's path prefix behind nginx (the template's `location /uwsgi/` and `location /flask/`).
NGINX_PREFIX = {"uwsgi-app": "/uwsgi", "flask-app": "/flask"}
# The users the images run as: the apps' Dockerfiles (USER 10001:10001), the official nginx
# and redis images' own users.
IMAGE_UIDS = {"uwsgi-app": 10001, "flask-app": 10001, "nginx": 101, "redis": 999}


@functools.cache
def render(kustomization):
    result = subprocess.run([str(VENV_BIN / "kubectl"), "kustomize", str(REPO / kustomization)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kustomization, kind):
    return {obj["metadata"]["name"]: obj for obj in render(kustomization) if obj["kind"] == kind}


def pod_spec(kustomization, deployment):
    return objects(kustomization, "Deployment")[deployment]["spec"]["template"]["spec"]


def only_container(kustomization, deployment):
    containers = pod_spec(kustomization, deployment)["containers"]
    assert len(containers) == 1, deployment
    return containers[0]


def environment(kustomization, deployment):
    """The variables a Deployment's container gets, from the ConfigMaps it names."""
    config_maps = objects(kustomization, "ConfigMap")
    env = {}
    for source in only_container(kustomization, deployment).get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    return env


def container_port(container, port):
    """A probe's or a Service's port (a number or a port name) as the container's number."""
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in numbers or port in numbers.values(), f"{container['name']} has no port {port}"
    return numbers.get(port, port)


def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_value(value):
    """What a compose entry is when the variable is unset: ${NAME:-default} -> default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def compose_seconds(service):
    return int(re.fullmatch(r"(\d+)s", compose()["services"][service]["stop_grace_period"]).group(1))


def test_redis_starts_from_compose_script_with_compose_settings():
    """k8s/base/redis-start.sh is redis/redis-start.sh (kustomize reads files under its own
    directory only); the Deployment passes compose's defaults; both read the password from
    the redis-password Secret, where the apps read theirs."""
    assert (REPO / "k8s" / "base" / "redis-start.sh").read_bytes() == (REPO / "redis" / "redis-start.sh").read_bytes()
    container = only_container("k8s/base", "redis")
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {k: compose_value(v) for k, v in compose()["services"]["redis"]["environment"].items()}
    assert container["args"] == ["sh", "/usr/local/lib/redis-start/redis-start.sh"]
    # Compose's healthcheck, from the same script.
    health = compose()["services"]["redis"]["healthcheck"]["test"]
    assert health == ["CMD", "sh", "/usr/local/lib/redis-start.sh", "--health"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == [*container["args"], "--health"], probe
    start = next(v for v in pod_spec("k8s/base", "redis")["volumes"] if v["name"] == "start")
    script = objects("k8s/base", "ConfigMap")[start["configMap"]["name"]]["data"]["redis-start.sh"]
    assert script == (REPO / "redis" / "redis-start.sh").read_text()
    for name in ["redis", *APPS]:
        spec = pod_spec("k8s/base", name)
        [volume] = [v for v in spec["volumes"] if "secret" in v]
        assert volume["secret"] == {"secretName": "redis-password", "items": [{"key": "password", "path": "redis-password"}]}
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts[volume["name"]]["mountPath"] == "/run/secrets" and mounts[volume["name"]]["readOnly"] is True
    assert environment("k8s/base", APPS[0])["REDIS_PASSWORD_FILE"] == env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
    assert not objects("k8s/base", "Secret"), "the password is not in the repository: you create the Secret"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_matches_the_kubernetes_api_schema(kustomization, version):
    # Imported here: the tests image (which skips these local tests) does not install it.
    import kubernetes_validate as validator

    errors = []
    for obj in render(kustomization):
        try:
            validator.validate(obj, version, strict=True)
        except (validator.ValidationError, validator.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert errors == []
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= {obj["kind"] for obj in render(kustomization)}


# Where a pod differs from a compose container on purpose: one interface, no networks to choose
# from (the NetworkPolicies restrict the status port instead).
K8S_DIFFERS = {"nginx": {"NGINX_STATUS_HOST": "0.0.0.0"}}


def test_the_environment_is_composes_with_the_same_defaults():
    services = compose()["services"]
    for deployment in APPS + ["nginx"]:
        expected = {name: compose_value(value) for name, value in services[deployment]["environment"].items()}
        expected.update(K8S_DIFFERS.get(deployment, {}))
        assert environment("k8s/base", deployment) == expected, deployment


def test_the_images_are_the_ones_compose_builds():
    services = compose()["services"]
    for name in APPS + ["nginx", "redis"]:
        assert only_container("k8s/base", name)["image"] == compose_value(services[name]["image"]), name
    for overlay in OVERLAYS:
        for name in APPS + ["nginx"]:
            repository = services[name]["image"].rsplit(":", 1)[0]
            assert only_container(overlay, name)["image"].split(":")[0].endswith("/" + repository), (overlay, name)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_carry_the_names_nginx_and_the_apps_connect_to(kustomization):
    nginx_container = only_container(kustomization, "nginx")
    upstreams = {item["name"]: item.get("value") for item in nginx_container.get("env", [])}
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in nginx_container["env"]
    wanted = []
    for app in APPS:
        # The image's default (compose's service name), fully qualified: nginx's resolver uses no search domains.
        service, port = dockerfile_env("nginx")[f"NGINX_{app.replace('-', '_').upper()}_UPSTREAM"].split(":")
        upstream = upstreams[f"NGINX_{app.replace('-', '_').upper()}_UPSTREAM"]
        assert upstream == f"{service}.$(POD_NAMESPACE).svc.cluster.local:{port}"
        wanted.append((service, port))
    for app in APPS:
        redis_url = environment(kustomization, app)["REDIS_URL"]
        wanted.append(re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", redis_url).groups())
    services = objects(kustomization, "Service")
    deployments = objects(kustomization, "Deployment")
    for name, port in wanted:
        service = services[name]
        [service_port] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        [deployment] = [d for d in deployments.values()
                        if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        container_port(only_container(kustomization, deployment["metadata"]["name"]), service_port["targetPort"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_app_containers_probe_healthz_and_sleep_before_the_stop(kustomization):
    apps = [name for name, d in objects(kustomization, "Deployment").items()
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "websocket-app"]
    assert sorted(apps) == sorted(APPS)
    for app in apps:
        container = only_container(kustomization, app)
        # The port the images' uWSGI listens on (UWSGI_HTTP_SOCKET=0.0.0.0:8000).
        image_port = int(dockerfile_env(app)["UWSGI_HTTP_SOCKET"].rsplit(":", 1)[1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz", (app, probe)
            assert container_port(container, container[probe]["httpGet"]["port"]) == image_port, (app, probe)
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0, app


def test_nginx_probes_and_sleeps_before_the_stop():
    container = only_container("k8s/base", "nginx")
    assert container_port(container, "http") == int(dockerfile_env("nginx")["NGINX_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == int(dockerfile_env("nginx")["NGINX_PORT"])
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


def test_probe_paths_answer_200_on_the_running_stack():
    for app in APPS:
        container = only_container("k8s/base", app)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = NGINX_PREFIX[app] + container[probe]["httpGet"]["path"]
            assert http_get(path).status == 200, path
    nginx = only_container("k8s/base", "nginx")
    for probe in ("readinessProbe", "livenessProbe"):
        assert http_get(nginx[probe]["httpGet"]["path"]).status == 200, probe


def test_the_apps_health_stays_200_when_redis_is_down(monkeypatch):
    # Otherwise a Redis blip would take every app pod out of the Service and restart them all.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # discard port: nothing listens
    result = run_python("from wsstack import health; status, _, body = health.report('probe', {}); print(status); "
                        "print(body.decode())", "common")
    assert result.returncode == 0, result.stderr
    status, body = result.stdout.splitlines()
    assert status.startswith("200 ") and '"redis": "unavailable' in body


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_disruption_budget_covers_one_deployment_and_allows_a_drain(kustomization):
    deployments = objects(kustomization, "Deployment")
    covered = []
    for name, budget in objects(kustomization, "PodDisruptionBudget").items():
        selector = budget["spec"]["selector"]["matchLabels"]
        matching = [d for d, obj in deployments.items()
                    if selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, (name, matching)
        covered += matching
        # One replica must still be evictable, or a node drain waits forever.
        assert budget["spec"].get("maxUnavailable", 0) >= 1, name
    assert sorted(covered) == sorted(APPS + ["nginx"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_run_several_replicas_behind_one_redis(overlay):
    deployments = objects(overlay, "Deployment")
    for name in APPS + ["nginx"]:
        assert deployments[name]["spec"]["replicas"] > 1, name
    assert deployments["redis"]["spec"]["replicas"] == 1
    assert deployments["redis"]["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_runs_locked_down_with_resources(kustomization):
    assert set(objects(kustomization, "Deployment")) == set(IMAGE_UIDS)
    for app in APPS:
        assert re.search(r"^USER 10001:10001$", (REPO / app / "Dockerfile").read_text(), re.M), app
    for name in IMAGE_UIDS:
        spec = pod_spec(kustomization, name)
        assert spec["automountServiceAccountToken"] is False, name
        # Scratch space, and read-only files (Redis's start script, the Redis password Secret).
        assert all(set(volume) in ({"name", "emptyDir"}, {"name", "configMap"}, {"name", "secret"})
                   for volume in spec.get("volumes", [])), name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context["runAsNonRoot"] is True and context["runAsUser"] == IMAGE_UIDS[name], name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, (name, bound)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_grace_period_covers_the_prestop_sleep_and_the_graceful_stop(kustomization):
    # Apps: SIGTERM (no STOPSIGNAL in their images) starts uWSGI's graceful stop, which a
    # worker gets UWSGI_WORKER_RELOAD_MERCY seconds for; compose's margin on top of it, too.
    base_ini = (REPO / "common" / "uwsgi-base.ini").read_text()
    assert re.search(r"^hook-master-start = unix_signal:15 gracefully_kill_them_all$", base_ini, re.M)
    ini_mercy = int(ini_defaults()["UWSGI_WORKER_RELOAD_MERCY"])
    for app in APPS:
        assert "STOPSIGNAL" not in (REPO / app / "Dockerfile").read_text()
        margin = compose_seconds(app) - ini_mercy
        assert margin >= 5, app
        spec = pod_spec(kustomization, app)
        mercy = int(environment(kustomization, app)["UWSGI_WORKER_RELOAD_MERCY"])
        pre_stop = only_container(kustomization, app)["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + mercy + margin, app
    # nginx: the base image's SIGQUIT, a graceful stop bounded by worker_shutdown_timeout.
    assert "STOPSIGNAL" not in (REPO / "nginx" / "Dockerfile").read_text()
    shutdown = nginx_seconds(re.search(r"^worker_shutdown_timeout (\w+);", (REPO / "nginx" / "nginx.conf").read_text(),
                                       re.M).group(1))
    margin = compose_seconds("nginx") - shutdown
    assert margin >= 5
    pre_stop = only_container(kustomization, "nginx")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(kustomization, "nginx")["terminationGracePeriodSeconds"] >= pre_stop + shutdown + margin


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_nginx_environment_renders_a_config_nginx_accepts(kustomization, tmp_path):
    # Empty certificate paths mean "make a development certificate" (the image's
    # 15-tls-certificate.envsh does it at start); render_nginx brings one of its own.
    settings = {name: value for name, value in environment(kustomization, "nginx").items() if value}
    prefix = render_nginx(tmp_path, **settings)
    check = subprocess.run(["nginx", "-t", "-q", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ingress_outlasts_the_pings_and_leaves_the_per_client_limits_to_our_nginx():
    overlay = "k8s/overlays/ingress"
    [ingress] = objects(overlay, "Ingress").values()
    notes = ingress["metadata"]["annotations"]
    ping = int(environment(overlay, "uwsgi-app")["UWSGI_WEBSOCKETS_PING_FREQ"])
    ours = nginx_seconds(environment(overlay, "nginx")["NGINX_PROXY_READ_TIMEOUT"])
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= ours > ping
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) > ping
    # ingress-nginx's own limits count per controller pod and answer 503: not used...
    assert not [note for note in notes if "/limit-" in note]
    # ...ours stay as in the base and see each client's address, from the controllers only.
    base, behind = environment("k8s/base", "nginx"), environment(overlay, "nginx")
    for name in ("NGINX_WS_CONNECTIONS_PER_IP", "NGINX_WS_HANDSHAKES_PER_SECOND", "NGINX_WS_HANDSHAKE_BURST"):
        assert behind[name] == base[name], name
    assert base["NGINX_REAL_IP_FROM"] == "unix:"
    assert ipaddress.ip_network(behind["NGINX_REAL_IP_FROM"]).is_private
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == "nginx" and path["path"] == "/"
    nginx_ports = {p["name"]: p["port"] for p in objects(overlay, "Service")["nginx"]["spec"]["ports"]}
    assert backend["port"]["name"] in nginx_ports


def policies_module():
    import sys

    sys.path.insert(0, str(REPO / "tests" / "k8s"))
    import policies

    return policies


def listening_ports(kustomization, deployment):
    """The ports a pod's program listens on, from what configures it (not from the manifest):
    the apps' image settings, nginx's three port settings, Redis's default."""
    if deployment in APPS:
        image = dockerfile_env(deployment)
        return {int(image[name].rsplit(":", 1)[1]) for name in ("UWSGI_HTTP_SOCKET", "METRICS_HTTP_SOCKET", "UWSGI_STATS")}
    if deployment == "nginx":
        settings = {**dockerfile_env("nginx"), **environment(kustomization, "nginx")}
        return {int(settings[name]) for name in ("NGINX_PORT", "NGINX_TLS_PORT", "NGINX_STATUS_PORT")}
    assert deployment == "redis" and "--port" not in only_container(kustomization, "redis")["args"]
    return {6379}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_listening_port_is_declared_and_opened_by_exactly_one_network_policy(kustomization):
    policies = policies_module()
    network_policies = list(objects(kustomization, "NetworkPolicy").values())
    for name, deployment in objects(kustomization, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        container = only_container(kustomization, name)
        ports = listening_ports(kustomization, name)
        assert {port["containerPort"] for port in container["ports"]} == ports, name
        for port in ports:
            assert len(policies.covering_policies(network_policies, labels, container, port)) == 1, (name, port)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policies_deny_by_default_and_open_only_the_stacks_paths(kustomization):
    policies = policies_module()
    network_policies = list(objects(kustomization, "NetworkPolicy").values())
    default = objects(kustomization, "NetworkPolicy")["default-deny"]["spec"]
    assert default == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    class Pod:
        def __init__(self, name):
            self.labels = objects(kustomization, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]

    monitoring = Pod("nginx")
    monitoring.labels = {"websockets-behind-nginx/monitoring": "true"}
    stranger = Pod("nginx")
    stranger.labels = {"app.kubernetes.io/name": "something-else"}
    container = {name: only_container(kustomization, name) for name in IMAGE_UIDS}
    allowed = policies.connection_allowed
    for app in APPS:
        assert allowed(network_policies, Pod("nginx"), Pod(app), container[app], 8000)
        assert allowed(network_policies, Pod(app), Pod("redis"), container["redis"], 6379)
        for port in (9000, 9191):  # metrics, uWSGI stats: monitoring only, never nginx
            assert not allowed(network_policies, Pod("nginx"), Pod(app), container[app], port)
            assert not allowed(network_policies, stranger, Pod(app), container[app], port)
        assert not allowed(network_policies, stranger, Pod(app), container[app], 8000)
        assert not allowed(network_policies, Pod(app), Pod("nginx"), container["nginx"], 8080)
    assert not allowed(network_policies, Pod("nginx"), Pod("redis"), container["redis"], 6379)
    assert not allowed(network_policies, stranger, Pod("redis"), container["redis"], 6379)
    assert not allowed(network_policies, stranger, Pod("nginx"), container["nginx"], 8081)
    for port in (8080, 8443):  # from anywhere: another namespace (an Ingress controller), outside
        assert allowed(network_policies, stranger, Pod("nginx"), container["nginx"], port, source_in_namespace=False)
    # Monitoring, from its own namespace: the internal ports, and nothing else.
    for app in APPS:
        for port in (9000, 9191):
            assert allowed(network_policies, monitoring, Pod(app), container[app], port, source_in_namespace=False)
        assert not allowed(network_policies, monitoring, Pod(app), container[app], 8000, source_in_namespace=False)
    assert allowed(network_policies, monitoring, Pod("nginx"), container["nginx"], 8081, source_in_namespace=False)
    assert not allowed(network_policies, monitoring, Pod("redis"), container["redis"], 6379, source_in_namespace=False)
    assert not allowed(network_policies, stranger, Pod("uwsgi-app"), container["uwsgi-app"], 8000,
                       source_in_namespace=False)
    # The monitoring rules take pods from any namespace: their peer carries a namespaceSelector {}.
    for name in ("websocket-apps-monitoring", "nginx-monitoring"):
        [rule] = objects(kustomization, "NetworkPolicy")[name]["spec"]["ingress"]
        assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": monitoring.labels}}]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_pod_gets_service_link_variables(kustomization):
    # uWSGI reads UWSGI_APP_SERVICE_HOST & co. (the Service uwsgi-app's) as unknown options, and
    # NGINX_PORT=tcp://... (the Service nginx's) replaces nginx's port: every pod crash-looped.
    for name in IMAGE_UIDS:
        assert pod_spec(kustomization, name)["enableServiceLinks"] is False, name


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_replicas_spread_over_nodes_and_zones_and_redis_is_guaranteed(kustomization):
    for name in APPS + ["nginx"]:
        constraints = {c["topologyKey"]: c for c in pod_spec(kustomization, name)["topologySpreadConstraints"]}
        assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}, name
        assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
        assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
        for constraint in constraints.values():
            assert constraint["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}, name
            assert constraint["matchLabelKeys"] == ["pod-template-hash"] and constraint["maxSkew"] == 1
    resources = only_container(kustomization, "redis")["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: evicted last


def test_the_scaled_overlay_autoscales_each_app_on_cpu_from_its_replica_count():
    overlay = "k8s/overlays/scaled"
    autoscalers = objects(overlay, "HorizontalPodAutoscaler")
    assert sorted(autoscalers) == sorted(APPS)
    deployments = objects(overlay, "Deployment")
    for name, hpa in autoscalers.items():
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert spec["minReplicas"] == deployments[name]["spec"]["replicas"] < spec["maxReplicas"]
        [metric] = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        # Utilization is of the request: the pods must request CPU for it to mean anything.
        assert only_container(overlay, name)["resources"]["requests"]["cpu"]
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
