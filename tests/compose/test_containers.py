"""The running compose stack, inspected from the host (make test-compose only).

What the black-box suite in the tests container cannot see: which users the processes run
as with which privileges, what they can write, which limits the engine applied, what the
healthchecks say, and how nginx addresses the apps.
"""
import json
import os
import re
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
# The running services and their users (tests/test_hardening.py checks the same in the files).
UIDS = {"nginx": 101, "uwsgi-app": APP_UID, "flask-app": APP_UID, "redis": 999}


def container(service):
    return f"{PROJECT}_{service}_1"


def inspect(service):
    out = subprocess.run(["podman", "inspect", container(service)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def compose_service(service):
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][service]


def proc_status(pid):
    """/proc/PID/status as {field: value}."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def children_by_parent():
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    return children


def process_tree(pid):
    """The container's main process and all its descendants, as {pid: uid}."""
    children = children_by_parent()
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        tree[current] = int(proc_status(current)["Uid"].split()[0])
        todo.extend(children.get(current, []))
    return tree


def main_pid(service):
    return inspect(service)["State"]["Pid"]


@pytest.mark.parametrize("service", ["uwsgi-app", "flask-app"])
def test_every_app_process_runs_as_the_app_user(service):
    tree = process_tree(inspect(service)["State"]["Pid"])
    assert len(tree) >= 3  # uWSGI master and its two workers
    assert set(tree.values()) == {APP_UID}


@pytest.mark.parametrize("service", sorted(UIDS))
def test_every_process_is_unprivileged(service):
    # nginx's master included (unprivileged style): no process of any service is root, holds a
    # capability, or could gain either through a setuid binary.
    for pid in process_tree(main_pid(service)):
        status = proc_status(pid)
        assert set(map(int, status["Uid"].split())) == {UIDS[service]}, (pid, status["Uid"])
        assert 0 not in set(map(int, status["Gid"].split())), (pid, status["Gid"])
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, (pid, capabilities, status[capabilities])
        assert status["NoNewPrivs"] == "1", pid


def mounts(pid):
    """(root within its filesystem, mount point, mount options, filesystem type) per mount."""
    rows = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fields = fields.split()
        rows.append((fields[3], fields[4], fields[5].split(","), tail.split()[0]))
    return rows


@pytest.mark.parametrize("service", sorted(UIDS))
def test_root_filesystem_is_read_only_with_tmpfs_only_where_declared(service):
    table = mounts(main_pid(service))
    assert "ro" in next(options for _, point, options, _ in table if point == "/")
    # Fresh tmpfs mounts outside the kernel's own (/dev, /proc, /sys): exactly the compose file's.
    # run.sh turns off podman's extra /tmp, /run, /var/tmp (Docker has none), so none hide here.
    tmpfs = {point for root, point, _, fstype in table
             if fstype == "tmpfs" and root == "/" and not point.startswith(("/dev", "/proc", "/sys"))}
    assert tmpfs == {entry.split(":")[0] for entry in compose_service(service).get("tmpfs", [])}
    # Even root in the container (still without capabilities) cannot write to the image.
    write = subprocess.run(["podman", "exec", "--user", "0", container(service), "sh", "-c", "echo x >/probe"],
                           capture_output=True, text=True)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write


@pytest.mark.parametrize("service", sorted(UIDS))
def test_the_engine_applied_the_compose_limits(service):
    configured, host = compose_service(service), inspect(service)["HostConfig"]
    number, unit = configured["mem_limit"][:-1], configured["mem_limit"][-1]
    assert host["Memory"] == int(number) * {"k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    assert host["NanoCpus"] == round(float(configured["cpus"]) * 1e9)
    assert host["PidsLimit"] == configured["pids_limit"]
    assert host["ReadonlyRootfs"] is True
    assert host.get("Init", False) is configured.get("init", False)  # podman omits it when false
    # The kernel's view of the open-files limit (nginx's worker_rlimit_nofile needs it).
    if "ulimits" in configured:
        limits = Path(f"/proc/{main_pid(service)}/limits").read_text()
        soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M).groups()
        nofile = configured["ulimits"]["nofile"]
        assert (int(soft), int(hard)) == (nofile["soft"], nofile["hard"])


@pytest.mark.parametrize("service", sorted(UIDS))
def test_an_init_is_pid_1_exactly_where_declared(service):
    main = main_pid(service)
    command = Path(f"/proc/{main}/comm").read_text().strip()
    children = children_by_parent().get(main, [])
    if service in ("uwsgi-app", "flask-app"):
        # the image's own init (its ENTRYPOINT), with the service's program as its only child:
        # compose adds none in front of it (two inits, each forwarding to the next)
        assert not compose_service(service).get("init")
        assert command == "tini"
        assert len(children) == 1
        assert Path(f"/proc/{children[0]}/comm").read_text().strip() == "uwsgi"
    elif compose_service(service).get("init"):
        # the init forwards the stop signal to the service's program, its only child
        assert len(children) == 1
        assert Path(f"/proc/{children[0]}/comm").read_text().strip() != command
    else:
        assert command in ("nginx", "redis-server")


@pytest.mark.parametrize("service", ["nginx", "uwsgi-app", "flask-app", "redis"])
def test_healthcheck_passes_in_the_running_container(service):
    # The container carries the compose file's healthcheck, and its command passes in there.
    configured = inspect(service)["Config"]["Healthcheck"]
    assert configured["Test"] == compose_service(service)["healthcheck"]["test"]
    # As the engine judges it: unhealthy only after `retries` failures in a row. One failure
    # alone happens here: the host checks start as the suite's tests container goes, and
    # aardvark-dns 1.4 can drop a query while that reloads it (docs/operations.md, "Networks").
    results = []
    for _ in range(compose_service(service)["healthcheck"].get("retries", 3)):
        passed, result = run_check(container(service), check_argv(configured["Test"]), timeout=10)
        results.append(result)
        if passed:
            break
        time.sleep(1)
    assert passed, results


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


@pytest.mark.parametrize("service", ["nginx", "uwsgi-app", "flask-app", "tests"])
def test_project_images_declare_the_non_root_user(service):
    user = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Config.User}}", compose_service(service)["image"]],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    uid = UIDS.get(service, APP_UID)
    assert user == f"{uid}:{uid}"


def podman_compose(*args, **run_options):
    """podman-compose on this project, with run.sh's run options (a container it makes is made
    as run.sh made the others)."""
    return subprocess.run([str(Path(sys.executable).parent / "podman-compose"), "-f", str(REPO / "docker-compose.yml"),
                           "-p", PROJECT, "--profile", "test",
                           f"--podman-run-args={os.environ['COMPOSE_TEST_PODMAN_RUN_ARGS']}", *args],
                          capture_output=True, **run_options)


# podman 4.3's aardvark-dns 1.4 rebuilds its listeners whenever a container comes or goes, and
# for a while after that nginx's resolver socket (one UDP socket, kept) gets no answers, though
# a new socket does: measured by hand, 9 recreations of uwsgi-app, nginx's first 200 came 10 to
# 36 s after the new container was up, with resolver timeouts (502 after 12 s) meanwhile, while
# queries from fresh sockets in nginx's network namespace were answered within 2 s. nginx has
# no setting to take a new socket. So a check that follows a container change gives nginx up to
# NGINX_FOLLOW_SECONDS to reach the service again; it still fails where nginx never re-resolves.
NGINX_FOLLOW_SECONDS = 60


def nginx_request_seconds():
    """One request's longest honest wait through nginx: the template's resolver_timeout, its
    proxy_connect_timeout and a margin. Read when a host check runs: the tests container,
    which collects this module too, has no nginx/ folder."""
    template = (REPO / "nginx" / "templates" / "default.conf.template").read_text()
    return sum(int(re.search(rf"^\s*{name} (\d+)s;", template, re.M).group(1))
               for name in ("resolver_timeout", "proxy_connect_timeout")) + 1


def nginx_reaches(path, in_a_row=1, deadline=NGINX_FOLLOW_SECONDS):
    """GET `path` through nginx until it answers 200 IN_A_ROW times in a row: (seconds it
    took, statuses seen)."""
    started, statuses, timeout = time.monotonic(), [], nginx_request_seconds()
    while statuses[-in_a_row:] != [200] * in_a_row:
        assert time.monotonic() - started < deadline, f"nginx did not reach {path} in {deadline} s: {statuses}"
        statuses.append(http_get(path, timeout=timeout).status)
        time.sleep(0.1)
    return time.monotonic() - started, statuses


@pytest.fixture(autouse=True)
def nginx_serving():
    """Each check starts from a stack that nginx serves: checks before it made and removed
    containers (the suite's tests container, the one-off ones here, the recreations)."""
    nginx_reaches("/healthz")  # nginx's /healthz asks both apps


def address(service):
    return next(iter(inspect(service)["NetworkSettings"]["Networks"].values()))["IPAddress"]


def test_zz_nginx_follows_a_recreated_app_to_its_new_address():
    """As `docker compose up --force-recreate uwsgi-app`: a new container with a new address.
    nginx, not restarted, sends new requests there once its cached answer is
    NGINX_RESOLVER_VALID (5 s) old and the engine's DNS answers it (under podman 4.3 that can
    take longer: NGINX_FOLLOW_SECONDS); until then a request to the old address, which no
    longer answers, fails after nginx's proxy_connect_timeout (3 s), not its default 60 s.
    (Named zz: it runs last, as it replaces a container the other checks look at.)"""
    nginx_started = inspect("nginx")["State"]["StartedAt"]
    old_address = address("uwsgi-app")
    subprocess.run(["podman", "rm", "--force", "--time", "20", container("uwsgi-app")], check=True, capture_output=True)
    podman_compose("up", "-d", "--no-deps", "uwsgi-app", check=True)
    renamed = time.monotonic()  # the name resolves to the new address from here on
    assert address("uwsgi-app") != old_address  # podman's IPAM hands out the next free address
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    wait_healthy(container("uwsgi-app"), compose["services"]["uwsgi-app"]["healthcheck"])

    # NGINX_RESOLVER_VALID as the nginx image sets it (compose leaves it at that)
    valid = int(re.search(r"NGINX_RESOLVER_VALID=(\d+)s", (REPO / "nginx" / "Dockerfile").read_text()).group(1))
    took, statuses = nginx_reaches("/uwsgi/healthz")
    # Each nginx worker has a resolver cache of its own: the first 200 shows one worker has the
    # new address; another may keep the old one (or the gap's "not found") until its entry,
    # made before the new address existed at the latest, is NGINX_RESOLVER_VALID old.
    time.sleep(max(0.0, renamed + valid + 0.5 - time.monotonic()))
    all_took, all_statuses = nginx_reaches("/uwsgi/healthz", in_a_row=10)
    print(f"nginx: a first 200 after {took:.1f} s ({statuses}), 10 in a row after {all_took:.1f} s more "
          f"({len(all_statuses)} requests)")
    assert inspect("nginx")["State"]["StartedAt"] == nginx_started


def redis_cli_as_app(*args):
    """redis-cli in the redis container as the apps' user, its password read from the
    container's secret by the shell (never an argument)."""
    script = 'REDISCLI_AUTH="$(cat /run/secrets/redis-password)" exec redis-cli --no-auth-warning --user "$REDIS_USERNAME" "$@"'
    return subprocess.run(["podman", "exec", container("redis"), "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, timeout=30)


def test_redis_lets_nothing_in_without_the_password():
    for command in (["ping"], ["get", "chat-auth:hs256-secret"]):
        result = subprocess.run(["podman", "exec", container("redis"), "redis-cli", *command],
                                capture_output=True, text=True, timeout=30)
        assert "NOAUTH" in result.stdout + result.stderr, result
    assert redis_cli_as_app("ping").stdout.strip() == "PONG"


@pytest.mark.parametrize("command", [["FLUSHALL"], ["CONFIG", "GET", "maxmemory"], ["EVAL", "return 1", "0"],
                                     ["KEYS", "*"], ["ACL", "LIST"], ["DEL", "chat-auth:hs256-secret"],
                                     ["SET", "other", "x"]])
def test_the_apps_redis_user_may_not_administer_script_or_leave_the_chats_keys(command):
    result = redis_cli_as_app(*command)
    assert "NOPERM" in result.stdout, result


def test_the_redis_password_is_in_no_inspect_output_command_line_or_environment():
    password = (REPO / "secrets" / "redis-password").read_text().strip()
    assert len(password) >= 32
    for service in ("redis", "uwsgi-app", "flask-app"):
        assert password not in json.dumps(inspect(service)), service
        for pid in process_tree(main_pid(service)):
            for name in ("cmdline", "environ"):
                assert password.encode() not in Path(f"/proc/{pid}/{name}").read_bytes(), (service, pid, name)


def test_redis_can_write_its_append_only_file_to_its_volume():
    """REDIS_APPENDONLY=yes writes to /data: the redis-data volume must be the redis user's."""
    result = subprocess.run(["podman", "exec", container("redis"), "sh", "-c", 'test -w /data && stat -c %u /data'],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "999", result
    assert any(point == "/data" and fstype != "tmpfs" for _, point, _, fstype in mounts(main_pid("redis")))


# The networks (docs/operations.md, "Networks"): edge (nginx, tests), apps (nginx, the apps),
# data (the apps, Redis); apps and data internal. Checked by address, from inside the
# containers, so that a name that merely fails to resolve proves nothing.
NETWORKS = {"nginx": {"edge", "apps"}, "uwsgi-app": {"apps", "data"}, "flask-app": {"apps", "data"},
            "redis": {"data"}}


def addresses(service):
    """{network: address} of the running service, by the compose file's network names."""
    prefix = f"{PROJECT}_"
    return {name.removeprefix(prefix): settings["IPAddress"]
            for name, settings in inspect(service)["NetworkSettings"]["Networks"].items()}


def connects_from(service, host, port):
    """Whether SERVICE's container opens a TCP connection to HOST:PORT (python in the app
    images; curl in nginx's, which has no python). False means refused or no route/timeout."""
    if service == "nginx":
        result = subprocess.run(["podman", "exec", container("nginx"), "curl", "-sS", "-o", "/dev/null",
                                 "--connect-timeout", "3", f"http://{host}:{port}/"], capture_output=True, text=True,
                                timeout=30)
        # 7: refused or unreachable, 28: timed out; anything else came after a connection.
        return result.returncode not in (7, 28)
    script = ("import socket, sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
              "except OSError:\n sys.exit(1)\n")
    result = subprocess.run(["podman", "exec", container(service), "python", "-c", script, host, str(port)],
                            capture_output=True, text=True, timeout=30)
    return result.returncode == 0


def test_each_service_is_on_its_networks_only():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert {name: compose["networks"][name].get("internal", False) for name in ("edge", "apps", "data")} \
        == {"edge": False, "apps": True, "data": True}
    for service, networks in NETWORKS.items():
        assert set(addresses(service)) == networks, service
    for app in ("uwsgi-app", "flask-app"):
        resolv_conf = subprocess.run(["podman", "exec", container(app), "cat", "/etc/resolv.conf"],
                                     capture_output=True, text=True, check=True).stdout
        assert "options timeout:1" in resolv_conf, (app, resolv_conf)


def test_only_the_apps_reach_redis():
    redis = addresses("redis")["data"]
    assert connects_from("uwsgi-app", redis, 6379) and connects_from("flask-app", redis, 6379)
    assert not connects_from("nginx", redis, 6379)


def test_nginx_status_listener_is_on_the_apps_network_only():
    nginx = addresses("nginx")
    # Monitoring on the apps network reads it (from an app container here)...
    script = ("import sys, urllib.request\n"
              "print(urllib.request.urlopen(f'http://nginx-status:{sys.argv[1]}/stub_status', timeout=5).read().decode())")
    port = os.environ.get("NGINX_STATUS_PORT", "8081")
    result = subprocess.run(["podman", "exec", container("uwsgi-app"), "python", "-c", script, port],
                            capture_output=True, text=True, timeout=30)
    assert "Active connections:" in result.stdout, result
    assert connects_from("flask-app", nginx["apps"], port)
    # ...and nginx's address on edge has no such listener.
    assert not connects_from("nginx", nginx["edge"], port)


def test_the_tests_container_reaches_nginx_and_nothing_behind_it():
    """A one-off tests container (the compose service, its networks) tries every address behind nginx."""
    targets = [(addresses("redis")["data"], 6379), (addresses("nginx")["apps"], 8081)]
    for app in ("uwsgi-app", "flask-app"):
        targets += [(address, port) for address in addresses(app).values() for port in (8000, 9000)]
    script = ("import socket, sys\nfor target in sys.argv[1:]:\n host, port = target.rsplit(':', 1)\n try:\n"
              "  socket.create_connection((host, int(port)), timeout=3).close()\n  print('connected', target)\n"
              " except OSError as error:\n  print('refused', target, type(error).__name__)\n")
    argv = ["python", "-c", script, "nginx:8080"] + [f"{host}:{port}" for host, port in targets]
    result = podman_compose("run", "--rm", "--no-deps", "-T", "tests", *argv, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("connected", "refused"))]
    assert lines[0] == "connected nginx:8080", result
    assert all(line.startswith("refused") for line in lines[1:]) and len(lines) == 1 + len(targets), result


def recreate_redis(**environment):
    """As `REDIS_APPENDONLY=yes docker compose up -d redis` after a change: a new container
    from the compose file with these settings, on the same redis-data volume; healthy on return."""
    subprocess.run(["podman", "rm", "--force", "--time", "10", container("redis")], check=True, capture_output=True)
    podman_compose("up", "-d", "--no-deps", "redis", check=True, env={**os.environ, **environment})
    wait_healthy(container("redis"), compose_service("redis")["healthcheck"])


def test_zx_with_appendonly_the_chat_survives_a_redis_restart_in_its_volume():
    """REDIS_APPENDONLY=yes: the append-only file on the redis-data volume brings the data back
    after a restart; with the default (no), a restart starts empty. (Named zx: it replaces the
    Redis container, and puts the default one back.)"""
    def survives_restart(appendonly):
        recreate_redis(REDIS_APPENDONLY=appendonly)
        assert redis_cli_as_app("hset", "chat:persist-test", "kept", appendonly).stdout.strip() in ("0", "1")
        subprocess.run(["podman", "restart", "--time", "10", container("redis")], check=True, capture_output=True)
        wait_healthy(container("redis"), compose_service("redis")["healthcheck"])
        value = redis_cli_as_app("hget", "chat:persist-test", "kept").stdout.strip()
        redis_cli_as_app("expire", "chat:persist-test", "1")
        return value == appendonly

    try:
        assert survives_restart("yes")
        assert not survives_restart("no")
    finally:
        recreate_redis()
    assert redis_cli_as_app("ping").stdout.strip() == "PONG"


def test_zy_a_full_redis_refuses_writes_and_drops_nothing():
    """maxmemory (REDIS_MAXMEMORY, 160mb) with noeviction, in the running container: writes of
    1 MiB as the apps' user until Redis refuses one. The refusal is Redis's OOM error, well
    below the container's 256 MiB limit (so the kernel never kills Redis), and every key
    written before it is still there. (Named zy: it runs late, and cleans up after itself.)"""
    script = r'''
        export REDISCLI_AUTH="$(cat /run/secrets/redis-password)"
        cli() { redis-cli --no-auth-warning --user "$REDIS_USERNAME" "$@"; }
        i=0
        while [ "$i" -lt 400 ]; do
            out=$(head -c 1048576 /dev/zero | tr '\0' x | cli -x set "chat:oom-test:$i")
            [ "$out" = OK ] || { echo "refused $i $out"; break; }
            i=$((i + 1))
        done
        # EXPIRE answers 1 for a key that exists: none was evicted. It also removes them.
        kept=0; j=0
        while [ "$j" -lt "$i" ]; do
            [ "$(cli expire "chat:oom-test:$j" 1)" = 1 ] && kept=$((kept + 1))
            j=$((j + 1))
        done
        echo "kept $kept"
    '''
    result = subprocess.run(["podman", "exec", container("redis"), "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    refused = re.search(r"^refused (\d+) (.*)$", result.stdout, re.M)
    assert refused and "OOM" in refused.group(2), result
    written = int(refused.group(1))
    # About 160 MiB of values (less what the chat already holds), never the container's 256.
    assert 100 <= written <= 165, result
    assert f"kept {written}" in result.stdout, result
    assert inspect("redis")["State"]["Running"]
    time.sleep(2)  # the 1 s expiries: the chat's writes work again
    assert redis_cli_as_app("set", "chat:oom-test:after", "x").stdout.strip() == "OK"
    redis_cli_as_app("expire", "chat:oom-test:after", "1")
