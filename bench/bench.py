"""`make bench`: measure the stack, print ratios against the targets P1-P5 (docs/benchmark.md).

Starts its own local stack (scripts/stack.py, on free loopback ports, with the abuse limits
lifted: a benchmark is abuse by design) and the reference peers (bench/peers/: picows,
aiohttp, uvicorn + Starlette, websockets; one process each, at the library's defaults), each
behind an nginx of its own rendered from the same template, then runs, with a progress line
per measurement:

  idle        IDLE connections through nginx split across both apps, held IDLE_SECONDS:
              memory per connection of every process, CPU while idle (over whole ping
              intervals), drops; then IDLE/2 connections to each peer in turn, on its fresh
              process, the same figures over whole intervals of that peer's own pings
  echo        closed loop, CONNECTIONS x SIZES, against every target (apps and peers, direct
              and via nginx), ROUNDS rounds interleaved across targets, warm-up discarded:
              messages/s (median, min-max) and latency p50/p99/p99.9 (HDR histograms)
  fanout      one sender, FANOUT subscribers of one chat room split across both backends:
              delivery latency p50/p99
  handshakes  open+close through nginx, per backend: handshakes/s
  resume      per app: a room filled with CHAT_STREAM_MAXLEN messages, RESUME clients resume
              it at once with last_id=0-0: the app's RSS (peak during vs before), the time to
              the last history_end
  reconnect   per app and per CHAT_RECONNECT_WINDOW_MS in RECONNECT_WINDOWS: RECONNECT chat
              clients of one room on two replicas of the app the bench runs itself, a
              rolling restart of them while a sender on the other app publishes: handshakes
              per 100 ms, time from the first 1001 to all resumed, messages lost/duplicated

Results: OUT/results.json (with versions, CPU count, settings), OUT/results.md, and PNG plots.
`--quick` runs a small version of everything (make test uses it: no timing assertions).

    .venv/bin/python bench/bench.py [--quick] [--out DIR] [--rounds N] ...
"""
import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "common"), str(REPO / "scripts"), str(REPO / "tests")]

import jwt  # noqa: E402  (PyJWT, as the apps)
import loadgen  # noqa: E402
import localdns  # noqa: E402  (scripts/localdns.py: make run's service-name DNS)
import procstats  # noqa: E402
import redis  # noqa: E402
import report  # noqa: E402
from repo import free_port, free_ports  # noqa: E402  (tests/repo.py: never the same port twice in a run)
import stack as stack_runner  # noqa: E402  (scripts/stack.py: make run's runner)
from wsstack import chat_store, probe  # noqa: E402  (the same settings the apps read)

# Lifted for the benchmark only: the defaults would (rightly) refuse its load.
STACK_SETTINGS = {
    "WS_MAX_MESSAGES_PER_SECOND": "10000000",
    "WS_MESSAGE_BURST": "10000000",
    "NGINX_WS_CONNECTIONS_PER_IP": "60000",
    "NGINX_WS_HANDSHAKES_PER_SECOND": "100000",
    "NGINX_WS_HANDSHAKE_BURST": "100000",
    "NGINX_AUTH_REQUESTS_PER_MINUTE": "60000",
    "NGINX_AUTH_REQUEST_BURST": "100000",
    "LOCAL_REPLICAS": "1",
}
# Chat tokens are minted here with PyJWT under a CHAT_AUTH_SECRET the bench gives its stack
# (random per run, never written to the results), rather than asked of the demo issuer: a
# few thousand POST /auth/token would load uwsgi-app, the very app being measured, with
# requests no chat client makes per message, while a signature costs microseconds here; and
# what every handshake exercises, the verification, is the same for both. A deployment
# replaces the demo issuer anyway (wsstack.token_issuer).
TOKEN_SECRET = secrets.token_urlsafe(48)
TOKEN_TTL = 3 * 3600  # outlives any run: a token expiring meanwhile would close its client (4001)
FULL = {"rounds": 3, "connections": [1, 50, 200], "sizes": [32, 8192, 102400], "warmup": 0.5, "duration": 2.0,
        "idle": 10000, "idle_seconds": 60, "fanout": 1000, "fanout_messages": 20, "handshake_seconds": 3,
        "handshake_concurrency": 20, "processes": 2, "resume": 100, "resume_text_bytes": 4000,
        "reconnect": 1000, "reconnect_members": 1000, "reconnect_windows": [5000, 0], "reconnect_replicas": 2, "reconnect_interval": 0.1,
        "reconnect_apps": ["uwsgi-app", "flask-app"]}
QUICK = {"rounds": 1, "connections": [1, 50], "sizes": [32], "warmup": 0.3, "duration": 0.7,
         "idle": 200, "idle_seconds": 2, "fanout": 40, "fanout_messages": 5, "handshake_seconds": 1,
         "handshake_concurrency": 5, "processes": 2, "resume": 10, "resume_text_bytes": 4000,
         "reconnect": 20, "reconnect_members": 20, "reconnect_windows": [1000, 0], "reconnect_replicas": 2, "reconnect_interval": 0.1,
         # one app: each run restarts two replicas (about 18 s), the full run covers both apps
         "reconnect_apps": ["uwsgi-app"]}
WORKLOADS = ("idle", "echo", "fanout", "handshakes", "resume", "reconnect")
KEY_CELL = (50, 32)  # connections, bytes: the cell P1-P3 compare
APPS = ("uwsgi-app", "flask-app")
# The reference peers: what users would pick instead of the apps, one process each, each with
# its library's idiomatic echo at its defaults (bench/peers/<script>). picows is P3's yardstick.
PEERS = {"picows": "picows_echo.py", "aiohttp": "aiohttp_echo.py", "uvicorn": "uvicorn_echo.py",
         "websockets": "websockets_echo.py"}
PEER_READY_SECONDS = 30


def progress(text):
    print(f"bench: {text}", flush=True)


def mint_token(subject, name):
    """A chat token as the demo issuer makes them (wsstack.auth.Verifier.issue)."""
    now = int(time.time())
    return jwt.encode({"sub": subject, "name": name, "iat": now, "exp": now + TOKEN_TTL}, TOKEN_SECRET,
                      algorithm="HS256")


def nginx_env(stack_env, port, uwsgi_upstream, flask_upstream, resolver):
    """The environment that renders an nginx of the bench's own from the project's template:
    the stack's limits (lifted), its own ports, the given upstreams."""
    env = {k: v for k, v in stack_env.items() if not k.startswith("NGINX_")}
    env.update({k: v for k, v in stack_env.items() if k.startswith(("NGINX_WS_", "NGINX_AUTH_", "NGINX_REAL_IP_"))})
    run_dir = Path(stack_env["LOCAL_RUN_DIR"])
    env.setdefault("NGINX_REAL_IP_FROM", stack_runner.DEFAULTS["NGINX_REAL_IP_FROM"])  # no proxy in front
    # make run's timeouts, health limits and worker sizing (a worker per core)
    for name in ("NGINX_CLIENT_HEADER_TIMEOUT", "NGINX_HEALTH_REQUESTS_PER_SECOND", "NGINX_HEALTH_REQUEST_BURST",
                 "NGINX_WORKER_PROCESSES", "NGINX_WORKER_CONNECTIONS", "NGINX_WORKER_RLIMIT_NOFILE"):
        env[name] = stack_runner.DEFAULTS[name]
    env.update(NGINX_ENVSUBST_FILTER="^NGINX_", NGINX_HOST="127.0.0.1", NGINX_PORT=str(port),
               NGINX_STATUS_HOST="127.0.0.1", NGINX_STATUS_PORT=str(free_port()),
               NGINX_PROXY_READ_TIMEOUT="60s", NGINX_SEND_TIMEOUT="10s", NGINX_UWSGI_APP_UPSTREAM=uwsgi_upstream,
               NGINX_FLASK_APP_UPSTREAM=flask_upstream, NGINX_RESOLVER=resolver,
               NGINX_RESOLVER_VALID="5s", NGINX_HTML_ROOT=str(REPO / "nginx" / "html"),
               # TLS is not measured; the template needs a certificate: the one the stack made.
               NGINX_TLS_PORT=str(free_port()),
               NGINX_HTTPS_REDIRECT="off", NGINX_HSTS_MAX_AGE="0", NGINX_SERVER_NAME="",
               NGINX_TLS_CERTIFICATE=str(run_dir / "tls" / "server.crt"),
               NGINX_TLS_CERTIFICATE_KEY=str(run_dir / "tls" / "server.key"))
    return env


def start_nginx(env, run_dir, name):
    """nginx with make run's prefix layout and template rendering; returns the process."""
    prefix = stack_runner.prepare_nginx(env, run_dir / name)
    return subprocess.Popen(["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=open(run_dir / f"{name}-nginx.log", "w"))


class Stack:
    """The local stack and the peers, each peer behind an nginx of its own; stopped on exit."""

    def __init__(self, settings, run_dir):
        self.settings, self.run_dir = settings, run_dir
        self.processes = []

    def __enter__(self):
        names = ("nginx", "nginx_tls", "uwsgi", "flask", "redis", "dns", *PEERS, *(f"{p} nginx" for p in PEERS),
                 *stack_runner.INTERNAL_PORT_SETTINGS)
        self.ports = dict(zip(names, free_ports(len(names))))
        per_app = self.settings["idle"] // 2
        # Room for every idle connection on one worker (uWSGI does not balance accepts evenly),
        # and the cap must stay below the gevent cores (wsstack.capacity).
        cores = max(1000, per_app + 200)
        env = dict(os.environ, **STACK_SETTINGS, CHAT_AUTH_SECRET=TOKEN_SECRET, NGINX_PORT=str(self.ports["nginx"]),
                   NGINX_TLS_PORT=str(self.ports["nginx_tls"]),
                   LOCAL_UWSGI_APP_PORT=str(self.ports["uwsgi"]), LOCAL_FLASK_APP_PORT=str(self.ports["flask"]),
                   LOCAL_REDIS_PORT=str(self.ports["redis"]), LOCAL_DNS_PORT=str(self.ports["dns"]),
                   LOCAL_RUN_DIR=str(self.run_dir / "stack"),
                   UWSGI_PROCESSES=str(self.settings["processes"]), UWSGI_GEVENT=str(cores),
                   WS_MAX_CONNECTIONS_PER_WORKER=str(cores - 100),
                   # the internal status, metrics and stats ports: free ones too, never the defaults
                   **{name: str(self.ports[name]) for name in stack_runner.INTERNAL_PORT_SETTINGS})
        # The Redis passwords stack.py makes in its run dir: the replicas started here log in
        # with the apps' one, stream_ids() with the admin's.
        self.secrets_dir = self.run_dir / "stack" / "secrets"
        env["REDIS_PASSWORD_FILE"] = str(self.secrets_dir / "redis-password")
        self.stack_env = env
        log = open(self.run_dir / "stack.log", "w")
        # Run from scripts/ as `stack.py`, not by its path: on a shared machine a developer's
        # `pkill -f scripts/stack.py` (restarting their own make run) must not stop a benchmark
        # midway, as it did three times while this workload was written.
        stack = subprocess.Popen([sys.executable, "stack.py"], cwd=REPO / "scripts", env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        self.processes.append(stack)
        # `with` calls __exit__ only once __enter__ returned: a failure from here on (a peer
        # or its nginx not coming up) must stop what already runs itself.
        try:
            for line in stack.stdout:
                log.write(line)
                if line.startswith("stack: ready"):
                    self.instance = re.search(r"instance (\w+)", line).group(1)
                    break
            else:
                raise SystemExit(f"bench: the stack did not start; see {self.run_dir / 'stack.log'}")
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [log.write(line) for line in stack.stdout], daemon=True).start()
            self.peers, self.peer_pids = {}, {}
            for name in PEERS:
                self._start_peer(name)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start_peer(self, name):
        """The peer, then an nginx rendered from the template with both app upstreams on it."""
        log = open(self.run_dir / f"peer-{name}.log", "w")
        peer = subprocess.Popen([sys.executable, str(HERE / "peers" / PEERS[name]), str(self.ports[name])],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        self.processes.append(peer)
        self.peers[name] = read_ready(peer, name, self.run_dir / f"peer-{name}.log")
        # Its stdout goes on to the log (uvicorn's access log writes there): a full pipe would block it.
        threading.Thread(target=lambda: [log.write(line) for line in peer.stdout], daemon=True).start()
        upstream = f"127.0.0.1:{self.ports[name]}"
        env = nginx_env(self.stack_env, self.ports[f"{name} nginx"], upstream, upstream,
                        f"127.0.0.1:{self.ports['dns']}")
        # picows and aiohttp send no pings at their defaults: nginx's 60 s read timeout closed all
        # of their idle connections just before a 60 s hold ended, and the hold's memory was read
        # after that. Their nginx waits out the whole hold (the opening steps too); nothing else
        # is silent for that long.
        read_timeout = self.settings["idle_seconds"] + 60
        env["NGINX_PROXY_READ_TIMEOUT"] = f"{read_timeout}s"
        nginx = start_nginx(env, self.run_dir, f"peer-{name}")
        self.processes.append(nginx)
        self.peer_pids[name] = {"server": peer.pid, "nginx": nginx.pid}
        self.peers[name]["nginx_proxy_read_timeout_seconds"] = read_timeout
        for url in (self.targets()[f"{name} direct"], self.targets()[f"{name} via nginx"]):
            asyncio.run(wait_for_echo(url))

    def ping_interval(self):
        """Seconds between the apps' keep-alive pings in this stack (make run's setting)."""
        return int(stack_runner.load_settings(self.stack_env)["UWSGI_WEBSOCKETS_PING_FREQ"])

    def targets(self):
        p = self.ports
        return {
            "uwsgi-app direct": f"ws://127.0.0.1:{p['uwsgi']}/ws/echo",
            "uwsgi-app via nginx": f"ws://127.0.0.1:{p['nginx']}/uwsgi/ws/echo",
            "flask-app direct": f"ws://127.0.0.1:{p['flask']}/ws/echo",
            "flask-app via nginx": f"ws://127.0.0.1:{p['nginx']}/flask/ws/echo",
            **{target: url for name in PEERS for target, url in (
                (f"{name} direct", f"ws://127.0.0.1:{p[name]}/ws/echo"),
                (f"{name} via nginx", f"ws://127.0.0.1:{p[f'{name} nginx']}/uwsgi/ws/echo"))},
        }

    def process_groups(self):
        """{name: [root pids]} of the stack's servers, found by the stack's instance marker."""
        marker = f"STACK_INSTANCE_ID={self.instance}".encode()
        groups = {"nginx": [], "uwsgi-app": [], "flask-app": [], "redis": []}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if marker not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            for app in ("uwsgi-app", "flask-app"):
                if f"/{app}/uwsgi.ini".encode() in b" ".join(cmdline) and not _same_group(parent, cmdline):
                    groups[app].append(int(proc.name))
        # nginx and redis-server rewrite their process titles over their environment: nginx's
        # pid file tells, and redis-server's title names its port.
        groups["nginx"].append(int((self.run_dir / "stack" / "nginx" / "nginx.pid").read_text()))
        redis_title = f"redis-server 127.0.0.1:{self.ports['redis']}".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(redis_title):
                    groups["redis"].append(int(proc.name))
            except OSError:
                continue
        return groups

    def __exit__(self, *exc):
        stop_processes(self.processes, 60)


def read_ready(process, name, log):
    """A peer's readiness line (bench/peers/ready.py), read as soon as it is written; a peer
    that exits or says nothing within PEER_READY_SECONDS stops the bench with its log."""
    ready, _, _ = select.select([process.stdout], [], [], PEER_READY_SECONDS)
    line = process.stdout.readline() if ready else ""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        process.kill()
        raise SystemExit(f"bench: the {name} peer did not come up (said {line!r}); see {log}") from None


def stop_processes(processes, timeout):
    """Stop them, the last started first (nginx gracefully: SIGQUIT), then wait for each."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT if process.args[0] == "nginx" else signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def _same_group(parent, cmdline):
    """True for a uWSGI worker (its parent runs the same command line): only masters are roots."""
    try:
        return Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0") == cmdline
    except OSError:
        return False


async def wait_for_echo(url, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await loadgen.echo(url, 1, 8, 0.0, 0.05)
            if result["messages_per_second"] > 0:
                return
        except (OSError, asyncio.TimeoutError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {url} never echoed: {exc}")
        await asyncio.sleep(0.2)


def run_echo(stack, settings):
    targets = stack.targets()
    cells = [(c, s) for c in settings["connections"] for s in settings["sizes"]]
    runs = {}  # (target, connections, size) -> [result per round]
    total, step = settings["rounds"] * len(cells) * len(targets), 0
    for round_ in range(settings["rounds"]):
        for connections, size in cells:
            for target, url in targets.items():  # interleaved: a slow minute hits every target alike
                step += 1
                result = asyncio.run(loadgen.echo(url, connections, size, settings["warmup"], settings["duration"]))
                runs.setdefault((target, connections, size), []).append(result)
                progress(f"[{step}/{total}] echo round {round_ + 1} {target:<20} {connections:>3} x {size:>6} B: "
                         f"{result['messages_per_second']:>9.0f} msg/s  p99 {result['p99_us']} us")
    summary = []
    for (target, connections, size), results in runs.items():
        rates = [r["messages_per_second"] for r in results]
        best = sorted(results, key=lambda r: r["messages_per_second"])[len(results) // 2]  # the median round
        summary.append({"target": target, "connections": connections, "size": size,
                        "messages_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
                        "p50_us": best["p50_us"], "p99_us": best["p99_us"], "p999_us": best["p999_us"],
                        "curve_us": best["curve_us"], "dropped": sum(r["dropped"] for r in results)})
    return summary


def ping_window(idle_seconds, ping):
    """(seconds, pings per connection) of the CPU window: idle CPU is almost all keep-alive
    pings, one per connection per interval, so it is measured over a whole number of that
    server's intervals (as many as fit in IDLE_SECONDS, at least one), and every connection
    pings the same number of times inside it whatever its phase. A server that sends no pings,
    or a run shorter than one interval (quick runs), counts none over IDLE_SECONDS."""
    if not ping or idle_seconds < ping:
        return idle_seconds, 0
    return ping * (idle_seconds // ping), int(idle_seconds // ping)


def hold_idle(urls, count, groups, window):
    """`count` idle connections spread over `urls`, opened in four steps (RSS of `groups` after
    each), then held `window` s: {steps, before, start, end, elapsed, dropped, pings}; `pings`:
    {url: the pings its connections received in the window, total, fewest and most per connection}."""
    before = procstats.snapshot(groups)
    steps, opened = [], []

    async def scenario():
        for quarter in range(4):
            opened.extend(await loadgen.open_idle(urls, count // 4 + (count % 4 if quarter == 3 else 0)))
            await asyncio.sleep(1)  # let the servers' allocations settle before reading RSS
            totals = procstats.totals(procstats.snapshot(groups))
            steps.append({"connections": len(opened), "rss_bytes": {g: t[1] for g, t in totals.items()}})
            progress(f"idle: {len(opened)} connections open")
        start = procstats.snapshot(groups)
        pings_before = [listener.pings for listener in opened]
        started = time.monotonic()
        await asyncio.sleep(window)
        end = procstats.snapshot(groups)
        elapsed = time.monotonic() - started
        in_window = {}
        for listener, before_count in zip(opened, pings_before):
            in_window.setdefault(listener.url, []).append(listener.pings - before_count)
        dropped = sum(listener.dropped for listener in opened)
        for listener in opened:
            listener.closing = True
        loadgen.close_all(opened)
        return start, end, elapsed, dropped, in_window

    start, end, elapsed, dropped, in_window = asyncio.run(scenario())
    pings = {url: {"total": sum(counts), "fewest": min(counts), "most": max(counts)}
             for url, counts in in_window.items()}
    return {"steps": steps, "before": procstats.totals(before), "start": procstats.totals(start),
            "end": procstats.totals(end), "elapsed": elapsed, "dropped": dropped, "pings": pings}


def idle_figures(held, group, connections, pings, urls):
    """CPU and memory of one process group over a hold_idle() window, per connection it held.
    `pings`: the pings each connection should get in the window (0: the server sends none);
    `urls`: those of the connections whose pings the group sent or relayed. CPU per ping is
    per ping that arrived."""
    cpu_seconds = held["end"][group][0] - held["start"][group][0]
    received = sum(held["pings"][url]["total"] for url in urls)
    return {
        "connections": connections,
        "cpu_percent_of_one_core": 100 * cpu_seconds / held["elapsed"],
        # per connection per ping: what one keep-alive costs (None where none was sent)
        "cpu_us_per_connection_per_ping": 1e6 * cpu_seconds / received if pings and received else None,
        "pings_expected": connections * pings, "pings_received": received,
        "fewest_pings_per_connection": min(held["pings"][url]["fewest"] for url in urls),
        "rss_bytes_before": held["before"][group][1], "rss_bytes_held": held["end"][group][1],
        "kib_per_connection": (held["end"][group][1] - held["before"][group][1]) / 1024 / connections,
    }


def run_idle(stack, settings):
    """The apps first (through the stack's nginx, split across both), then each peer on its own
    fresh process through its nginx, as many connections as one app holds."""
    urls = [stack.targets()["uwsgi-app via nginx"], stack.targets()["flask-app via nginx"]]
    count, groups = settings["idle"], stack.process_groups()
    ping = stack.ping_interval()
    window, pings = ping_window(settings["idle_seconds"], ping)
    held = hold_idle(urls, count, groups, window)
    # Per ping only for the apps, which send them, and nginx, which relays them (Redis sees none).
    app_urls = dict(zip(APPS, urls))
    per_group = {group: idle_figures(held, group, count // 2 if group in APPS else count,
                                     pings if group in APPS or group == "nginx" else 0,
                                     [app_urls[group]] if group in APPS else urls) for group in groups}
    progress(f"idle: {count} connections held {window} s, {held['dropped']} dropped")
    result = {"connections": count, "seconds": window, "ping_interval": ping, "pings": pings,
              "dropped": held["dropped"], "processes": per_group, "steps": held["steps"], "peers": {}}
    for name, ready in stack.peers.items():
        peer_count = count // 2
        peer_window, peer_pings = ping_window(settings["idle_seconds"], ready["ping_interval"])
        peer_groups = {name: [stack.peer_pids[name]["server"]], "nginx": [stack.peer_pids[name]["nginx"]]}
        peer_urls = [stack.targets()[f"{name} via nginx"]]
        peer_held = hold_idle(peer_urls, peer_count, peer_groups, peer_window)
        result["peers"][name] = {
            **idle_figures(peer_held, name, peer_count, peer_pings, peer_urls), "seconds": peer_window,
            "ping_interval": ready["ping_interval"], "pings": peer_pings, "dropped": peer_held["dropped"],
            "nginx": idle_figures(peer_held, "nginx", peer_count, peer_pings, peer_urls), "steps": peer_held["steps"]}
        row = result["peers"][name]
        progress(f"idle: {name}: {peer_count} connections held {peer_window} s ({peer_pings} pings each), "
                 f"{row['kib_per_connection']:.1f} KiB per connection, {peer_held['dropped']} dropped")
    return result


def chat_url(port, backend, room):
    return f"ws://127.0.0.1:{port}/{backend}/ws/chat?room={room}"


def new_room(kind):
    return f"bench-{kind}-{secrets.token_hex(4)}"


def run_fanout(stack, settings):
    room = new_room("fanout")
    backends = ("uwsgi", "flask")
    subscribers = [chat_url(stack.ports["nginx"], backend, room) for backend in backends]
    # Two members, as many tabs each as there are subscribers on its backend (presence counts a
    # member once): the fan-out of messages is measured, not a join storm of 1000 members.
    tokens = [mint_token(f"bench-sub-{backend}", f"sub-{backend}") for backend in backends]
    result = asyncio.run(loadgen.fanout(chat_url(stack.ports["nginx"], "uwsgi", room),
                                        mint_token("bench-sender", "sender"), subscribers, tokens,
                                        settings["fanout"], settings["fanout_messages"], 0.2))
    progress(f"fanout: {result['deliveries']}/{result['expected']} deliveries, p99 {result['p99_us']} us")
    return {"subscribers": settings["fanout"], "messages": settings["fanout_messages"], **result}


def run_handshakes(stack, settings):
    results = {}
    for target in ("uwsgi-app via nginx", "flask-app via nginx"):
        results[target] = asyncio.run(loadgen.handshakes(stack.targets()[target], settings["handshake_concurrency"],
                                                         settings["handshake_seconds"]))
        progress(f"handshakes: {target}: {results[target]['handshakes_per_second']:.0f}/s")
    return results


BACKENDS = {"uwsgi-app": "uwsgi", "flask-app": "flask"}  # app -> its nginx location
OTHER = {"uwsgi-app": "flask-app", "flask-app": "uwsgi-app"}


class RssSampler:
    """Samples the resident memory of process trees in a thread (every 10 ms) while the event
    loop runs the clients: the peak of a short burst, and the curve for the plot."""

    def __init__(self, roots):
        self.roots, self.samples = roots, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def total(self):
        return procstats.totals(procstats.snapshot({"app": self.roots}))["app"][1]

    def _run(self):
        started = time.monotonic()
        while not self.done.wait(0.01):
            self.samples.append((time.monotonic() - started, self.total()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


FILL_BATCH = 100


def fill_room(port, backend, room, count, text_bytes):
    """`count` messages of about `text_bytes` each, published through the chat itself."""
    async def fill():
        run = loadgen.ChatRun()
        sender = loadgen.ChatClient(run, chat_url(port, backend, room), mint_token("bench-filler", "filler"))
        task = asyncio.ensure_future(sender.live())
        try:
            if not await loadgen.wait_until(sender.ready.is_set, 30):
                raise RuntimeError("the filler never got its history")
            # In batches, each echoed back before the next: a burst of more than
            # CHAT_SEND_BACKLOG would get the sender closed as a slow consumer (1013), since
            # the server reads all it can before it sends (the bench lifts the rate limit
            # that would otherwise cap such a burst).
            for start in range(0, count, FILL_BATCH):
                for number in range(start, min(count, start + FILL_BATCH)):
                    sender.send(f"{number:06d} " + "x" * (text_bytes - 7))
                done = min(count, start + FILL_BATCH)
                if not await loadgen.wait_until(lambda: len(sender.ids) >= done, 30):
                    raise RuntimeError(f"only {len(sender.ids)} of {done} messages came back; closes {sender.closes}")
        finally:
            loadgen.stop_clients(run, [sender])
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(fill())


def run_resume(stack, settings):
    """Per app: a room full (CHAT_STREAM_MAXLEN messages), then RESUME clients resume it at once
    from its start (last_id=0-0), each sent CHAT_RESUME_MAX messages a page at a time."""
    results = {}
    groups = stack.process_groups()
    expected = min(chat_store.RESUME_MAX, chat_store.STREAM_MAXLEN)
    for app, backend in BACKENDS.items():
        room = new_room("resume")
        fill_room(stack.ports["nginx"], backend, room, chat_store.STREAM_MAXLEN, settings["resume_text_bytes"])
        tokens = [mint_token(f"bench-resume-{i}", f"resume-{i}") for i in range(settings["resume"])]
        with RssSampler(groups[app]) as sampler:
            time.sleep(0.5)  # a baseline before the burst
            before = sampler.total()
            result = asyncio.run(loadgen.resume(chat_url(stack.ports["nginx"], backend, room), tokens, expected))
            time.sleep(0.5)
        peak = max(rss for _t, rss in sampler.samples)
        result.update(rss_bytes_before=before, rss_bytes_peak=peak, rss_bytes_after=sampler.samples[-1][1],
                      text_bytes=settings["resume_text_bytes"], stream_maxlen=chat_store.STREAM_MAXLEN,
                      rss_curve=[(round(t, 2), rss) for t, rss in sampler.samples[::5]])
        results[app] = result
        progress(f"resume: {app}: {result['clients']} clients x {result['messages_min']}-{result['messages_max']} "
                 f"messages in {result['seconds_to_all_history_end']} s; RSS {before / 2**20:.1f} -> peak "
                 f"{peak / 2**20:.1f} MiB")
    return results


ROLLOUT_HEALTHY_SECONDS = 30  # a restarted replica that is not healthy by then halts the rollout


class Replicas:
    """REPLICAS instances of one app that the bench runs and restarts itself, behind an nginx of
    its own. The stack's runner (scripts/stack.py) treats an app that exits as a failure and
    stops everything, so a restart needs instances outside it: started as it starts its apps
    (the app's uwsgi.ini, the stack's settings, Redis and token secret), replica r on
    127.0.0.r:PORT under the app's service name, which a dnsmasq of our own answers for the
    nginx (rendered from the project's template) as make run's does. The other app's location
    goes to the stack's instance of it."""

    def __init__(self, stack, app, count, window_ms):
        self.stack, self.app, self.count, self.window_ms = stack, app, count, window_ms
        self.dir = stack.run_dir / f"replicas-{app}"
        self.dir.mkdir(exist_ok=True)
        self.port, self.nginx_port, self.dns_port = free_ports(3)
        self.hosts = [f"127.0.0.{r}" for r in range(1, count + 1)]
        self.masters = {}
        self.others = []

    def env(self, host):
        env = {k: v for k, v in self.stack.stack_env.items() if not k.startswith(("LOCAL_", "NGINX_"))}
        env.update(REDIS_URL=f"redis://127.0.0.1:{self.stack.ports['redis']}/0",
                   UWSGI_WEBSOCKETS_PING_FREQ=str(self.stack.ping_interval()),
                   UWSGI_HTTP_SOCKET=f"{host}:{self.port}", METRICS_HTTP_SOCKET=f"{host}:{free_port()}",
                   UWSGI_STATS=f"{host}:{free_port()}", CHAT_RECONNECT_WINDOW_MS=str(self.window_ms))
        return env

    def start(self, replica):
        host = self.hosts[replica - 1]
        log = open(self.dir / f"{self.app}-{replica}.log", "a")
        self.masters[replica] = subprocess.Popen(
            [str(Path(sys.executable).parent / "uwsgi"), "--ini", str(REPO / self.app / "uwsgi.ini")],
            env=self.env(host), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def wait_healthy(self, replica, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            if self.masters[replica].poll() is not None:
                raise RuntimeError(f"{self.app} replica {replica} exited; see {self.dir}")
            try:
                probe.probe(f"http://{self.hosts[replica - 1]}:{self.port}")
                return
            except (OSError, RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, replica, timeout=60):
        master = self.masters[replica]
        master.send_signal(signal.SIGTERM)  # graceful: uWSGI's master closes every WebSocket with 1001
        try:
            master.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()

    def rolling_restart(self):
        """Each replica in turn: stopped, started again, healthy before the next one stops (a
        Kubernetes rolling update with maxUnavailable 1 and no surge). Returns the timeline."""
        timeline = []
        for replica in range(1, self.count + 1):
            step = {"replica": replica, "stop_sent_at": time.monotonic()}
            timeline.append(step)
            self.stop(replica)
            step["stopped_at"] = time.monotonic()
            self.start(replica)
            try:
                self.wait_healthy(replica, timeout=ROLLOUT_HEALTHY_SECONDS)
            except (OSError, RuntimeError, ValueError) as exc:
                # As a rolling update would, the rollout stops here; the run reports it.
                step.update(healthy_at=None, error=f"not healthy within {ROLLOUT_HEALTHY_SECONDS} s: {exc}")
                progress(f"reconnect: {self.app} replica {replica} {step['error']}")
                break
            step["healthy_at"] = time.monotonic()
        return timeline

    def url(self, room):
        return chat_url(self.nginx_port, BACKENDS[self.app], room)

    def __enter__(self):
        hosts_file = self.dir / "dns-hosts"
        localdns.write_hosts(hosts_file, {self.app: self.hosts})
        self.others.append(subprocess.Popen(localdns.dnsmasq_argv(hosts_file, self.dns_port, 5),
                                            stdout=subprocess.DEVNULL, stderr=open(self.dir / "dns.log", "w")))
        try:
            for replica in range(1, self.count + 1):
                self.start(replica)
            for replica in range(1, self.count + 1):
                self.wait_healthy(replica)
            upstreams = {app: f"127.0.0.1:{self.stack.ports[BACKENDS[app]]}" for app in BACKENDS}
            upstreams[self.app] = f"{self.app}:{self.port}"
            env = nginx_env(self.stack.stack_env, self.nginx_port, upstreams["uwsgi-app"], upstreams["flask-app"],
                            f"127.0.0.1:{self.dns_port}")
            self.others.append(start_nginx(env, self.dir, "replicas"))
            asyncio.run(wait_for_echo(f"ws://127.0.0.1:{self.nginx_port}/{BACKENDS[self.app]}/ws/echo"))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        stop_processes(self.others, 30)  # nginx, then dnsmasq
        for replica in list(self.masters):
            if self.masters[replica].poll() is None:
                self.stop(replica)


def stream_ids(stack, room):
    client = redis.Redis(port=stack.ports["redis"], username="admin",
                         password=(stack.secrets_dir / "redis-admin-password").read_text().rstrip("\n"))
    try:
        return [entry_id.decode() for entry_id, _fields in client.xrange(chat_store.messages_key(room))]
    finally:
        client.close()


def run_reconnect(stack, settings):
    """Per app, per reconnect window: RECONNECT clients of one room on the app's replicas, a
    sender on the other app (the stack's), and a rolling restart of the replicas."""
    results = {}
    for app in settings["reconnect_apps"]:
        results[app] = {}
        for window in settings["reconnect_windows"]:
            room = new_room("reconnect")
            # Member i % RECONNECT_MEMBERS: with as many members as clients, each is a user of its own
            # (a leave and a join per client and restart, each sent to every client).
            tokens = [mint_token(f"bench-reconnect-{i % settings['reconnect_members']}", f"client-{i}")
                      for i in range(settings["reconnect"])]
            with Replicas(stack, app, settings["reconnect_replicas"], window) as replicas:
                outcome = asyncio.run(loadgen.reconnect(
                    replicas.url(room), tokens, chat_url(stack.ports["nginx"], BACKENDS[OTHER[app]], room),
                    mint_token("bench-reconnect-sender", "sender"), replicas.rolling_restart, prefill=20,
                    interval=settings["reconnect_interval"]))
            result = loadgen.reconnect_summary(outcome, stream_ids(stack, room))
            result["window_ms"], result["replicas"] = window, settings["reconnect_replicas"]
            results[app][str(window)] = result
            progress(f"reconnect: {app}, window {window} ms: {result['closes_1001']} closes 1001, peak "
                     f"{result['peak_handshakes_per_second']} handshakes/s, all resumed in "
                     f"{result['first_1001_to_all_resumed_s']} s; lost {result['lost']}, duplicated "
                     f"{result['duplicated']}, recovered=false {result['not_recovered']}")
    return results


def versions():
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None

    import picows
    return {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "nginx": first_line(["nginx", "-v"]), "uwsgi": first_line([str(Path(sys.executable).parent / "uwsgi"), "--version"]),
            "redis": first_line(["redis-server", "--version"]), "picows": picows.__version__}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run of every workload (seconds, not minutes)")
    parser.add_argument("--out", type=Path, help="results directory (default .run/bench/<time>)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the servers' logs (OUT/bench-*/), removed after a successful run otherwise")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="WORKLOAD",
                        help=f"run only these workloads ({', '.join(WORKLOADS)}; default all); the targets "
                             "of the others read n/a")
    for name, default in FULL.items():
        kind = type(default[0]) if isinstance(default, list) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+" if isinstance(default, list) else None,
                            help=f"default {default} (quick: {QUICK[name]})")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for name in FULL:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    unknown = set(settings["reconnect_apps"]) - set(BACKENDS)
    if unknown:
        parser.error(f"--reconnect-apps: {', '.join(sorted(unknown))}: choose from {', '.join(BACKENDS)}")
    if settings["idle"] > 16000:
        parser.error("--idle above 16000 would exceed the 20000 open files of one process")
    return args, settings


def main(argv=None):
    args, settings = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack, the peers and their nginx are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Absolute: nginx gets paths under it as its prefix, and -c relative to the prefix would double them.
    out = (args.out or REPO / ".run" / "bench" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    started = time.monotonic()
    with Stack(settings, run_dir) as stack:
        progress(f"stack up (nginx :{stack.ports['nginx']}); mode {'quick' if args.quick else 'full'}")
        results = {
            "mode": "quick" if args.quick else "full", "settings": settings, "stack_settings": STACK_SETTINGS,
            "versions": versions(), "peers": stack.peers, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workloads": list(args.only or WORKLOADS),
        }
        # In WORKLOADS' order: idle first, on fresh workers (after the echo workloads, idle
        # connections would partly reuse the heap those freed, and memory per connection would
        # read low); reconnect last, as it starts and stops app instances of its own.
        runners = {"idle": run_idle, "echo": run_echo, "fanout": run_fanout, "handshakes": run_handshakes,
                   "resume": run_resume, "reconnect": run_reconnect}
        for name in WORKLOADS:
            if name in results["workloads"]:
                results[name] = runners[name](stack, settings)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results, KEY_CELL)
    results["peer_ratios"] = report.peer_ratios(results, KEY_CELL[0], APPS, list(PEERS))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    report.plots(results, out)
    if not args.keep_logs:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(markdown)
    progress(f"results in {out}")


if __name__ == "__main__":
    main()
