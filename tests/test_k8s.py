"""The Kubernetes manifests (k8s/), checked offline: each kustomization is rendered by the real
kustomize (the one built into kubectl, from tests/requirements-k8s.in), every object is
validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are
errors), and the manifests are compared with what they must agree with: the compose file, the
images, the uWSGI and nginx configs, the running apps. No cluster is involved."""
import functools
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


def test_the_environment_is_composes_with_the_same_defaults():
    services = compose()["services"]
    for deployment in APPS + ["nginx"]:
        expected = {name: compose_value(value) for name, value in services[deployment]["environment"].items()}
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
    result = run_python("from wsstack import health; status, _, body = health.report('probe'); print(status); "
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
        assert all(set(volume) == {"name", "emptyDir"} for volume in spec.get("volumes", [])), name
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


def test_ingress_outlasts_the_pings_and_enforces_the_per_client_limits():
    overlay = "k8s/overlays/ingress"
    [ingress] = objects(overlay, "Ingress").values()
    notes = ingress["metadata"]["annotations"]
    ping = int(environment(overlay, "uwsgi-app")["UWSGI_WEBSOCKETS_PING_FREQ"])
    ours = nginx_seconds(environment(overlay, "nginx")["NGINX_PROXY_READ_TIMEOUT"])
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= ours > ping
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) > ping
    # The edge takes over our nginx's per-address limits, with the same numbers...
    base = environment("k8s/base", "nginx")
    assert notes["nginx.ingress.kubernetes.io/limit-connections"] == base["NGINX_WS_CONNECTIONS_PER_IP"]
    assert notes["nginx.ingress.kubernetes.io/limit-rps"] == base["NGINX_WS_HANDSHAKES_PER_SECOND"]
    burst = int(notes["nginx.ingress.kubernetes.io/limit-rps"]) * int(notes["nginx.ingress.kubernetes.io/limit-burst-multiplier"])
    assert burst == int(base["NGINX_WS_HANDSHAKE_BURST"])
    # ...as behind it every client has a controller's address: ours must not bind first.
    lifted = environment(overlay, "nginx")
    for name in ("NGINX_WS_CONNECTIONS_PER_IP", "NGINX_WS_HANDSHAKES_PER_SECOND", "NGINX_WS_HANDSHAKE_BURST"):
        assert int(lifted[name]) > 10 * int(base[name]), name
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == "nginx" and path["path"] == "/"
    nginx_ports = {p["name"]: p["port"] for p in objects(overlay, "Service")["nginx"]["spec"]["ports"]}
    assert backend["port"]["name"] in nginx_ports
