"""TEST INFRASTRUCTURE: start the compose stack with podman-compose, honouring healthchecks.

Docker Compose starts a service only when each `depends_on: condition: service_healthy`
dependency reports healthy. podman 4.3 without systemd never runs healthchecks on its own,
and podman-compose then ignores the condition. This does what Compose does: start the
services one by one in dependency order and run each one's healthcheck (the compose file's
own, through `podman healthcheck run`) until it passes, within the time the healthcheck's
settings allow.

    python up.py COMPOSE_FILE PROJECT [PODMAN_COMPOSE...]
"""
import re
import subprocess
import sys
import time

import yaml

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


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


def wait_healthy(container, healthcheck):
    # Compose's own budget: the start period, then `retries` failures `interval` apart.
    interval = seconds(healthcheck.get("interval"), 30)
    budget = seconds(healthcheck.get("start_period"), 0) + interval * healthcheck.get("retries", 3) + 10
    deadline = time.monotonic() + budget
    while True:
        check = subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, text=True)
        if check.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"up: {container} not healthy within {budget:.0f}s: {check.stdout}{check.stderr}")
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
