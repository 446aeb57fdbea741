"""Run the whole stack as local processes: `make run` (foreground) without Docker.

Starts a DNS server for the service names (scripts/localdns.py), redis-server, uwsgi-app,
flask-app and nginx from the same config files the containers use (uwsgi-app/uwsgi.ini, flask-app/uwsgi.ini, nginx/nginx.conf and
nginx/templates/*.template rendered the same way), waits until each passes its health
check, and relays their output prefixed with the service name. SIGINT or SIGTERM stops
them gracefully, then forcibly after a grace period: both apps first, together, while nginx
still relays the close 1001 they send to every WebSocket client, then nginx, then redis;
then the DNS server; nothing is left running. If a service dies, the rest are stopped and the exit status
is non-zero.

Every child carries STACK_INSTANCE_ID in its environment, so a test can prove that no
process of a stopped stack survives.
"""
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "common"))

from wsstack import probe  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import localdns  # noqa: E402

# Local-mode defaults. The container defaults live in the Dockerfiles and docker-compose.yml;
# tests/test_config.py keeps the shared ones equal.
DEFAULTS = {
    "NGINX_HOST": "127.0.0.1",
    "NGINX_PORT": "8080",
    "NGINX_PROXY_READ_TIMEOUT": "60s",
    "NGINX_SEND_TIMEOUT": "10s",
    "NGINX_CLIENT_HEADER_TIMEOUT": "10s",
    "NGINX_HEALTH_REQUESTS_PER_SECOND": "10",
    "NGINX_HEALTH_REQUEST_BURST": "20",
    # Local mode has no CPU limit: a worker per core, as nginx's auto does.
    "NGINX_WORKER_PROCESSES": "auto",
    "NGINX_WORKER_CONNECTIONS": "16384",
    "NGINX_WORKER_RLIMIT_NOFILE": "20000",
    "NGINX_WS_CONNECTIONS_PER_IP": "1000",
    "NGINX_WS_HANDSHAKES_PER_SECOND": "100",
    "NGINX_WS_HANDSHAKE_BURST": "500",
    "NGINX_AUTH_REQUESTS_PER_MINUTE": "30",
    "NGINX_AUTH_REQUEST_BURST": "20",
    "NGINX_RESOLVER_VALID": "5s",
    "NGINX_TLS_PORT": "8443",
    # Both empty: a development certificate is made in LOCAL_RUN_DIR/tls (nginx/dev-certs.sh).
    "NGINX_TLS_CERTIFICATE": "",
    "NGINX_TLS_CERTIFICATE_KEY": "",
    "NGINX_HTTPS_REDIRECT": "off",
    # Empty: every name is served (docs/operations.md, "Server name").
    "NGINX_SERVER_NAME": "",
    "NGINX_HSTS_MAX_AGE": "0",
    # The proxies whose X-Forwarded-For nginx believes; unix: trusts none (docs/configuration.md).
    "NGINX_REAL_IP_FROM": "unix:",
    # The status listener's address: compose binds it to nginx's address on the apps network.
    "NGINX_STATUS_HOST": "127.0.0.1",
    "NGINX_STATUS_PORT": "8081",
    "LOCAL_UWSGI_APP_PORT": "8001",
    "LOCAL_FLASK_APP_PORT": "8002",
    "LOCAL_REDIS_PORT": "6379",
    # Redis (redis/redis-start.sh); the passwords are made in LOCAL_RUN_DIR/secrets on first start.
    "REDIS_USERNAME": "chat",
    "REDIS_MAXMEMORY": "160mb",
    "REDIS_APPENDONLY": "no",
    "LOCAL_DNS_PORT": "8053",
    "LOCAL_RUN_DIR": str(REPO / ".run"),
    "LOCAL_STARTUP_TIMEOUT": "60",
    "LOCAL_STOP_TIMEOUT": "20",
    "LOCAL_REPLICAS": "1",
    "UWSGI_WEBSOCKETS_PING_FREQ": "20",
    # internal only (docs/operations.md, "Observability"): each app's /metrics socket and uWSGI stats server
    "LOCAL_UWSGI_APP_METRICS_PORT": "9001",
    "LOCAL_FLASK_APP_METRICS_PORT": "9002",
    "LOCAL_UWSGI_APP_STATS_PORT": "9011",
    "LOCAL_FLASK_APP_STATS_PORT": "9012",
}
MAX_REPLICAS = 8
# nginx's workers: more than the pids limits allow is a mistake; fewer connections than a
# handful of WebSockets is one too.
MAX_NGINX_WORKERS = 64
MIN_NGINX_WORKER_CONNECTIONS = 64
INTERNAL_PORT_SETTINGS = ("NGINX_STATUS_PORT", "LOCAL_UWSGI_APP_METRICS_PORT", "LOCAL_FLASK_APP_METRICS_PORT",
                          "LOCAL_UWSGI_APP_STATS_PORT", "LOCAL_FLASK_APP_STATS_PORT")
PORT_SETTINGS = ("NGINX_PORT", "NGINX_TLS_PORT", "LOCAL_UWSGI_APP_PORT", "LOCAL_FLASK_APP_PORT", "LOCAL_REDIS_PORT",
                 "LOCAL_DNS_PORT") + INTERNAL_PORT_SETTINGS
# per app: its public port setting, then its internal ones; every replica has its own address
APP_PORT_SETTINGS = {
    "uwsgi-app": ("LOCAL_UWSGI_APP_PORT", "LOCAL_UWSGI_APP_METRICS_PORT", "LOCAL_UWSGI_APP_STATS_PORT"),
    "flask-app": ("LOCAL_FLASK_APP_PORT", "LOCAL_FLASK_APP_METRICS_PORT", "LOCAL_FLASK_APP_STATS_PORT"),
}
APPS = tuple((app, names[0]) for app, names in APP_PORT_SETTINGS.items())
TLS_FILE_SETTINGS = ("NGINX_TLS_CERTIFICATE", "NGINX_TLS_CERTIFICATE_KEY")
NGINX_TIME = re.compile(r"^([1-9][0-9]*)(ms|s|m|h)?$")
NGINX_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def say(text):
    """Write a line of our output. Whoever reads it (a terminal, a pipe) may be gone, e.g. a
    caller that died; a failed write must never stop us from stopping the services."""
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


class ConfigError(SystemExit):
    def __init__(self, message):
        super().__init__(f"stack: invalid configuration: {message}")


def nginx_seconds(name, value):
    match = NGINX_TIME.match(value)
    if not match:
        raise ConfigError(f"{name}={value!r} is not an nginx time such as 60s or 2m")
    return int(match.group(1)) * NGINX_TIME_UNITS[match.group(2)]


def load_settings(environ):
    settings = {name: environ.get(name, default) for name, default in DEFAULTS.items()}
    for name in PORT_SETTINGS:
        value = settings[name]
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ConfigError(f"{name}={value!r} is not a port number (1-65535)")
    if settings["NGINX_TLS_PORT"] == settings["NGINX_PORT"]:
        raise ConfigError(f"NGINX_TLS_PORT must differ from NGINX_PORT ({settings['NGINX_PORT']})")
    if len({settings[name] for name in PORT_SETTINGS}) != len(PORT_SETTINGS):
        raise ConfigError(f"{', '.join(PORT_SETTINGS)} must all differ")
    for name in ("NGINX_HOST", "NGINX_STATUS_HOST"):
        try:
            address = ipaddress.ip_address(settings[name])
        except ValueError as exc:
            raise ConfigError(f"{name}={settings[name]!r} is not an IP address") from exc
        if not address.is_loopback:
            raise ConfigError(f"{name} must be a loopback address in local mode")
    for name in ("LOCAL_STARTUP_TIMEOUT", "LOCAL_STOP_TIMEOUT", "UWSGI_WEBSOCKETS_PING_FREQ"):
        if not settings[name].isdigit() or int(settings[name]) < 1:
            raise ConfigError(f"{name}={settings[name]!r} must be a whole number of seconds >= 1")
    if not settings["LOCAL_REPLICAS"].isdigit() or not 1 <= int(settings["LOCAL_REPLICAS"]) <= MAX_REPLICAS:
        raise ConfigError(f"LOCAL_REPLICAS={settings['LOCAL_REPLICAS']!r} must be a whole number from 1 to {MAX_REPLICAS}")
    for name in ("NGINX_WS_CONNECTIONS_PER_IP", "NGINX_WS_HANDSHAKES_PER_SECOND", "NGINX_WS_HANDSHAKE_BURST",
                 "NGINX_AUTH_REQUESTS_PER_MINUTE", "NGINX_AUTH_REQUEST_BURST", "NGINX_HEALTH_REQUESTS_PER_SECOND",
                 "NGINX_HEALTH_REQUEST_BURST"):
        if not settings[name].isdigit() or int(settings[name]) < 1:
            raise ConfigError(f"{name}={settings[name]!r} must be a whole number >= 1")
    if int(settings["NGINX_WS_CONNECTIONS_PER_IP"]) > 65535:  # nginx's own ceiling for limit_conn
        raise ConfigError(f"NGINX_WS_CONNECTIONS_PER_IP={settings['NGINX_WS_CONNECTIONS_PER_IP']} must be at most 65535")
    check_tls_settings(settings)
    check_real_ip_from(settings)
    check_redis_settings(settings)
    check_worker_settings(settings)
    header_timeout = settings["NGINX_CLIENT_HEADER_TIMEOUT"]
    if not re.fullmatch(r"[1-9][0-9]*[sm]?", header_timeout):  # as 16-limits.envsh: no ms, none below 1s
        raise ConfigError(f"NGINX_CLIENT_HEADER_TIMEOUT={header_timeout!r} must be an nginx time of at least 1s, "
                          "such as 10s or 1m")
    nginx_seconds("NGINX_SEND_TIMEOUT", settings["NGINX_SEND_TIMEOUT"])
    if nginx_seconds("NGINX_RESOLVER_VALID", settings["NGINX_RESOLVER_VALID"]) < 1:
        raise ConfigError("NGINX_RESOLVER_VALID must be at least 1s")
    read_timeout = nginx_seconds("NGINX_PROXY_READ_TIMEOUT", settings["NGINX_PROXY_READ_TIMEOUT"])
    if read_timeout <= int(settings["UWSGI_WEBSOCKETS_PING_FREQ"]):
        raise ConfigError(
            "NGINX_PROXY_READ_TIMEOUT must exceed UWSGI_WEBSOCKETS_PING_FREQ, "
            "or nginx closes idle WebSockets between two pings"
        )
    return settings


def check_redis_settings(settings):
    """redis/redis-start.sh checks the same in the containers."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", settings["REDIS_USERNAME"]) or settings["REDIS_USERNAME"] in ("default", "admin"):
        raise ConfigError(f"REDIS_USERNAME={settings['REDIS_USERNAME']!r} must be letters, digits, _ and - "
                          "(default and admin are reserved)")
    if not re.fullmatch(r"[1-9][0-9]*([kmg]b?|b)?", settings["REDIS_MAXMEMORY"], re.I):
        raise ConfigError(f"REDIS_MAXMEMORY={settings['REDIS_MAXMEMORY']!r} is not a size such as 160mb")
    if settings["REDIS_APPENDONLY"] not in ("yes", "no"):
        raise ConfigError(f"REDIS_APPENDONLY={settings['REDIS_APPENDONLY']!r} must be yes or no")


def redis_password_files(run_dir):
    """(the apps' password file, the admin's): random passwords made on first start, kept
    across restarts (a Redis with REDIS_APPENDONLY=yes outlives a stop), mode 0600."""
    secrets_dir = run_dir / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    paths = secrets_dir / "redis-password", secrets_dir / "redis-admin-password"
    for path in paths:
        if not path.exists():
            # O_EXCL: never over a file that appeared meanwhile; no moment of wider permissions.
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")
    return paths


def check_worker_settings(settings):
    """The container checks the same in nginx/docker-entrypoint.d/16-limits.envsh."""
    processes = settings["NGINX_WORKER_PROCESSES"]
    if processes != "auto" and not (processes.isdigit() and 1 <= int(processes) <= MAX_NGINX_WORKERS):
        raise ConfigError(f"NGINX_WORKER_PROCESSES={processes!r} must be auto or a whole number from 1 to {MAX_NGINX_WORKERS}")
    for name in ("NGINX_WORKER_CONNECTIONS", "NGINX_WORKER_RLIMIT_NOFILE"):
        if not settings[name].isdigit() or int(settings[name]) < MIN_NGINX_WORKER_CONNECTIONS:
            raise ConfigError(f"{name}={settings[name]!r} must be a whole number >= {MIN_NGINX_WORKER_CONNECTIONS}")
    if int(settings["NGINX_WORKER_CONNECTIONS"]) > int(settings["NGINX_WORKER_RLIMIT_NOFILE"]):
        raise ConfigError(f"NGINX_WORKER_CONNECTIONS={settings['NGINX_WORKER_CONNECTIONS']} exceeds "
                          f"NGINX_WORKER_RLIMIT_NOFILE={settings['NGINX_WORKER_RLIMIT_NOFILE']}: "
                          "each connection is an open file")


def check_real_ip_from(settings):
    """The container checks the same in nginx/docker-entrypoint.d/12-real-ip.envsh."""
    value = settings["NGINX_REAL_IP_FROM"]
    if value != "unix:":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"NGINX_REAL_IP_FROM={value!r} must be an address, a CIDR such as 10.0.0.0/8, "
                              "or unix: (no proxy trusted)") from None


def check_server_name(settings):
    """The container (and the local rendering) checks the same in nginx/docker-entrypoint.d/17-server-name.envsh."""
    name = settings["NGINX_SERVER_NAME"]
    if not name and settings["NGINX_HTTPS_REDIRECT"] == "on":
        raise ConfigError("NGINX_HTTPS_REDIRECT=on needs NGINX_SERVER_NAME, the name the redirect sends clients to "
                          "(never the Host they sent)")
    label = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
    if name and not re.fullmatch(rf"{label}(\.{label})*", name):
        raise ConfigError(f"NGINX_SERVER_NAME={name!r} must be one host name, such as chat.example.com")


def check_tls_settings(settings):
    """The container checks the same in nginx/docker-entrypoint.d/15-tls-certificate.envsh."""
    if settings["NGINX_HTTPS_REDIRECT"] not in ("on", "off"):
        raise ConfigError(f"NGINX_HTTPS_REDIRECT={settings['NGINX_HTTPS_REDIRECT']!r} must be on or off")
    check_server_name(settings)
    if not settings["NGINX_HSTS_MAX_AGE"].isdigit():
        raise ConfigError(f"NGINX_HSTS_MAX_AGE={settings['NGINX_HSTS_MAX_AGE']!r} "
                          "must be a whole number of seconds (0: no header)")
    given = [name for name in TLS_FILE_SETTINGS if settings[name]]
    if len(given) == 1:
        missing = next(name for name in TLS_FILE_SETTINGS if name not in given)
        raise ConfigError(f"NGINX_TLS_CERTIFICATE and NGINX_TLS_CERTIFICATE_KEY go together: {missing} is missing")
    for name in given:
        if not os.path.isfile(settings[name]) or not os.access(settings[name], os.R_OK):
            raise ConfigError(f"{name}={settings[name]} is not a readable file")


def tls_certificate(settings, run_dir):
    """(certificate, key) for nginx: the configured files, or the development ones, made if needed."""
    if settings["NGINX_TLS_CERTIFICATE"]:
        return settings["NGINX_TLS_CERTIFICATE"], settings["NGINX_TLS_CERTIFICATE_KEY"]
    dev_dir = run_dir / "tls"
    made = subprocess.run([str(REPO / "nginx" / "dev-certs.sh"), str(dev_dir)])
    if made.returncode != 0:
        raise SystemExit(f"stack: could not make the development certificate in {dev_dir} (nginx/dev-certs.sh, "
                         "output above); give your own with NGINX_TLS_CERTIFICATE and NGINX_TLS_CERTIFICATE_KEY")
    say(f"stack: no NGINX_TLS_CERTIFICATE given: https and wss use a development certificate signed by "
        f"the local CA {dev_dir / 'ca.crt'}; trust that file to connect without warnings "
        f"(curl --cacert {dev_dir / 'ca.crt'}, or import it as an authority in your browser)")
    return str(dev_dir / "server.crt"), str(dev_dir / "server.key")


class Service:
    def __init__(self, name, argv, env, cwd, ready, stop_signal=signal.SIGTERM, is_app=False):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.ready, self.stop_signal, self.is_app = ready, stop_signal, is_app
        self.process = None

    def start(self):
        # A session of its own: the terminal's Ctrl-C reaches only us, and we stop the
        # services in order; killpg then reaches uWSGI workers and nginx workers too.
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self):
        for line in self.process.stdout:
            # Keeps draining the service's pipe even when our own output is gone, or the
            # service would block on a full pipe.
            say(f"{self.name:<10} | {line.decode(errors='replace')}")

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def begin_stop(self):
        if self.alive():
            # Only the leader: uWSGI's master and nginx's master stop their workers gracefully,
            # whereas a worker signalled directly (gevent maps SIGTERM to "brutally kill") would not.
            self.process.send_signal(self.stop_signal)

    def stop(self, timeout):
        if self.process is None:
            return
        self.begin_stop()
        if self.alive():
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"stack: {self.name} did not stop within {timeout}s, killing it")
        # Whatever is left in the group (the leader exited, a worker lingers) goes now.
        self.signal_group(signal.SIGKILL)
        self.process.wait()


def resp_command(*args):
    parts = [arg.encode() for arg in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def redis_ready(port, username, password_file):
    """PONG for the apps' user: its password works (the default user may run nothing)."""
    def check():
        password = Path(password_file).read_text().rstrip("\n")
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(resp_command("AUTH", username, password) + resp_command("PING"))
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
            if reply != b"+OK\r\n+PONG\r\n":
                raise RuntimeError(f"redis answered {reply[:80]!r} to AUTH and PING")

    return check


def nginx_ready(url):
    def check():
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
            if response.status != 200:
                raise RuntimeError(f"/healthz answered {response.status}")

    return check


def prepare_nginx(env, run_dir):
    """The nginx prefix: links to the repo's nginx.conf and the system mime.types, plus conf.d rendered from templates."""
    prefix = run_dir / "nginx"
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True)
    (prefix / "nginx.conf").symlink_to(REPO / "nginx" / "nginx.conf")
    (prefix / "mime.types").symlink_to("/etc/nginx/mime.types")
    subprocess.run(
        [str(REPO / "scripts" / "render-nginx-templates.sh"), str(REPO / "nginx" / "templates"), str(prefix / "conf.d")],
        env=env, check=True,
    )
    return prefix


def replica_addresses(settings, port_setting):
    """Replica r (from 1) of an app listens on 127.0.0.r, on the app's port: as in compose, a
    service name stands for several addresses, one port."""
    return [(f"127.0.0.{replica}", int(settings[port_setting])) for replica in range(1, int(settings["LOCAL_REPLICAS"]) + 1)]


def dns_records(settings):
    return {app: [host for host, _port in replica_addresses(settings, port_setting)] for app, port_setting in APPS}


def dns_ready(settings):
    def check():
        for name, addresses in dns_records(settings).items():
            answer = localdns.query_a(name, int(settings["LOCAL_DNS_PORT"]))
            if sorted(answer) != sorted(addresses):
                raise RuntimeError(f"the DNS server answers {answer} for {name}, not {addresses}")

    return check


def build_services(settings, instance_id):
    run_dir = Path(settings["LOCAL_RUN_DIR"]).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_", "NGINX_"))}
    base_env["STACK_INSTANCE_ID"] = instance_id
    base_env["UWSGI_WEBSOCKETS_PING_FREQ"] = settings["UWSGI_WEBSOCKETS_PING_FREQ"]
    redis_port = int(settings["LOCAL_REDIS_PORT"])
    base_env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    password_file, admin_password_file = redis_password_files(run_dir)
    base_env["REDIS_USERNAME"] = settings["REDIS_USERNAME"]
    base_env["REDIS_PASSWORD_FILE"] = str(password_file)

    dns_port = int(settings["LOCAL_DNS_PORT"])
    nginx_env = dict(base_env, NGINX_ENVSUBST_FILTER="^NGINX_")
    nginx_env.update({k: v for k, v in settings.items() if k.startswith("NGINX_")})
    # Service names, as in compose: nginx asks our DNS server for them at request time.
    nginx_env["NGINX_RESOLVER"] = f"127.0.0.1:{dns_port}"
    for app, port_setting in APPS:
        nginx_env[f"NGINX_{app.replace('-', '_').upper()}_UPSTREAM"] = f"{app}:{settings[port_setting]}"
    nginx_env["NGINX_HTML_ROOT"] = str(REPO / "nginx" / "html")
    nginx_env["NGINX_TLS_CERTIFICATE"], nginx_env["NGINX_TLS_CERTIFICATE_KEY"] = tls_certificate(settings, run_dir)
    prefix = prepare_nginx(nginx_env, run_dir)

    hosts_file = run_dir / "dns-hosts"
    localdns.write_hosts(hosts_file, dns_records(settings))
    redis_dir = run_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    services = [
        Service(
            # Records live as long as nginx's cache of them: answers carry NGINX_RESOLVER_VALID as TTL.
            "dns", localdns.dnsmasq_argv(hosts_file, dns_port, int(nginx_seconds("", settings["NGINX_RESOLVER_VALID"]))),
            base_env, REPO, dns_ready(settings),
        ),
        Service(
            # The containers' start script: the same users, limits and persistence.
            "redis", ["sh", str(REPO / "redis" / "redis-start.sh"), "--bind", "127.0.0.1", "--port", str(redis_port),
                      "--dir", str(redis_dir)],
            dict(base_env, REDIS_ADMIN_PASSWORD_FILE=str(admin_password_file), REDIS_MAXMEMORY=settings["REDIS_MAXMEMORY"],
                 REDIS_APPENDONLY=settings["REDIS_APPENDONLY"]),
            REPO, redis_ready(redis_port, settings["REDIS_USERNAME"], password_file),
        )
    ]
    for app, (port_setting, metrics_setting, stats_setting) in APP_PORT_SETTINGS.items():
        for replica, (host, port) in enumerate(replica_addresses(settings, port_setting), start=1):
            metrics_port, stats_port = settings[metrics_setting], settings[stats_setting]
            services.append(
                Service(
                    app if replica == 1 else f"{app}-{replica}",
                    [str(bin_dir / "uwsgi"), "--ini", str(REPO / app / "uwsgi.ini")],
                    dict(base_env, UWSGI_HTTP_SOCKET=f"{host}:{port}", METRICS_HTTP_SOCKET=f"{host}:{metrics_port}",
                         UWSGI_STATS=f"{host}:{stats_port}"), REPO,
                    lambda host=host, port=port: probe.probe(f"http://{host}:{port}"),
                    is_app=True,
                )
            )
    url = f"http://{settings['NGINX_HOST']}:{settings['NGINX_PORT']}"
    services.append(
        Service(
            "nginx", ["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
            nginx_env, REPO, nginx_ready(url),
            # SIGQUIT: graceful; worker_shutdown_timeout bounds how long upgraded connections may hold it.
            stop_signal=signal.SIGQUIT,
        )
    )
    return services, url


class Stack:
    def __init__(self, settings):
        self.settings = settings
        self.instance_id = uuid.uuid4().hex
        self.services, self.url = build_services(settings, self.instance_id)
        self.tls_url = f"https://{settings['NGINX_HOST']}:{settings['NGINX_TLS_PORT']}"
        self.stopping = threading.Event()

    def wait_ready(self, service, deadline):
        last_error = None
        while time.monotonic() < deadline and not self.stopping.is_set():
            if not service.alive():
                raise RuntimeError(f"{service.name} exited with status {service.process.returncode} during start-up")
            try:
                service.ready()
                return
            except (OSError, RuntimeError, ValueError) as exc:
                last_error = exc
            self.stopping.wait(0.2)  # poll interval between health checks
        if not self.stopping.is_set():
            raise RuntimeError(f"{service.name} not healthy after {self.settings['LOCAL_STARTUP_TIMEOUT']}s: {last_error}")

    def run(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stopping.set())
        status = 0
        try:
            deadline = time.monotonic() + int(self.settings["LOCAL_STARTUP_TIMEOUT"])
            for service in self.services:
                if self.stopping.is_set():
                    break
                service.start()
                self.wait_ready(service, deadline)
            if not self.stopping.is_set():
                say(f"stack: ready at {self.url}/ and {self.tls_url}/ (instance {self.instance_id}); "
                    "Ctrl-C stops it")
            while not self.stopping.wait(0.5):
                dead = [s for s in self.services if not s.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited unexpectedly with status {dead[0].process.returncode}")
        except RuntimeError as exc:
            say(f"stack: {exc}")
            status = 1
        finally:
            say("stack: stopping")
            timeout = int(self.settings["LOCAL_STOP_TIMEOUT"])
            # The apps close their WebSockets with 1001, which reaches the clients only while
            # nginx is up; stopping nginx first would hold them until worker_shutdown_timeout
            # and then cut them off without a close frame.
            apps = [s for s in self.services if s.is_app]
            for service in apps:
                service.begin_stop()
            for service in apps + [s for s in reversed(self.services) if s not in apps]:
                service.stop(timeout)
            say("stack: stopped")
        return status


def listening_ports(settings):
    """(setting it derives from, port, host) of every server the stack starts."""
    yield "NGINX_PORT", int(settings["NGINX_PORT"]), settings["NGINX_HOST"]
    yield "NGINX_TLS_PORT", int(settings["NGINX_TLS_PORT"]), settings["NGINX_HOST"]
    yield "NGINX_STATUS_PORT", int(settings["NGINX_STATUS_PORT"]), settings["NGINX_STATUS_HOST"]
    yield "LOCAL_REDIS_PORT", int(settings["LOCAL_REDIS_PORT"]), "127.0.0.1"
    yield "LOCAL_DNS_PORT", int(settings["LOCAL_DNS_PORT"]), "127.0.0.1"
    for names in APP_PORT_SETTINGS.values():
        for name in names:
            for host, port in replica_addresses(settings, name):
                yield name, port, host


def check_ports_free(settings):
    """Refuse to start next to another server on our ports: a health check could pass against it."""
    for name, port, host in listening_ports(settings):
        # The DNS server answers on UDP (and TCP); everything else is TCP.
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM) if name == "LOCAL_DNS_PORT" else (socket.SOCK_STREAM,):
            with socket.socket(socket.AF_INET, kind) as sock:
                # As the servers do: connections in TIME_WAIT from an earlier run must not count.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    raise ConfigError(f"{name}={settings[name]} is already in use on {host} ({exc.strerror}); "
                                      "stop what listens there or choose another port") from exc


def check_nginx_workers_can_read(root):
    """nginx started by root runs its workers as `nobody` (nginx.conf sets no `user`: the same
    file serves the unprivileged container), and they must reach the demo page. A checkout
    under a folder only its owner may enter (/root, a `mktemp -d` folder) would otherwise
    answer 404 to every page, with the reason only in nginx's error log."""
    if os.geteuid() != 0:
        return
    import pwd

    nobody = pwd.getpwnam("nobody")

    def allowed(path, bits):  # bits: (owner, group, other) permission bits for one access
        st = path.stat()
        if st.st_uid == nobody.pw_uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid == nobody.pw_gid:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    for folder in (root, *root.parents):
        if not allowed(folder, (0o100, 0o010, 0o001)):
            raise ConfigError(f"nginx's workers run as nobody (stack started as root) and cannot enter {folder} "
                              f"(mode {folder.stat().st_mode & 0o777:o}), so the demo page would answer 404: run make run "
                              f"as a normal user, or let others traverse it (chmod o+x {folder})")
    for page in root.iterdir():
        if page.is_file() and not allowed(page, (0o400, 0o040, 0o004)):
            raise ConfigError(f"nginx's workers run as nobody (stack started as root) and cannot read {page}: chmod o+r it")


def main():
    settings = load_settings(os.environ)
    check_ports_free(settings)
    check_nginx_workers_can_read(REPO / "nginx" / "html")
    for tool in ("nginx", "redis-server", "envsubst", "dnsmasq", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"stack: {tool} not found; run `make bootstrap` first")
    return Stack(settings).run()


if __name__ == "__main__":
    sys.exit(main())
