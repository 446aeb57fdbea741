"""Docker and local mode are one system: same programs, same config files, same defaults."""
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from repo import REPO, load_stack_module

pytestmark = pytest.mark.local


def dockerfile_cmd(service):
    text = (REPO / service / "Dockerfile").read_text()
    return yaml.safe_load(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])


def dockerfile_copies(service):
    """Container path -> repository path, from the Dockerfile's COPY lines (context: repo root)."""
    text = (REPO / service / "Dockerfile").read_text()
    return {dst: REPO / src for src, dst in re.findall(r"^COPY (?!--from)(\S+) (\S+)$", text, re.M)}


def container_to_repo(service, container_path):
    for dst, src in sorted(dockerfile_copies(service).items(), key=lambda item: -len(item[0])):
        if container_path.startswith(dst):
            return (src / container_path[len(dst):]) if dst.endswith("/") else src
    raise AssertionError(f"{container_path} is not copied into the {service} image")


def dockerfile_env(service):
    text = (REPO / service / "Dockerfile").read_text()
    block = re.search(r"^ENV ((?:.*\\\n)*.*)$", text, re.M).group(1).replace("\\\n", " ")
    return dict(item.split("=", 1) for item in shlex.split(block))


def ini_defaults():
    """The default each if-not-env block of common/uwsgi-base.ini applies, by variable name."""
    text = (REPO / "common" / "uwsgi-base.ini").read_text()
    # (a default given to a placeholder, set-placeholder = name=value, is the value)
    return {var: value for var, value in re.findall(r"if-not-env = (\w+)\n[\w-]+ = (?:\w+=)?(\S+)\nendif =", text)
            if var != "WSSTACK_ALLOW_STOCK_UWSGI"}


@pytest.fixture
def local_services(tmp_path, monkeypatch):
    stack = load_stack_module()
    settings = stack.load_settings({"LOCAL_RUN_DIR": str(tmp_path)})
    services, _ = stack.build_services(settings, "test")
    return {service.name: service for service in services}


@pytest.mark.parametrize("app", ["uwsgi-app", "flask-app"])
def test_apps_start_the_same_program_with_the_same_config_in_both_modes(app, local_services):
    container = dockerfile_cmd(app)
    local = local_services[app].argv
    assert container[0] == "uwsgi" and local[0].endswith("/uwsgi")
    assert container[1:2] == local[1:2] == ["--ini"]
    assert container_to_repo(app, container[2]) == REPO / app / "uwsgi.ini" == type(REPO)(local[2])
    # The ini includes ../common/uwsgi-base.ini: the image must keep that layout.
    assert container_to_repo(app, "/srv/stack/common/uwsgi-base.ini") == REPO / "common" / "uwsgi-base.ini"


def nginx_options(argv):
    """nginx's command line as {option: value}; every option it takes here has a value."""
    assert argv[0].endswith("nginx") and len(argv) % 2 == 1
    return dict(zip(argv[1::2], argv[2::2]))


def test_nginx_runs_the_same_main_config_and_templates_in_both_modes(local_services):
    container = nginx_options(dockerfile_cmd("nginx"))
    local = nginx_options(local_services["nginx"].argv)
    # Same options; only the prefix (pid, temporary files) differs: the container's is its tmpfs.
    assert set(container) == set(local) == {"-e", "-p", "-c"}
    assert container["-e"] == local["-e"] == "stderr"
    assert container["-p"] == "/tmp/" and local["-p"].endswith("/")
    assert container_to_repo("nginx", container["-c"]) == REPO / "nginx" / "nginx.conf"
    assert container_to_repo("nginx", "/etc/nginx/templates/") == REPO / "nginx" / "templates/"
    local_conf = type(REPO)(local["-c"])
    assert local_conf.resolve() == REPO / "nginx" / "nginx.conf"
    rendered = (local_conf.parent / "conf.d" / "default.conf").read_text()
    # Both modes reach the apps by service name, resolved at request time: locally through the
    # runner's DNS server, in the image through the resolvers of /etc/resolv.conf.
    assert "resolver 127.0.0.1:8053 valid=5s ipv6=off;" in rendered
    assert "set $uwsgi_app uwsgi-app:8001;" in rendered and "set $flask_app flask-app:8002;" in rendered
    assert re.findall(r"proxy_pass (\S+);", rendered) == ["http://$flask_app/healthz", "http://$uwsgi_app/healthz",
                                                          "http://$uwsgi_app",  # /auth/token
                                                          "http://$uwsgi_app", "http://$flask_app",
                                                          # the status port's detailed health
                                                          "http://$uwsgi_app/healthz", "http://$flask_app/healthz"]
    # nginx.conf's main context takes the worker settings from the same rendering.
    assert "include conf.d/workers.inc;" in (REPO / "nginx" / "nginx.conf").read_text()
    workers = (local_conf.parent / "conf.d" / "workers.inc").read_text()
    assert "worker_processes auto;" in workers and "worker_connections 16384;" in workers
    assert not re.search(r"^\s*upstream ", rendered, re.M)  # an upstream block would resolve its names once, at start


def test_shared_defaults_agree_across_compose_dockerfiles_ini_and_local_runner():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose_text = (REPO / "docker-compose.yml").read_text()
    compose_defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", compose_text))
    stack = load_stack_module()
    ini = ini_defaults()
    nginx_env = dockerfile_env("nginx")

    # The bind address is per mode: loopback by default, all interfaces inside the images.
    socket_default = ini.pop("UWSGI_HTTP_SOCKET")
    assert socket_default.startswith("127.0.0.1:")
    for app in ("uwsgi-app", "flask-app"):
        assert dockerfile_env(app)["UWSGI_HTTP_SOCKET"] == "0.0.0.0:8000"
        # By service name, resolved by nginx at request time (the image sets the resolvers).
        assert nginx_env[f"NGINX_{app.replace('-', '_').upper()}_UPSTREAM"] == f"{app}:8000"
    assert container_to_repo("nginx", "/docker-entrypoint.d/15-resolver.envsh") == \
        REPO / "nginx" / "docker-entrypoint.d" / "15-resolver.envsh"
    assert stack.DEFAULTS["NGINX_RESOLVER_VALID"] == nginx_env["NGINX_RESOLVER_VALID"]
    assert {k for k in ini if k.startswith("UWSGI_")} == {k for k in compose["x-app-environment"] if k.startswith("UWSGI_")}
    for name, value in ini.items():
        assert compose_defaults[name] == value, name
    # The engine's frame-rate limit (patch 0015) takes the app's message-rate settings, with the
    # same defaults as the Python limit (wsstack/ratelimit.py), which reads them itself.
    ratelimit = (REPO / "common" / "wsstack" / "ratelimit.py").read_text()
    for name in ("WS_MAX_MESSAGES_PER_SECOND", "WS_MESSAGE_BURST"):
        assert re.search(rf'env_whole_number\("{name}", "{ini[name]}"\)', ratelimit), name
    assert stack.DEFAULTS["UWSGI_WEBSOCKETS_PING_FREQ"] == ini["UWSGI_WEBSOCKETS_PING_FREQ"]
    assert stack.DEFAULTS["NGINX_PROXY_READ_TIMEOUT"] == nginx_env["NGINX_PROXY_READ_TIMEOUT"]
    assert compose_defaults["NGINX_PROXY_READ_TIMEOUT"] == nginx_env["NGINX_PROXY_READ_TIMEOUT"]
    assert stack.DEFAULTS["NGINX_SEND_TIMEOUT"] == nginx_env["NGINX_SEND_TIMEOUT"] == compose_defaults["NGINX_SEND_TIMEOUT"]
    assert stack.DEFAULTS["NGINX_PORT"] == nginx_env["NGINX_PORT"] == compose_defaults["NGINX_PORT"]
    for name in ("NGINX_WS_CONNECTIONS_PER_IP", "NGINX_WS_HANDSHAKES_PER_SECOND", "NGINX_WS_HANDSHAKE_BURST",
                 "NGINX_AUTH_REQUESTS_PER_MINUTE", "NGINX_AUTH_REQUEST_BURST", "NGINX_TLS_PORT", "NGINX_TLS_CERTIFICATE", "NGINX_TLS_CERTIFICATE_KEY", "NGINX_HTTPS_REDIRECT",
                 "NGINX_HSTS_MAX_AGE", "NGINX_STATUS_PORT", "NGINX_CLIENT_HEADER_TIMEOUT",
                 "NGINX_HEALTH_REQUESTS_PER_SECOND", "NGINX_HEALTH_REQUEST_BURST", "NGINX_WORKER_CONNECTIONS",
                 "NGINX_WORKER_RLIMIT_NOFILE"):
        assert stack.DEFAULTS[name] == nginx_env[name] == compose_defaults[name] == k8s_nginx_env()[name], name
    # The image and the containers are sized for their CPU limit (test_nginx_sizing_fits_the_limits);
    # local mode has none.
    assert nginx_env["NGINX_WORKER_PROCESSES"] == compose_defaults["NGINX_WORKER_PROCESSES"] == \
        k8s_nginx_env()["NGINX_WORKER_PROCESSES"] == "1"
    assert stack.DEFAULTS["NGINX_WORKER_PROCESSES"] == "auto"
    # nginx must outlast the pings by default, not only in the tests' shortened setup.
    assert stack.nginx_seconds("t", nginx_env["NGINX_PROXY_READ_TIMEOUT"]) > int(ini["UWSGI_WEBSOCKETS_PING_FREQ"])


def test_redis_starts_the_same_way_with_the_same_defaults_in_both_modes(local_services):
    """One start script (redis/redis-start.sh) for the compose service and local mode, with
    the same Redis settings; the apps' user and password file agree with the apps'."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["redis"]
    mounts = dict(reversed(v.rsplit(":", 2)[:2]) for v in service["volumes"] if v.endswith(":ro"))
    assert service["command"][0] == "sh" and REPO / mounts[service["command"][1]] == REPO / "redis" / "redis-start.sh"
    local = local_services["redis"]
    assert local.argv[:2] == ["sh", str(REPO / "redis" / "redis-start.sh")]
    stack = load_stack_module()
    compose_env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()}
    for name in ("REDIS_USERNAME", "REDIS_MAXMEMORY", "REDIS_APPENDONLY"):
        assert stack.DEFAULTS[name] == compose_env[name] == local.env[name], name
    apps = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in compose["x-app-environment"].items()}
    for name in ("REDIS_USERNAME", "REDIS_PASSWORD_FILE"):
        assert apps[name] == compose_env[name] == dockerfile_env("uwsgi-app")[name] == dockerfile_env("flask-app")[name]
    assert set(service["secrets"]) == set(compose["services"]["uwsgi-app"]["secrets"]) == {"redis-password"}
    assert compose_env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
    # Local mode: its own password files, never the compose one; the admin only here.
    assert Path(local.env["REDIS_PASSWORD_FILE"]).parent == Path(local.env["REDIS_ADMIN_PASSWORD_FILE"]).parent
    assert "REDIS_ADMIN_PASSWORD_FILE" not in service["environment"]


def test_local_mode_makes_the_redis_passwords_once_readable_only_by_you(local_services, tmp_path):
    local = local_services["redis"]
    files = [Path(local.env["REDIS_PASSWORD_FILE"]), Path(local.env["REDIS_ADMIN_PASSWORD_FILE"])]
    contents = [f.read_text() for f in files]
    assert len(set(contents)) == 2 and all(len(c.strip()) >= 40 for c in contents)
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    stack = load_stack_module()  # a second start keeps them (a persisted Redis still knows them)
    services, _ = stack.build_services(stack.load_settings({"LOCAL_RUN_DIR": str(tmp_path)}), "again")
    again = {s.name: s for s in services}["redis"]
    assert [Path(again.env[n]).read_text() for n in ("REDIS_PASSWORD_FILE", "REDIS_ADMIN_PASSWORD_FILE")] == contents


@pytest.mark.parametrize("setting, value", [("REDIS_MAXMEMORY", "0"), ("REDIS_MAXMEMORY", "lots"),
                                            ("REDIS_APPENDONLY", "always"), ("REDIS_USERNAME", "default"),
                                            ("REDIS_USERNAME", "a b")])
def test_invalid_redis_settings_fail_fast_in_local_mode(setting, value):
    stack = load_stack_module()
    with pytest.raises(SystemExit, match=setting):
        stack.load_settings({setting: value})


def k8s_nginx_env():
    lines = (REPO / "k8s" / "base" / "nginx.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# nginx sizing (docs/configuration.md, "nginx sizing"): what one proxied idle WebSocket costs
# nginx (two connections: client and app), measured by the bench, and what the master, the
# shared zones and each worker's preallocated connection arrays take before any traffic.
NGINX_KIB_PER_WEBSOCKET = 17.9
NGINX_BASE_MIB = 32
MEMORY_HEADROOM = 0.75  # of the limit; the rest for messages in flight and TLS buffers
OPEN_FILES_RESERVE = 1024  # listening sockets, logs, the resolver's sockets, files being sent


def nginx_sizing(cpus, memory_mib, nofile):
    """(worker_processes, worker_connections) the formula gives for a container's limits."""
    workers = math.ceil(cpus)
    websockets_per_worker = (memory_mib * MEMORY_HEADROOM - NGINX_BASE_MIB) * 1024 / NGINX_KIB_PER_WEBSOCKET / workers
    connections = min(2 * websockets_per_worker, nofile - OPEN_FILES_RESERVE)
    return workers, 2 ** int(math.log2(connections))  # a power of two at most that


def k8s_quantity(value, units):
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def test_nginx_sizing_fits_the_limits():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["nginx"]
    compose_defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", (REPO / "docker-compose.yml").read_text()))
    memory_mib = int(compose["mem_limit"].removesuffix("m"))
    nofile = compose["ulimits"]["nofile"]
    assert nofile["soft"] == nofile["hard"] == int(compose_defaults["NGINX_WORKER_RLIMIT_NOFILE"])
    assert nginx_sizing(compose["cpus"], memory_mib, nofile["soft"]) == (
        int(compose_defaults["NGINX_WORKER_PROCESSES"]), int(compose_defaults["NGINX_WORKER_CONNECTIONS"]))

    pod = next(doc for doc in yaml.safe_load_all((REPO / "k8s" / "base" / "nginx.yaml").read_text())
               if doc and doc["kind"] == "Deployment")
    limits = pod["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    env = k8s_nginx_env()
    assert nginx_sizing(k8s_quantity(limits["cpu"], {"": 1, "m": 0.001}),
                        k8s_quantity(limits["memory"], {"Mi": 1, "Gi": 1024}),
                        int(env["NGINX_WORKER_RLIMIT_NOFILE"])) == (
        int(env["NGINX_WORKER_PROCESSES"]), int(env["NGINX_WORKER_CONNECTIONS"]))
    # Whatever the sizing, one address may open its NGINX_WS_CONNECTIONS_PER_IP WebSockets.
    for settings in (compose_defaults, env):
        assert int(settings["NGINX_WORKER_CONNECTIONS"]) >= 2 * int(settings["NGINX_WS_CONNECTIONS_PER_IP"])


def test_nginx_sizing_formula():
    # Two CPUs: two workers sharing the memory; a tight open-files limit caps the connections.
    assert nginx_sizing(2, 256, 20000) == (2, 8192)
    assert nginx_sizing(0.5, 256, 20000) == (1, 16384)
    assert nginx_sizing(1, 512, 20000) == (1, 16384)
    assert nginx_sizing(1, 512, 100000) == (1, 32768)
    assert nginx_sizing(1, 128, 20000) == (1, 4096)


def test_the_images_keep_the_uwsgi_stats_server_inside_the_container():
    # Its dump holds the headers of every in-flight request (tests/test_metrics.py shows the
    # chat's token in it): never on an address another container or host reaches.
    for app in ("uwsgi-app", "flask-app"):
        assert dockerfile_env(app)["UWSGI_STATS"].startswith("127.0.0.1:"), app
