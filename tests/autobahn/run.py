"""`make autobahn`: Autobahn|Testsuite's fuzzing client against both apps' echo endpoints,
through nginx, on ws:// and on wss://, on this project's build and on stock uWSGI.

Each build runs on a local stack of its own (scripts/stack.py, every port a free loopback
one, its run directory under OUT): the patched one with .venv's Python, stock uWSGI with
.run/stock-venv's (stack.py starts the uwsgi next to the Python running it). Two passes:

  cases 1-8, 10   the stack as configured by default (the limits production runs with)
  cases 9.*       messages up to 16 MiB, 1000 in a row: the bench profile's lifted rate
                  and connection limits (bench.STACK_SETTINGS), plus a 16 MiB message limit

12.* and 13.* (permessage-deflate, which neither app offers) are excluded and counted as
UNIMPLEMENTED. wstest runs in the chroot from tests/autobahn/setup.sh; wss verifies nginx's
certificate against the stack's development CA. The reports go to OUT/reports/<build>-<pass>/
(Autobahn's HTML and JSON); tests/autobahn/summarize.py prints the table and decides the
exit status: non-zero when the patched build has any FAILED or NON-STRICT case.

    .venv/bin/python tests/autobahn/run.py [--skip-9] [--only-9] [--builds patched,stock] [--out DIR]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "scripts"), str(HERE)]

import bench  # noqa: E402  (its lifted limits and free_port)
import stack as stack_runner  # noqa: E402  (scripts/stack.py)
import summarize  # noqa: E402

APPS = {"uwsgi-app": "/uwsgi/ws/echo", "flask-app": "/flask/ws/echo"}
BUILDS = {"patched": REPO / ".venv" / "bin" / "python", "stock": REPO / ".run" / "stock-venv" / "bin" / "python"}
DEFLATE = ["12.*", "13.*"]
# 9.1.6 and 9.2.6 send one 16 MiB message; the limit is in KiB and counts the whole message.
MAX_MESSAGE_KIB = str(16 * 1024)


def large_message_settings():
    settings = {k: v for k, v in bench.STACK_SETTINGS.items() if k != "LOCAL_REPLICAS"}
    settings["UWSGI_WEBSOCKETS_MAX_SIZE"] = MAX_MESSAGE_KIB
    return settings


def passes(args):
    chosen = []
    if not args.only_9:
        chosen.append(("1-8,10", ["*"], ["9.*"] + DEFLATE, {}))
    if not args.skip_9:
        chosen.append(("9", ["9.*"], DEFLATE, large_message_settings()))
    return chosen


def say(text):
    print(f"autobahn: {text}", flush=True)


class Stack:
    """scripts/stack.py on free ports; stopped (and waited for) on exit."""

    def __init__(self, python, run_dir, settings):
        self.python, self.run_dir, self.settings = python, run_dir, settings

    def __enter__(self):
        names = stack_runner.PORT_SETTINGS
        ports = {}
        while len(set(ports.values())) != len(names):
            ports = {name: str(bench.free_port()) for name in names}
        self.nginx_port, self.tls_port = ports["NGINX_PORT"], ports["NGINX_TLS_PORT"]
        env = dict(os.environ, **ports, **self.settings, LOCAL_RUN_DIR=str(self.run_dir), LOCAL_REPLICAS="1")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir.parent / (self.run_dir.name + ".log")
        log = open(self.log_path, "w")
        self.process = subprocess.Popen([str(self.python), str(REPO / "scripts" / "stack.py")], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:
            log.write(line)
            if line.startswith("stack: ready"):
                break
        else:
            self.process.wait()
            raise SystemExit(f"autobahn: the stack did not start; see {self.log_path}")
        threading.Thread(target=lambda: [log.write(line) or log.flush() for line in self.process.stdout],
                         daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def in_chroot(root, *argv, env=None):
    environment = ["HOME=/root", "LC_ALL=C.UTF-8", "PATH=/usr/local/bin:/usr/bin:/bin"] + (env or [])
    return ["chroot", str(root), "/usr/bin/env", "-i", *environment, *argv]


def resolve_cases(root, include, exclude):
    shutil.copy(HERE / "cases.py", root / "opt" / "autobahn" / "cases.py")
    out = subprocess.run(in_chroot(root, "python2.7", "/opt/autobahn/cases.py", json.dumps(include), json.dumps(exclude)),
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_pass(root, build, name, include, exclude, settings, out):
    """One stack; one wstest per endpoint (four), one after the other. Returns {agent: its
    report directory}. Not at once, although most cases wait on timers: a worker that crashes
    (stock uWSGI does, on a stray continuation frame) would fail other endpoints' cases too."""
    label = f"{build}-{name.replace(',', '_')}"
    inside = Path("/opt/autobahn/run") / label  # the chroot's view
    work = root / inside.relative_to("/")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if build == "stock":
        settings = dict(settings, WSSTACK_ALLOW_STOCK_UWSGI="1")
    runs = {}
    with Stack(BUILDS[build], out / "stacks" / label, settings) as stack:
        shutil.copy(stack.run_dir / "tls" / "ca.crt", work / "ca.crt")
        servers = []
        for app, path in APPS.items():
            servers.append({"agent": f"{app} {build} ws", "url": f"ws://127.0.0.1:{stack.nginx_port}{path}"})
            # The certificate names localhost; "hostname" makes Autobahn verify it (and send SNI).
            servers.append({"agent": f"{app} {build} wss", "url": f"wss://localhost:{stack.tls_port}{path}",
                            "hostname": "localhost"})
        say(f"{build}, cases {name}: wstest against {', '.join(s['url'] for s in servers)}")
        started = time.monotonic()
        for server in servers:
            slug = server["agent"].replace(" ", "-")
            spec = {"outdir": str(inside / slug), "servers": [server], "cases": include, "exclude-cases": exclude,
                    "exclude-agent-cases": {}}
            (work / f"{slug}.json").write_text(json.dumps(spec, indent=2))
            with open(out / f"wstest-{label}-{slug}.log", "w") as log:
                # SSL_CERT_FILE: the CA the TLS verification of the "hostname" servers trusts.
                runs[server["agent"]] = slug, subprocess.run(
                    in_chroot(root, "wstest", "-m", "fuzzingclient", "-s", str(inside / f"{slug}.json"),
                              env=[f"SSL_CERT_FILE={inside / 'ca.crt'}"]),
                    stdout=log, stderr=subprocess.STDOUT).returncode
        say(f"{build}, cases {name}: took {time.monotonic() - started:.0f}s (wstest exit statuses "
            f"{sorted(set(status for _slug, status in runs.values()))}; logs {out}/wstest-{label}-*.log)")
    reports = {}
    for agent, (slug, _status) in runs.items():
        reports[agent] = out / "reports" / label / slug
        shutil.rmtree(reports[agent], ignore_errors=True)
        reports[agent].parent.mkdir(parents=True, exist_ok=True)
        if (work / slug).exists():  # else the summary counts every case of the agent as FAILED
            shutil.move(str(work / slug), str(reports[agent]))
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-9", action="store_true", help="leave out 9.* (large and many messages)")
    parser.add_argument("--only-9", action="store_true", help="run 9.* only")
    parser.add_argument("--builds", default="patched,stock", help="comma-separated: patched, stock")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("AUTOBAHN_DIR", REPO / ".run" / "autobahn")))
    args = parser.parse_args()
    builds = args.builds.split(",")
    if not set(builds) <= set(BUILDS) or (args.skip_9 and args.only_9):
        parser.error("--builds takes patched and/or stock; --skip-9 and --only-9 exclude each other")
    out = args.out.resolve()
    root = out / "chroot"
    expected, report_dirs, agents = {}, [], []
    excluded = resolve_cases(root, DEFLATE, [])
    for name, include, exclude, settings in passes(args):
        cases = resolve_cases(root, include, exclude)
        for build in builds:
            reports = run_pass(root, build, name, include, exclude, settings, out)
            report_dirs.extend(d for d in reports.values() if d.exists())
            for agent in reports:
                expected.setdefault(agent, []).extend(cases)
                agents.append(agent) if agent not in agents else None
    plan = out / "summary-input.json"
    plan.write_text(json.dumps({"reports": [str(d) for d in report_dirs], "expected": expected, "excluded": excluded,
                                "strict": [agent for agent in agents if " patched " in agent]}, indent=1))
    return summarize.main([str(plan)])

if __name__ == "__main__":
    sys.exit(main())
