"""Static checks: Dockerfiles, the compose file, and the nginx config both modes render."""
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from repo import DOCKERFILES, REPO, VENV_BIN, render_nginx

pytestmark = pytest.mark.local

SERVICES_WITH_IMAGES = {"nginx", "uwsgi-app", "flask-app", "tests"}


def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_service_folder_has_a_dockerfile():
    assert {path.parent.name for path in DOCKERFILES} == SERVICES_WITH_IMAGES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_reports_nothing(dockerfile):
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification_schema():
    # docker-compose 1.29.2 (installed --no-deps by bootstrap) ships the Compose Specification schema.
    package = Path(importlib.util.find_spec("compose").submodule_search_locations[0])
    schema = json.loads((package / "config" / "compose_spec.json").read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert errors == []


def test_compose_services_are_healthchecked_pinned_and_ordered():
    services = compose()["services"]
    assert set(services) == SERVICES_WITH_IMAGES | {"redis"}
    assert services["tests"]["profiles"] == ["test"]
    for name, service in services.items():
        if name != "tests":
            assert service["healthcheck"]["test"][0] == "CMD", name
        for dependency in service.get("depends_on", {}).values():
            assert dependency == {"condition": "service_healthy"}, name
    assert services["redis"]["image"].startswith("${REDIS_IMAGE:-redis:")
    # A release tag, and the digest make pin-images adds where a registry was reachable.
    assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?\}", services["redis"]["image"])
    for app in ("uwsgi-app", "flask-app"):
        assert services[app]["healthcheck"]["test"][1:4] == ["python", "-m", "wsstack.probe"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_build_arguments(dockerfile):
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M))
    assert args, "base image must be a build argument"
    for image in args.values():
        assert re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), f"unpinned base image {image}"
    assert re.findall(r"^FROM \$\{(\w+)\}", text, re.M)


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_app_images_are_multi_stage_non_root_and_ship_no_compiler(app):
    text = (REPO / app / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2
    build, final = stages
    # uWSGI comes from common/build-uwsgi.sh (patch set, SSL check), as in local mode.
    assert "libssl-dev" in build and "/build-uwsgi.sh /opt/venv/bin/pip" in build
    assert "-DUWSGI_SSL" in (REPO / "common" / "build-uwsgi.sh").read_text()
    assert "gcc" not in final and "apt-get" not in final
    assert re.search(r"^USER 10001:10001$", final, re.M)


def test_rendered_nginx_config_passes_nginx_t(tmp_path):
    prefix = render_nginx(tmp_path)
    result = subprocess.run(
        ["nginx", "-t", "-q", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_rendered_nginx_config_proxies_websockets_correctly(tmp_path):
    conf = (render_nginx(tmp_path) / "conf.d" / "default.conf").read_text()
    main = (REPO / "nginx" / "nginx.conf").read_text()
    assert "${" not in conf
    # Only a WebSocket upgrade is forwarded (tests/test_edge.py sends others).
    assert re.search(r'map \$http_upgrade \$websocket_upgrade \{\s*"~\*\^websocket\$"\s+websocket;\s*default\s+"";', conf)
    assert re.search(r"map \$websocket_upgrade \$connection_upgrade \{\s*websocket\s+upgrade;\s*default\s+close;", conf)
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $websocket_upgrade;",
        "client_header_timeout 10s;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $forwarded_proto;",
        "set_real_ip_from unix:;",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
        "proxy_buffering off;",
        "proxy_read_timeout 60s;",
        "listen 127.0.0.1:18080;",
        "set $uwsgi_app 127.0.0.1:18001;",
        "set $flask_app 127.0.0.1:18002;",
        "resolver 127.0.0.1:18053 valid=5s ipv6=off;",
        "proxy_connect_timeout 3s;",
    ):
        assert directive in conf, directive
    assert "server_tokens off;" in main
    # nginx's own variables are not environment variables and must survive envsubst.
    assert "$host;" in conf and "must-not-be-substituted" not in conf


def test_rendering_fails_when_a_template_variable_is_unset(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(tmp_path, NGINX_ENVSUBST_FILTER="^NGINX_(HOST|PORT)$")
    assert "NGINX_PROXY_READ_TIMEOUT" in failure.value.stderr


RESOLVER_SCRIPT = REPO / "nginx" / "docker-entrypoint.d" / "15-resolver.envsh"


@pytest.mark.parametrize("resolv_conf, preset, expected", [
    # podman: its network's DNS first, then the host's resolvers, which do not know the services.
    ("search dns.podman\nnameserver 10.89.0.1\nnameserver 10.255.255.53\n", None, "10.89.0.1"),
    ("nameserver 127.0.0.11\noptions ndots:0\n", None, "127.0.0.11"),
    ("nameserver fd00::1\n", None, "[fd00::1]"),
    ("nameserver 127.0.0.11\n", "10.0.0.10", "10.0.0.10"),  # set by the operator: kept
])
def test_the_image_resolves_service_names_through_the_first_nameserver(tmp_path, resolv_conf, preset, expected):
    (tmp_path / "resolv.conf").write_text(resolv_conf)
    env = {"PATH": os.environ["PATH"], "RESOLV_CONF": str(tmp_path / "resolv.conf"), **({"NGINX_RESOLVER": preset} if preset else {})}
    # Sourced, as the official entrypoint does with *.envsh.
    result = subprocess.run(["sh", "-c", f'. "{RESOLVER_SCRIPT}" && printf %s "$NGINX_RESOLVER"'],
                            env=env, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, expected), result.stderr


def test_the_image_refuses_to_start_without_a_nameserver(tmp_path):
    (tmp_path / "resolv.conf").write_text("search example\n")
    result = subprocess.run(["sh", "-c", f'. "{RESOLVER_SCRIPT}"'], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "RESOLV_CONF": str(tmp_path / "resolv.conf")})
    assert result.returncode != 0 and "set NGINX_RESOLVER" in result.stderr
    assert os.access(RESOLVER_SCRIPT, os.X_OK)  # the entrypoint skips scripts that are not executable


PORTS_SCRIPT = REPO / "nginx" / "docker-entrypoint.d" / "10-ports.envsh"


@pytest.mark.parametrize("setting, value, hint", [
    # What the kubelet injects for the Service nginx when the pod keeps its service links.
    ("NGINX_PORT", "tcp://10.96.0.7:8080", "set enableServiceLinks: false in the pod spec"),
    ("NGINX_PORT", "http", ""), ("NGINX_PORT", "0", ""), ("NGINX_STATUS_PORT", "65536", ""),
    ("NGINX_STATUS_PORT", "", ""),
])
def test_the_image_refuses_a_listening_port_that_is_not_a_number(setting, value, hint):
    env = {"PATH": os.environ["PATH"], "NGINX_PORT": "8080", "NGINX_STATUS_PORT": "8081", "NGINX_STATUS_HOST": "0.0.0.0",
           setting: value}
    # Sourced, as the official entrypoint does with *.envsh.
    result = subprocess.run(["sh", "-c", f'. "{PORTS_SCRIPT}"'], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"10-ports.envsh: {setting}='{value}' is not a port number (1-65535)" in result.stderr
    assert hint in result.stderr
    assert os.access(PORTS_SCRIPT, os.X_OK)  # the entrypoint skips scripts that are not executable
    good = subprocess.run(["sh", "-c", f'. "{PORTS_SCRIPT}"'], env={**env, setting: "8082"}, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr


@pytest.mark.parametrize("value", ["", "0.0.0.0:9; allow all", "nginx status", "127.0.0.1\nlisten 80"])
def test_the_image_refuses_a_status_host_that_is_not_an_address(value):
    env = {"PATH": os.environ["PATH"], "NGINX_PORT": "8080", "NGINX_STATUS_PORT": "8081", "NGINX_STATUS_HOST": value}
    result = subprocess.run(["sh", "-c", f'. "{PORTS_SCRIPT}"'], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "10-ports.envsh: NGINX_STATUS_HOST=" in result.stderr and "is not an IP address or host name" in result.stderr
    for good in ("0.0.0.0", "nginx-status", "[::]", "10.89.2.3"):
        accepted = subprocess.run(["sh", "-c", f'. "{PORTS_SCRIPT}"'], env={**env, "NGINX_STATUS_HOST": good},
                                  capture_output=True, text=True)
        assert accepted.returncode == 0, (good, accepted.stderr)


@pytest.mark.parametrize("setting", ["NGINX_PORT", "NGINX_STATUS_PORT", "NGINX_TLS_PORT"])
def test_local_rendering_refuses_a_listening_port_that_is_not_a_number(tmp_path, setting):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(tmp_path, **{setting: "tcp://10.96.0.7:8080"})
    assert f"render-nginx-templates: {setting}='tcp://10.96.0.7:8080' is not a port number" in failure.value.stderr
