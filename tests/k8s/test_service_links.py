"""Regression (make test-k8s only): k8s/base's pods as they were before `enableServiceLinks:
false`, i.e. with the Docker-link variables the kubelet injects for every Service by default.

Each pod must then fail to start, and say why in words that lead to the fix: the apps' start-up
check names the service-link variables uWSGI would refuse, nginx's entrypoint refuses the
NGINX_PORT=tcp://... the Service nginx brings. Redis reads no such variable and starts.
"""
import time

import pytest

pytestmark = pytest.mark.k8s

APP_MESSAGE = ("UWSGI_APP_SERVICE_HOST: not a uWSGI option; it looks like a Kubernetes service link variable of "
               "the Service 'uwsgi-app'. Set enableServiceLinks: false in the pod spec")
NGINX_HINT = "it looks like a Kubernetes service link variable: set enableServiceLinks: false in the pod spec"


@pytest.fixture(scope="module")
def linked(start_cluster):
    import kubelet

    objects = kubelet.render("k8s/base")
    for obj in objects:
        if obj["kind"] == "Deployment":
            # The field's default, as before the fix.
            assert obj["spec"]["template"]["spec"].pop("enableServiceLinks") is False
    cluster = start_cluster(objects, "service-links")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.teardown()


def wait_for_exit(pod, timeout=60):
    state = pod.containers[0]
    deadline = time.monotonic() + timeout
    while not state.exits:
        assert time.monotonic() < deadline, f"{pod.name} still running after {timeout}s"
        time.sleep(0.2)
    return state


def test_the_kubelet_would_inject_the_variables_that_crashed_the_pods(linked):
    [nginx] = linked.deployments["nginx"].pods
    env = nginx.environment(nginx.containers[0].spec)
    addresses = {service["name"]: service["ip"] for service in linked.services_for_links}
    assert env["NGINX_PORT"] == f"tcp://{addresses['nginx']}:8080"
    assert env["UWSGI_APP_SERVICE_HOST"] == addresses["uwsgi-app"]


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_an_app_pod_with_service_links_names_them_and_does_not_start(linked, app):
    [pod] = linked.deployments[app].pods
    state = wait_for_exit(pod)
    assert state.exits[0][0] != 0 and not state.ready
    log = pod.logs()
    assert APP_MESSAGE in log, log[-2000:]
    assert "UWSGI_APP_PORT: not a uWSGI option" in log


def test_the_nginx_pod_with_service_links_refuses_its_port_and_does_not_start(linked):
    [pod] = linked.deployments["nginx"].pods
    state = wait_for_exit(pod)
    assert state.exits[0][0] != 0
    log = pod.logs()
    address = next(service["ip"] for service in linked.services_for_links if service["name"] == "nginx")
    assert f"10-ports.envsh: NGINX_PORT='tcp://{address}:8080' is not a port number (1-65535); {NGINX_HINT}" in log, \
        log[-2000:]


def test_redis_starts_regardless(linked):
    deadline = time.monotonic() + 60
    while not linked.deployments["redis"].ready_pods():
        assert time.monotonic() < deadline
        time.sleep(0.5)
