"""TEST INFRASTRUCTURE: make test-k8s's driver (tests/k8s/run.sh builds the images first).

For each kustomization: render it, start its pods with kubelet.py, run the integration suite
from the tests image against one nginx pod, then tests/k8s/test_pods.py against the running
pods. Last, tests/k8s/test_service_links.py starts k8s/base as it was before
`enableServiceLinks: false` and checks that every pod says why it cannot start.

    python tests/k8s/main.py --project NAME --log-dir DIR [--only k8s/base] [-k EXPR]
"""
import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kubelet  # noqa: E402

KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/scaled"]
# What make test-compose shortens too, so the suite can show within seconds that an idle
# WebSocket outlives nginx's proxy_read_timeout (the manifests' 60 s and 20 s otherwise).
# And, as make test and make test-compose do, the token issuer's per-address limit raised: the
# suite asks for a token per user name, all from one address (the manifests' 30/min, burst 20).
SUITE_CONFIG = {"NGINX_PROXY_READ_TIMEOUT": "5s", "UWSGI_WEBSOCKETS_PING_FREQ": "2",
                "NGINX_AUTH_REQUESTS_PER_MINUTE": "600", "NGINX_AUTH_REQUEST_BURST": "100"}
# podman 4.3 asks for open-file and process limits above this machine's without them
# (tests/compose/containers.conf); a kubelet's runtime has its own defaults.
RUN_ARGS = ["--ulimit=nofile=20000:20000", "--ulimit=nproc=4096:4096"]


def local_images(objects, project):
    """Each manifest image -> the image run.sh built for it (by the image's base name): the
    harness does not pull, as a cluster would from registry.example.com."""
    images = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                base = container["image"].rsplit("/", 1)[-1].split(":")[0]
                images[container["image"]] = f"localhost/{project}/{base}:test"
    return images


def redis_password_secret(objects):
    """The Secret the manifests expect the operator to create (docs/kubernetes.md, "Secrets"):
    a random password per run, as `kubectl create secret generic` would make it."""
    namespace = next((o["metadata"].get("namespace") for o in objects if o["kind"] == "Deployment"), None)
    metadata = {"name": "redis-password", **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque",
            "stringData": {"password": secrets.token_urlsafe(32)}}


def make_cluster(objects, project, name, log_dir, config=None):
    if not any(o["kind"] == "Secret" and o["metadata"]["name"] == "redis-password" for o in objects):
        objects = [*objects, redis_password_secret(objects)]
    return kubelet.Cluster(objects, prefix=f"{project}-{name}", run_dir=Path(log_dir) / name,
                           images=local_images(objects, project), run_args=RUN_ARGS, config_overrides=config)


def run_suite(cluster, project):
    """The tests image as compose runs it (hardened, an init, the development CA), with the
    name nginx pinned to one nginx pod: each pod makes its own development certificate."""
    [nginx, *_] = cluster.deployments["nginx"].ready_pods()
    tls_dir = nginx.volumes["tls-dev"][0]
    argv = ["podman", "run", "--rm", "--network", cluster.network, "--dns", cluster.dns_address,
            "--dns-search", f"{cluster.namespace}.svc.cluster.local", "--add-host", f"nginx:{nginx.ip}",
            "--label", f"k8s-test={cluster.prefix}", "--init", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/tmp:size=64m", "--cap-drop=ALL", "--security-opt", "no-new-privileges",
            "--memory", "512m", "--cpus", "1", *RUN_ARGS,
            "--volume", f"{tls_dir}:/srv/tls:ro", "--env", "STACK_MODE=container",
            *[arg for key, value in SUITE_CONFIG.items() for arg in ("--env", f"{key}={value}")],
            f"localhost/{project}/tests:test"]
    print(f"test-k8s: the integration suite against nginx pod {nginx.name} ({nginx.ip})", flush=True)
    status = subprocess.run(argv).returncode
    if status == 5:
        print("test-k8s: pytest collected no tests; that is a failure here", file=sys.stderr)
        return 1
    return status


# What this module, handed to pytest as a plugin, gives tests/k8s/*.py through its fixtures.
CURRENT = {"cluster": None, "factory": None}


@pytest.fixture(scope="session")
def cluster():
    """The running cluster of the kustomization under test."""
    return CURRENT["cluster"]


@pytest.fixture(scope="session")
def start_cluster():
    """make_cluster(objects, name) for tests that start a cluster of their own."""
    return CURRENT["factory"]


def run_pytest(files, extra, cluster=None, factory=None):
    CURRENT.update(cluster=cluster, factory=factory)
    return pytest.main(arguments_for_pytest(files, extra), plugins=[sys.modules[__name__]])


def arguments_for_pytest(files, extra):
    return ["-c", str(HERE.parent / "pytest.ini"), "-p", "no:cacheprovider", "-m", "k8s",
            "--rootdir", str(HERE.parent), *[str(HERE / f) for f in files], *extra]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--only", action="append", help="a kustomization (repeatable); default: all, and the regression")
    parser.add_argument("-k", dest="keyword", help="pytest -k for tests/k8s/test_*.py")
    args = parser.parse_args()
    # tests/conftest.py runs the @pytest.mark.k8s tests in this mode only.
    os.environ["STACK_MODE"] = "k8s"
    extra = ["-k", args.keyword] if args.keyword else []
    status = 0
    for kustomization in args.only or KUSTOMIZATIONS:
        name = kustomization.rsplit("/", 1)[-1]
        started = time.monotonic()
        cluster = make_cluster(kubelet.render(kustomization), args.project, name, args.log_dir, SUITE_CONFIG)
        try:
            print(f"test-k8s: {kustomization}: starting {sum(d.replicas for d in cluster.deployments.values())} pods "
                  f"in namespace {cluster.namespace}", flush=True)
            cluster.start()
            cluster.wait_ready()
            print(f"test-k8s: {kustomization}: every Deployment ready after {time.monotonic() - started:.0f}s", flush=True)
            status |= run_suite(cluster, args.project)
            status |= run_pytest(["test_pods.py"], extra, cluster=cluster)
            cluster.stop()
        finally:
            for pod in cluster.pods():  # those still there (a failed start); delete() saves its own
                if not pod.gone.is_set():
                    pod.save_logs()
            cluster.teardown()
        print(f"test-k8s: {kustomization}: done in {time.monotonic() - started:.0f}s", flush=True)
    if not args.only:
        def factory(objects, name):
            return make_cluster(objects, args.project, name, args.log_dir)
        status |= run_pytest(["test_service_links.py"], extra, factory=factory)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
