"""The tests container's own hardening, seen from inside it (it runs there only).

The host-side checks (tests/compose/test_containers.py) see the long-running services; the
tests container runs only as long as the suite, so the suite checks itself.
"""
import errno
import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.container


def status(pid):
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize("pid", ["self", "1"], ids=["pytest", "pid 1"])
def test_runs_unprivileged(pid):
    fields = status(pid)
    assert set(map(int, fields["Uid"].split())) == {10001}
    for capabilities in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, capabilities
    assert fields["NoNewPrivs"] == "1"


def test_pid_1_is_an_init_not_pytest():
    # PID 1 ignores signals it has no handler for: as pytest it would outlive a stop.
    assert os.getpid() != 1
    assert Path("/proc/1/comm").read_text().strip() not in ("python", "pytest")


def test_only_tmp_is_writable(tmp_path):
    with pytest.raises(OSError) as refused:
        Path("/srv/tests/probe").write_text("x")
    assert refused.value.errno == errno.EROFS
    # pytest's tmp_path lives in the /tmp tmpfs
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "probe").write_text("x")


# The compose networks (docs/operations.md, "Networks"): the tests container is on edge only,
# as a client is. Names behind nginx do not resolve here; the host-side checks
# (tests/compose/test_containers.py) show their addresses are not reachable either. In a
# Kubernetes pod (make test-k8s runs this image too) there is one network, and the
# NetworkPolicies' checks are tests/k8s/test_pods.py's.
compose_networks = pytest.mark.skipif(os.environ.get("STACK_NETWORKS") != "compose",
                                      reason="compose's networks (STACK_NETWORKS=compose, the compose tests service)")


@compose_networks
@pytest.mark.parametrize("name", ["redis", "uwsgi-app", "flask-app", "nginx-status"])
def test_nothing_behind_nginx_resolves_from_the_edge_network(name):
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)


@compose_networks
def test_nginx_is_reachable_on_its_public_port_only():
    socket.create_connection(("nginx", 8080), timeout=5).close()
    # The status listener binds nginx's address on the apps network, not this one.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("nginx", int(os.environ.get("NGINX_STATUS_PORT", "8081"))), timeout=5)
