#!/usr/bin/env bash
# `make test-compose`: run the real compose stack on a machine without Docker, with podman.
# The project's Dockerfiles and docker-compose.yml are used unchanged; only the upstream base
# images are replaced by local stand-ins (build-standins.sh) because no registry is
# reachable, and the builds run without network from a host-built wheelhouse.
#   1. install podman, podman-compose, debootstrap (when missing)
#   2. stand-in base images, wheelhouse, build every image (--network=none)
#   3. start the services in dependency order, each gated on its own healthcheck (up.py)
#   4. run the integration suite in the tests container against nginx by service name
#   5. check the running containers from the host (users, privileges, read-only filesystems,
#      limits, health, routing), then stop the apps and check their graceful stop
#   6. tear everything down (also on failure) and check nothing is left
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/bootstrap.sh
tests/compose/bootstrap.sh

export CONTAINERS_CONF=$PWD/tests/compose/containers.conf
# HEALTHCHECK instructions survive only in the docker image format.
export BUILDAH_FORMAT=docker
project=${COMPOSE_TEST_PROJECT:-websockets-behind-nginx-test}
export COMPOSE_PROJECT_NAME=$project
# The suite proves an idle WebSocket outlives nginx's timeout with short intervals.
export NGINX_PROXY_READ_TIMEOUT=${NGINX_PROXY_READ_TIMEOUT:-5s}
export UWSGI_WEBSOCKETS_PING_FREQ=${UWSGI_WEBSOCKETS_PING_FREQ:-2}
# The suite asks the demo token issuer for a few dozen tokens (as scripts/test.sh does).
export NGINX_AUTH_REQUESTS_PER_MINUTE=${NGINX_AUTH_REQUESTS_PER_MINUTE:-600}
export NGINX_AUTH_REQUEST_BURST=${NGINX_AUTH_REQUEST_BURST:-100}
export NGINX_PORT=${COMPOSE_TEST_NGINX_PORT:-18080}
export NGINX_TLS_PORT=${COMPOSE_TEST_NGINX_TLS_PORT:-18443}
log_dir=.run/compose
mkdir -p "$log_dir"

scripts/make-secrets.sh
dangling_before=$(podman images --quiet --filter dangling=true | sort)
eval "$(tests/compose/build-standins.sh)"
export PYTHON_IMAGE NGINX_IMAGE REDIS_IMAGE
make --no-print-directory wheelhouse >"$log_dir/wheelhouse.log" 2>&1 || { cat "$log_dir/wheelhouse.log" >&2; exit 1; }

# Run options, for what podman 4.3 does differently from Docker:
#  --read-only-tmpfs=false: no tmpfs of podman's own on /tmp, /run and /var/tmp of a read_only
#    container (Docker adds none): only the compose file's tmpfs are writable, as with Docker;
#  --ulimit: containers.conf's default_ulimits, restated, because podman drops them once a
#    service sets ulimits of its own and then asks for limits above this machine's.
# Exported: the host checks recreate a container with the same options.
export COMPOSE_TEST_PODMAN_RUN_ARGS="--read-only-tmpfs=false --ulimit=nofile=20000:20000 --ulimit=nproc=1024:1024"
compose=(.venv/bin/podman-compose -f docker-compose.yml -p "$project" --profile test
         --podman-build-args "--network=none --build-arg=PIP_NO_INDEX=1"
         "--podman-run-args=$COMPOSE_TEST_PODMAN_RUN_ARGS")

images() {
    .venv/bin/python -c 'import sys, yaml; print("\n".join(s["image"] for s in yaml.safe_load(open(sys.argv[1]))["services"].values() if "build" in s))' docker-compose.yml
}
leftovers() {
    podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'
    podman network ls --format '{{.Name}}' | grep -F "${project}_" || true
    podman volume ls --filter "label=io.podman.compose.project=$project" --format '{{.Name}}'
    if [ "${COMPOSE_TEST_KEEP_IMAGES:-0}" != 1 ]; then
        podman images --format '{{.Repository}}:{{.Tag}}' | grep -F websockets-behind-nginx || true
    fi
}
teardown() {
    status=$?
    set +e
    if [ "$status" -ne 0 ]; then
        echo "test-compose: failed; the services' logs are in $log_dir/" >&2
    fi
    for service in nginx uwsgi-app flask-app redis; do
        podman logs "${project}_${service}_1" >"$log_dir/$service.log" 2>&1
        if [ "$status" -ne 0 ]; then
            echo "--- last lines of $service's log:" >&2
            tail -n 15 "$log_dir/$service.log" >&2
        fi
    done
    # As `make compose-down` does: the apps first, so their close 1001 still passes through nginx.
    "${compose[@]}" stop -t 20 uwsgi-app flask-app >"$log_dir/down.log" 2>&1
    "${compose[@]}" down --volumes --remove-orphans -t 20 >>"$log_dir/down.log" 2>&1
    # COMPOSE_TEST_KEEP_IMAGES=1 (.ci/run, before make test-k8s): the images and their build
    # layers stay, so test-k8s's build of the same Dockerfiles is a cache hit; it removes them.
    if [ "${COMPOSE_TEST_KEEP_IMAGES:-0}" != 1 ]; then
        podman rmi --force $(images) "$PYTHON_IMAGE" "$NGINX_IMAGE" "$REDIS_IMAGE" "$STANDIN_BASE" >/dev/null 2>&1
        # Untagged build stages and layers this run left behind.
        comm -13 <(echo "$dangling_before") <(podman images --quiet --filter dangling=true | sort) \
            | xargs --no-run-if-empty podman rmi --force >/dev/null 2>&1
    fi
    left=$(leftovers)
    if [ -n "$left" ]; then
        echo "test-compose: left behind after down: $left" >&2
        status=1
    fi
    exit "$status"
}
trap teardown EXIT

echo "test-compose: building images (offline)"
"${compose[@]}" build >"$log_dir/build.log" 2>&1 || { tail -30 "$log_dir/build.log" >&2; exit 1; }
echo "test-compose: starting the stack"
.venv/bin/python tests/compose/up.py docker-compose.yml "$project" "${compose[@]}"

echo "test-compose: the integration suite, from the tests container"
status=0
"${compose[@]}" run -T --rm --no-deps tests || status=$?
if [ "$status" -eq 5 ]; then
    echo "test-compose: pytest collected no tests; that is a failure here" >&2
    status=1
fi

echo "test-compose: container checks, then the apps' graceful stop, from the host"
# In this order: test_stop.py stops the apps.
COMPOSE_TEST_PROJECT=$project STACK_MODE=compose STACK_BASE_URL="http://127.0.0.1:$NGINX_PORT" \
    .venv/bin/python -m pytest -c tests/pytest.ini -m compose tests/compose/test_containers.py \
    tests/compose/test_stop.py || status=1
exit "$status"
