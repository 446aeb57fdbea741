"""`make bench`: measure the stack, print ratios against the targets P1-P5 (docs/benchmark.md).

Starts its own local stack (scripts/stack.py, on free loopback ports, with the abuse limits
lifted: a benchmark is abuse by design), a reference echo server (picows) behind an nginx
rendered from the same template, then runs, with a progress line per measurement:

  idle        IDLE connections through nginx split across both apps, held IDLE_SECONDS:
              memory per connection of every process, CPU while idle (over whole ping
              intervals), drops
  echo        closed loop, CONNECTIONS x SIZES, against every target, ROUNDS rounds
              interleaved across targets, warm-up discarded: messages/s (median, min-max)
              and latency p50/p99/p99.9 (HDR histograms)
  fanout      one sender, FANOUT subscribers of one chat room split across both backends:
              delivery latency p50/p99
  handshakes  open+close through nginx, per backend: handshakes/s

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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "common"), str(REPO / "scripts")]

import loadgen  # noqa: E402
import procstats  # noqa: E402
import report  # noqa: E402
import stack as stack_runner  # noqa: E402  (scripts/stack.py: make run's runner)

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
FULL = {"rounds": 3, "connections": [1, 50, 200], "sizes": [32, 8192, 102400], "warmup": 0.5, "duration": 2.0,
        "idle": 10000, "idle_seconds": 60, "fanout": 1000, "fanout_messages": 20, "handshake_seconds": 3,
        "handshake_concurrency": 20, "processes": 2}
QUICK = {"rounds": 1, "connections": [1, 50], "sizes": [32], "warmup": 0.3, "duration": 0.7,
         "idle": 200, "idle_seconds": 2, "fanout": 40, "fanout_messages": 5, "handshake_seconds": 1,
         "handshake_concurrency": 5, "processes": 2}
KEY_CELL = (50, 32)  # connections, bytes: the cell P1-P3 compare


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def progress(text):
    print(f"bench: {text}", flush=True)


class Stack:
    """The local stack, a reference server and a reference nginx; stopped on exit."""

    def __init__(self, settings, run_dir):
        self.settings, self.run_dir = settings, run_dir
        self.processes = []

    def __enter__(self):
        self.ports = {name: free_port() for name in ("nginx", "nginx_tls", "uwsgi", "flask", "redis", "dns", "reference",
                                                      "reference_nginx", "reference_nginx_tls")}
        per_app = self.settings["idle"] // 2
        # Room for every idle connection on one worker (uWSGI does not balance accepts evenly),
        # and the cap must stay below the gevent cores (wsstack.capacity).
        cores = max(1000, per_app + 200)
        env = dict(os.environ, **STACK_SETTINGS, NGINX_PORT=str(self.ports["nginx"]),
                   NGINX_TLS_PORT=str(self.ports["nginx_tls"]),
                   LOCAL_UWSGI_APP_PORT=str(self.ports["uwsgi"]), LOCAL_FLASK_APP_PORT=str(self.ports["flask"]),
                   LOCAL_REDIS_PORT=str(self.ports["redis"]), LOCAL_DNS_PORT=str(self.ports["dns"]),
                   LOCAL_RUN_DIR=str(self.run_dir / "stack"),
                   UWSGI_PROCESSES=str(self.settings["processes"]), UWSGI_GEVENT=str(cores),
                   WS_MAX_CONNECTIONS_PER_WORKER=str(cores - 100),
                   # the internal status, metrics and stats ports: free ones too, never the defaults
                   **{name: str(free_port()) for name in stack_runner.INTERNAL_PORT_SETTINGS})
        self.stack_env = env
        log = open(self.run_dir / "stack.log", "w")
        stack = subprocess.Popen([sys.executable, str(REPO / "scripts" / "stack.py")], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        self.processes.append(stack)
        # `with` calls __exit__ only once __enter__ returned: a failure from here on (the
        # reference server or its nginx not coming up) must stop what already runs itself.
        try:
            for line in stack.stdout:
                log.write(line)
                if line.startswith("stack: ready"):
                    self.instance = re.search(r"instance (\w+)", line).group(1)
                    break
            else:
                raise SystemExit(f"bench: the stack did not start; see {self.run_dir / 'stack.log'}")
            # Keep draining its output so it never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [log.write(line) for line in stack.stdout], daemon=True).start()
            self._start_reference()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start_reference(self):
        reference = subprocess.Popen([sys.executable, str(HERE / "reference_server.py"), str(self.ports["reference"])],
                                     stdout=subprocess.PIPE, text=True)
        self.processes.append(reference)
        reference.stdout.readline()  # "listening": it is ready
        upstream = f"127.0.0.1:{self.ports['reference']}"
        env = {k: v for k, v in self.stack_env.items() if not k.startswith("NGINX_")}
        env.update({k: v for k, v in self.stack_env.items() if k.startswith("NGINX_WS_")})
        env.update(NGINX_ENVSUBST_FILTER="^NGINX_", NGINX_HOST="127.0.0.1", NGINX_PORT=str(self.ports["reference_nginx"]),
                   NGINX_STATUS_PORT=str(free_port()),
                   NGINX_PROXY_READ_TIMEOUT="60s", NGINX_SEND_TIMEOUT="10s", NGINX_UWSGI_APP_UPSTREAM=upstream,
                   NGINX_FLASK_APP_UPSTREAM=upstream, NGINX_RESOLVER=f"127.0.0.1:{self.ports['dns']}",
                   NGINX_RESOLVER_VALID="5s", NGINX_HTML_ROOT=str(REPO / "nginx" / "html"),
                   # TLS is not measured; the template needs a certificate: the one the stack made.
                   NGINX_TLS_PORT=str(self.ports["reference_nginx_tls"]),
                   NGINX_HTTPS_REDIRECT="off", NGINX_HSTS_MAX_AGE="0",
                   NGINX_TLS_CERTIFICATE=str(self.run_dir / "stack" / "tls" / "server.crt"),
                   NGINX_TLS_CERTIFICATE_KEY=str(self.run_dir / "stack" / "tls" / "server.key"))
        # The same prefix layout and template rendering as make run's nginx.
        prefix = stack_runner.prepare_nginx(env, self.run_dir / "reference")
        nginx = subprocess.Popen(["nginx", "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=open(self.run_dir / "reference-nginx.log", "w"))
        self.processes.append(nginx)
        asyncio.run(wait_for_echo(f"ws://127.0.0.1:{self.ports['reference_nginx']}/uwsgi/ws/echo"))

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
            "reference direct": f"ws://127.0.0.1:{p['reference']}/ws/echo",
            "reference via nginx": f"ws://127.0.0.1:{p['reference_nginx']}/uwsgi/ws/echo",
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
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT if process.args[0] == "nginx" else signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
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


def run_idle(stack, settings):
    urls = [stack.targets()["uwsgi-app via nginx"], stack.targets()["flask-app via nginx"]]
    count, groups = settings["idle"], stack.process_groups()
    # Idle CPU is almost all keep-alive pings, one per connection per ping interval: CPU is
    # measured over a whole number of intervals (as many as fit in IDLE_SECONDS, at least
    # one), so that every connection pings the same number of times inside the window
    # whatever its phase. (Quick runs are shorter than one interval: no pings counted.)
    ping = stack.ping_interval()
    window = settings["idle_seconds"] if settings["idle_seconds"] < ping else ping * (settings["idle_seconds"] // ping)
    before = procstats.snapshot(groups)
    steps, opened = [], []

    async def scenario():
        # Opened in four steps, memory measured after each: memory against connections.
        for quarter in range(4):
            opened.extend(await loadgen.open_idle(urls, count // 4 + (count % 4 if quarter == 3 else 0)))
            await asyncio.sleep(1)  # let the servers' allocations settle before reading RSS
            totals = procstats.totals(procstats.snapshot(groups))
            steps.append({"connections": len(opened), "rss_bytes": {g: t[1] for g, t in totals.items()}})
            progress(f"idle: {len(opened)} connections open")
        start = procstats.snapshot(groups)
        started = time.monotonic()
        await asyncio.sleep(window)
        end = procstats.snapshot(groups)
        elapsed = time.monotonic() - started
        dropped = sum(listener.dropped for listener in opened)
        for listener in opened:
            listener.closing = True
        loadgen.close_all(opened)
        return start, end, elapsed, dropped

    start, end, elapsed, dropped = asyncio.run(scenario())
    base, held, idle_start = procstats.totals(before), procstats.totals(end), procstats.totals(start)
    per_group = {}
    for group in groups:
        per_app_connections = count / 2 if group.endswith("-app") else count
        per_group[group] = {
            "cpu_percent_of_one_core": 100 * (held[group][0] - idle_start[group][0]) / elapsed,
            "rss_bytes_before": base[group][1], "rss_bytes_held": held[group][1],
            "kib_per_connection": (held[group][1] - base[group][1]) / 1024 / per_app_connections,
        }
    progress(f"idle: {count} connections held {window} s, {dropped} dropped")
    return {"connections": count, "seconds": window, "ping_interval": ping, "dropped": dropped,
            "processes": per_group, "steps": steps}


def run_fanout(stack, settings):
    p = stack.ports
    room = f"bench-{int(time.time())}"
    url = "ws://127.0.0.1:{}/{}/ws/chat?room={}&user={}"
    subscribers = [url.format(p["nginx"], backend, room, f"sub-{backend}") for backend in ("uwsgi", "flask")]
    result = asyncio.run(loadgen.fanout(url.format(p["nginx"], "uwsgi", room, "sender"), subscribers,
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
    if settings["idle"] > 16000:
        parser.error("--idle above 16000 would exceed the 20000 open files of one process")
    return args, settings


def main(argv=None):
    args, settings = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack, the reference server and its nginx are stopped.
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
            "versions": versions(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # Idle first, on fresh workers: after the echo workloads, idle connections would
            # partly reuse the heap those freed, and memory per connection would read low.
            "idle": run_idle(stack, settings), "echo": run_echo(stack, settings),
            "fanout": run_fanout(stack, settings), "handshakes": run_handshakes(stack, settings),
        }
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results, KEY_CELL)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    report.plots(results, out)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(markdown)
    progress(f"results in {out}")


if __name__ == "__main__":
    main()
