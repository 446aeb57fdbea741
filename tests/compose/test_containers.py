"""The running compose stack, inspected from the host (make test-compose only).

What the black-box suite in the tests container cannot see: which users the processes run
as, what the healthchecks say, and how nginx addresses the apps.
"""
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from repo import REPO
from stack import http_get
from up import check_argv, run_check, wait_healthy

pytestmark = pytest.mark.compose

PROJECT = os.environ.get("COMPOSE_TEST_PROJECT", "websockets-behind-nginx-test")
APP_UID = 10001


def container(service):
    return f"{PROJECT}_{service}_1"


def inspect(service):
    out = subprocess.run(["podman", "inspect", container(service)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def process_tree(pid):
    """The container's main process and all its descendants, as {pid: uid}."""
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        status = Path(f"/proc/{current}/status").read_text()
        tree[current] = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        todo.extend(children.get(current, []))
    return tree


@pytest.mark.parametrize("service", ["uwsgi-app", "flask-app"])
def test_every_app_process_runs_as_the_app_user(service):
    tree = process_tree(inspect(service)["State"]["Pid"])
    assert len(tree) >= 3  # uWSGI master and its two workers
    assert set(tree.values()) == {APP_UID}


def test_redis_runs_as_a_non_root_user():
    assert 0 not in process_tree(inspect("redis")["State"]["Pid"]).values()


def test_nginx_workers_are_not_root():
    # The official image's layout: a root master that binds and reads config, unprivileged workers.
    main = inspect("nginx")["State"]["Pid"]
    workers = {pid: uid for pid, uid in process_tree(main).items() if pid != main}
    assert workers
    assert 0 not in workers.values()


@pytest.mark.parametrize("service", ["nginx", "uwsgi-app", "flask-app", "redis"])
def test_healthcheck_passes_in_the_running_container(service):
    # The container carries the compose file's healthcheck, and its command passes in there.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    configured = inspect(service)["Config"]["Healthcheck"]
    assert configured["Test"] == compose["services"][service]["healthcheck"]["test"]
    passed, result = run_check(container(service), check_argv(configured["Test"]), timeout=10)
    assert passed, result


def test_nginx_reaches_the_apps_by_service_name():
    rendered = subprocess.run(
        ["podman", "exec", container("nginx"), "cat", "/etc/nginx/conf.d/default.conf"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "set $uwsgi_app uwsgi-app:8000;" in rendered
    assert "set $flask_app flask-app:8000;" in rendered
    assert "${NGINX_" not in rendered
    # ...resolved at request time by the container network's DNS, its first nameserver.
    resolv_conf = subprocess.run(["podman", "exec", container("nginx"), "cat", "/etc/resolv.conf"],
                                 capture_output=True, text=True, check=True).stdout
    first = next(line.split()[1] for line in resolv_conf.splitlines() if line.startswith("nameserver"))
    assert f"resolver {first} valid=5s ipv6=off;" in rendered
    for backend in ("uwsgi", "flask"):
        health = json.loads(http_get(f"/{backend}/healthz").body)
        # Through the compose network, Redis is reachable by its service name too.
        assert health == {**health, "status": "ok", "app": f"{backend}-app", "redis": "ok"}


def test_nginx_is_published_on_loopback_only():
    bindings = inspect("nginx")["HostConfig"]["PortBindings"]["8080/tcp"]
    assert [binding["HostIp"] for binding in bindings] == ["127.0.0.1"]
    assert http_get("/healthz").status == 200


def test_nginx_tls_port_is_published_on_loopback_with_the_volumes_development_ca():
    port = os.environ.get("NGINX_TLS_PORT", "8443")
    bindings = inspect("nginx")["HostConfig"]["PortBindings"][f"{port}/tcp"]
    assert [binding["HostIp"] for binding in bindings] == ["127.0.0.1"]
    # The CA the entrypoint made in the tls-dev volume, as a user would fetch it (docker compose cp).
    ca = subprocess.run(["podman", "exec", container("nginx"), "cat", "/etc/nginx/tls/ca.crt"],
                        capture_output=True, text=True, check=True).stdout
    context = ssl.create_default_context(cadata=ca)
    with urllib.request.urlopen(f"https://localhost:{port}/healthz", context=context, timeout=10) as response:
        assert response.status == 200


@pytest.mark.parametrize("service", ["uwsgi-app", "flask-app", "tests"])
def test_project_images_declare_the_non_root_user(service):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    user = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Config.User}}", compose["services"][service]["image"]],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert user == f"{APP_UID}:{APP_UID}"


def address(service):
    return next(iter(inspect(service)["NetworkSettings"]["Networks"].values()))["IPAddress"]


def test_zz_nginx_follows_a_recreated_app_to_its_new_address():
    """As `docker compose up --force-recreate uwsgi-app`: a new container with a new address.
    nginx, not restarted, sends new requests there within NGINX_RESOLVER_VALID (5 s).
    (Named zz: it runs last, as it replaces a container the other checks look at.)"""
    nginx_started = inspect("nginx")["State"]["StartedAt"]
    old_address = address("uwsgi-app")
    subprocess.run(["podman", "rm", "--force", "--time", "20", container("uwsgi-app")], check=True, capture_output=True)
    subprocess.run([str(Path(sys.executable).parent / "podman-compose"), "-f", str(REPO / "docker-compose.yml"),
                    "-p", PROJECT, "up", "-d", "--no-deps", "uwsgi-app"], check=True, capture_output=True)
    assert address("uwsgi-app") != old_address  # podman's IPAM hands out the next free address
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    wait_healthy(container("uwsgi-app"), compose["services"]["uwsgi-app"]["healthcheck"])

    started, statuses = time.monotonic(), []
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() - started < 5 + 2, statuses
        statuses.append(http_get("/uwsgi/healthz").status)
        time.sleep(0.1)
    assert all(http_get("/uwsgi/healthz").status == 200 for _ in range(10))
    assert inspect("nginx")["State"]["StartedAt"] == nginx_started
