"""TEST INFRASTRUCTURE: start the compose stack with podman-compose, honouring healthchecks.

Docker Compose starts a service only when each `depends_on: condition: service_healthy`
dependency reports healthy. podman 4.3 without systemd never runs healthchecks on its own,
and podman-compose then ignores the condition. This does what Compose does: start the
services one by one in dependency order and run each one's healthcheck test (the compose
file's own command, executed in the container like Docker's daemon does) until it passes,
within the time the healthcheck's settings allow.

The test runs through `podman exec` rather than `podman healthcheck run`: podman 4.3 reports
a failed exec (a runtime error) as a plain "unhealthy" and keeps the reason to itself, which
is useless in a CI log. When a service does not get healthy, its state, its last log lines
and the check's own output are printed.

    python up.py COMPOSE_FILE PROJECT [PODMAN_COMPOSE...]
"""
import json
import re
import subprocess
import sys
import time

import yaml

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
EXEC_OVERHEAD = 10  # seconds


def seconds(value, default):
    if value is None:
        return default
    return sum(float(n) * UNITS[unit] for n, unit in DURATION.findall(str(value)))


def start_order(services):
    """Services without a profile, each after everything it depends on."""
    order, seen = [], set()

    def visit(name, path=()):
        if name in path:
            raise SystemExit(f"up: dependency cycle through {name}")
        if name in seen:
            return
        for dependency in services[name].get("depends_on", {}):
            visit(dependency, path + (name,))
        seen.add(name)
        order.append(name)

    for name, service in services.items():
        if not service.get("profiles"):
            visit(name)
    return order


def container_of(project, service):
    names = subprocess.run(
        ["podman", "ps", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={project}",
         "--filter", f"label=com.docker.compose.service={service}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    if len(names) != 1:
        raise SystemExit(f"up: expected one running container for {service}, found {names}")
    return names[0]


def check_argv(test):
    """The argv a compose healthcheck `test` runs (None for NONE), as Compose interprets it."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *args = test
    if kind == "CMD":
        return args
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(args)]
    if kind == "NONE":
        return None
    raise SystemExit(f"up: unknown healthcheck test form {test!r}")


def run_check(container, command, timeout):
    """(passed, what it printed) for one run of the check inside the container.

    `podman exec` itself takes time on top of the command (conmon, runc); that overhead is not
    the service's fault, so it gets its own allowance beyond the healthcheck's timeout.
    """
    started = time.monotonic()
    try:
        check = subprocess.run(["podman", "exec", container, *command], capture_output=True, text=True,
                               timeout=timeout + EXEC_OVERHEAD)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout + EXEC_OVERHEAD:.0f}s"
    took = time.monotonic() - started
    return check.returncode == 0, f"exit {check.returncode} after {took:.1f}s: {(check.stdout + check.stderr).strip()}"


def state_of(container):
    out = subprocess.run(["podman", "inspect", "--format", "{{json .State}}", container],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"Status": f"unknown ({out.stderr.strip()})"}


def diagnosis(container, command, last_result):
    state = state_of(container)
    logs = subprocess.run(["podman", "logs", "--tail", "20", container], capture_output=True, text=True)
    exec_works = subprocess.run(["podman", "exec", container, "true"], capture_output=True, text=True)
    keys = ("Status", "Pid", "ExitCode", "Error", "OOMKilled", "StartedAt", "FinishedAt")
    return "\n".join([
        f"  check: {command} -> {last_result}",
        f"  state: { {key: state.get(key) for key in keys} }",
        f"  `podman exec {container} true`: exit {exec_works.returncode} {exec_works.stderr.strip()}",
        "  last log lines:",
        *(f"    {line}" for line in (logs.stdout + logs.stderr).splitlines()),
    ])


def wait_healthy(container, healthcheck):
    command = check_argv(healthcheck["test"])
    if command is None:
        return
    # Compose's own budget: the start period, then `retries` failures `interval` apart.
    interval = seconds(healthcheck.get("interval"), 30)
    timeout = seconds(healthcheck.get("timeout"), 30)
    budget = seconds(healthcheck.get("start_period"), 0) + interval * healthcheck.get("retries", 3) + 10
    deadline = time.monotonic() + budget
    while True:
        passed, result = run_check(container, command, timeout)
        if passed:
            return
        if state_of(container).get("Status") != "running" or time.monotonic() > deadline:
            raise SystemExit(f"up: {container} not healthy within {budget:.0f}s\n"
                             f"{diagnosis(container, command, result)}")
        time.sleep(min(interval, 1.0))  # poll the check, never longer than its own interval


def main():
    compose_file, project, *podman_compose = sys.argv[1:]
    with open(compose_file) as stream:
        compose = yaml.safe_load(stream)
    for name in start_order(compose["services"]):
        # podman complains on stderr that it cannot hand the healthcheck to systemd; that is
        # exactly what wait_healthy() does instead, so the output is shown only on failure.
        started = subprocess.run([*podman_compose, "up", "-d", "--no-deps", name], capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"up: starting {name} failed:\n{started.stdout}{started.stderr}")
        healthcheck = compose["services"][name].get("healthcheck")
        if healthcheck:
            container = container_of(project, name)
            wait_healthy(container, healthcheck)
            print(f"up: {name} healthy ({container})", flush=True)
        else:
            print(f"up: {name} started", flush=True)


if __name__ == "__main__":
    main()
