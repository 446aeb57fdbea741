"""Container hardening, asserted on every service of docker-compose.yml so none of it can
silently go away. The running containers are checked too: tests/compose/test_containers.py.
"""
import json
import re
import subprocess

import pytest
import yaml

from repo import REPO, VENV_BIN
from test_config import ini_defaults

pytestmark = pytest.mark.local

# The contract other parts of the project rely on: who each service runs as.
EXPECTED_UIDS = {"nginx": 101, "uwsgi-app": 10001, "flask-app": 10001, "redis": 999, "tests": 10001}
# Without an init these would be PID 1, which ignores every signal it has no handler for:
# uWSGI's master before its SIGTERM hook is installed, pytest for SIGTERM at all.
NEEDS_INIT = {"uwsgi-app", "flask-app", "tests"}
# ...which the app images bring themselves (tini, their ENTRYPOINT, for Kubernetes and `docker
# run` too); compose adds one only where the image has none.
IMAGE_INIT = {"uwsgi-app", "flask-app"}
# After a component's own bound on its graceful stop, time for its master to reap the last
# worker and exit (and the init after it) before the engine's SIGKILL, on a loaded host.
EXIT_MARGIN = 3
# Docker's own default: hardening must not shorten it for the services without a bound.
DEFAULT_GRACE = 10

UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def services():
    return compose()["services"]


def seconds(duration):
    """A compose duration such as 15s, 1m30s or 500ms, in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def byte_count(size):
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", str(size).lower()).groups()
    return int(number) * UNITS[unit]


def final_stage(service):
    return re.split(r"^FROM ", (REPO / service / "Dockerfile").read_text(), flags=re.M)[-1]


def effective_user(name, service):
    """Compose's `user`, else the last USER of the image's final stage (None: root)."""
    if "user" in service:
        return str(service["user"])
    dockerfile = REPO / name / "Dockerfile"
    users = re.findall(r"^USER (\S+)$", final_stage(name), re.M) if dockerfile.exists() else []
    return users[-1] if users else None


def nginx_conf_value(directive):
    return re.search(rf"^\s*{directive}\s+(\S+);", (REPO / "nginx" / "nginx.conf").read_text(), re.M).group(1)


def nginx_cmd():
    return json.loads(re.findall(r"^CMD (\[.*\])$", (REPO / "nginx" / "Dockerfile").read_text(), re.M)[-1])


def minimum_grace(name):
    """The shortest stop_grace_period that still lets the service stop gracefully."""
    if name in ("uwsgi-app", "flask-app"):
        # A worker's graceful stop (close 1001 to every WebSocket, at most 3 s for the answers)
        # is bounded by worker-reload-mercy; the compose default must not exceed the ini's.
        mercy = ini_defaults()["UWSGI_WORKER_RELOAD_MERCY"]
        assert services()[name]["environment"]["UWSGI_WORKER_RELOAD_MERCY"] == f"${{UWSGI_WORKER_RELOAD_MERCY:-{mercy}}}"
        return int(mercy) + EXIT_MARGIN
    if name == "nginx":
        return seconds(nginx_conf_value("worker_shutdown_timeout")) + EXIT_MARGIN
    return DEFAULT_GRACE


def writable_paths(name):
    """Where each service writes; everything else stays on the read-only root filesystem."""
    if name == "nginx":
        cmd = nginx_cmd()
        # its prefix (pid, temporary files) and the official entrypoint's template output
        return {cmd[cmd.index("-p") + 1].rstrip("/"), "/etc/nginx/conf.d"}
    return {"tests": {"/tmp"}}.get(name, set())


def test_redis_writes_only_to_its_data_volume():
    """Redis's only writable place is /data, the redis-data volume (its append-only file with
    REDIS_APPENDONLY=yes; empty otherwise): no tmpfs, nothing else."""
    redis = services()["redis"]
    assert "tmpfs" not in redis
    assert [v for v in redis["volumes"] if not v.endswith(":ro")] == ["redis-data:/data"]
    assert "redis-data" in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]


def test_compose_lint_passes_with_only_the_documented_exceptions():
    result = subprocess.run(
        [str(VENV_BIN / "compose-lint"), "check", "--fail-on", "low", "--strict-config",
         "--config", str(REPO / ".compose-lint.yml"), "--format", "json", str(REPO / "docker-compose.yml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [f for f in findings if not f["suppressed"]] == []
    exceptions = yaml.safe_load((REPO / ".compose-lint.yml").read_text())["rules"]
    # Only what the config names, each with its reason: image tags of locally built images,
    # and Redis's missing digest.
    assert {(f["rule_id"], f["service"]) for f in findings} == {
        (rule, name) for rule, config in exceptions.items() for name in config["exclude_services"]
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_every_service_runs_as_its_non_root_user(name):
    user = effective_user(name, services()[name])
    assert user is not None, f"{name}: no USER in its image and no compose `user`: root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"{name}: numeric uid, so a runtime can check it is not root without /etc/passwd"
    assert int(uid) == EXPECTED_UIDS[name] and int(uid) != 0
    assert gid and int(gid) != 0


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_every_service_is_locked_down(name):
    service = services()[name]
    assert service.get("read_only") is True
    assert service.get("cap_drop") == ["ALL"]
    assert "cap_add" not in service
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert not service.get("privileged")
    assert service.get("init", False) is (name in NEEDS_INIT - IMAGE_INIT)


@pytest.mark.parametrize("name", sorted(IMAGE_INIT))
def test_the_app_images_start_tini_as_pid_1(name):
    dockerfile = (REPO / name / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^ENTRYPOINT \[\"tini\", \"--\"\]$", final_stage, re.M)
    # The static binary from the build stage's pinned package: the final stage runs no apt.
    assert "COPY --from=build /usr/bin/tini-static /usr/bin/tini" in final_stage
    assert re.search(r"apt-get install -y --no-install-recommends .* tini=0\.19\.\*", dockerfile)


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_every_service_has_memory_cpu_and_process_limits(name):
    service = services()[name]
    # Service-level spellings: part of the Compose Specification's service definition, so
    # every implementation applies them (`deploy` is optional there).
    assert byte_count(service["mem_limit"]) >= 64 * UNITS["m"]
    assert 0 < float(service["cpus"]) <= 2  # Docker refuses more CPUs than the host has; 2 cores here
    assert int(service["pids_limit"]) >= 16
    assert not {"deploy", "mem_reservation", "memswap_limit"} & set(service)


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_tmpfs_only_where_the_service_writes_and_each_capped(name):
    entries = services()[name].get("tmpfs", [])
    assert {entry.split(":")[0] for entry in entries} == writable_paths(name)
    for entry in entries:
        options = entry.partition(":")[2].split(",")
        assert any(re.fullmatch(r"size=\d+[kmg]", option) for option in options), f"{name}: {entry} has no size"


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_stop_grace_period_outlasts_the_graceful_stop(name):
    grace = services()[name].get("stop_grace_period")
    assert grace, f"{name}: no stop_grace_period"
    assert seconds(grace) >= minimum_grace(name)


def test_open_file_limits_fit_the_configured_connections():
    nginx = services()["nginx"]["ulimits"]["nofile"]
    # a non-root master cannot raise its hard limit for worker_rlimit_nofile (a setting,
    # rendered into nginx.conf's main context), which must hold worker_connections
    compose_defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", (REPO / "docker-compose.yml").read_text()))
    assert "include conf.d/workers.inc;" in (REPO / "nginx" / "nginx.conf").read_text()
    assert nginx["soft"] == nginx["hard"] >= int(compose_defaults["NGINX_WORKER_RLIMIT_NOFILE"]) >= \
        int(compose_defaults["NGINX_WORKER_CONNECTIONS"])
    for app in ("uwsgi-app", "flask-app"):
        nofile = services()[app]["ulimits"]["nofile"]
        # each of a worker's gevent cores may hold a WebSocket, i.e. a descriptor
        assert nofile["soft"] == nofile["hard"] > int(ini_defaults()["UWSGI_GEVENT"])


def test_nginx_writes_only_to_its_prefix_and_the_rendered_templates():
    # pid and temporary files are relative: they land in the -p prefix in both modes
    # (.run/nginx/ locally, a tmpfs in the container), never in the compiled-in /var paths.
    conf = (REPO / "nginx" / "nginx.conf").read_text()
    assert nginx_conf_value("pid") == "nginx.pid"
    for module in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        path = nginx_conf_value(f"{module}_temp_path")
        assert not path.startswith("/"), module
    assert not re.search(r"^\s*user\s", conf, re.M), "the unprivileged master cannot switch users"
    # A tmpfs on an image directory takes that directory's mode, owned by root: conf.d must
    # be writable for nginx's uid in the image itself.
    assert re.search(r"^RUN chmod 1777 /etc/nginx/conf\.d$", final_stage("nginx"), re.M)
