#!/usr/bin/env bash
# The test lifecycle in one place (what `make test` runs): install what is missing, start
# the stack in local mode with the test timings, wait for its health checks, run the whole
# suite against nginx, stop the stack, and exit with the suite's status.
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh -k idle
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh

# Short intervals so the suite can prove an idle WebSocket outlives nginx's proxy timeout.
export UWSGI_WEBSOCKETS_PING_FREQ=${UWSGI_WEBSOCKETS_PING_FREQ:-2}
export NGINX_PROXY_READ_TIMEOUT=${NGINX_PROXY_READ_TIMEOUT:-5s}
export NGINX_PORT=${NGINX_PORT:-8080}
# Presence expires in 6 s instead of 15: the crashed-member test waits out the bound (8 s).
export CHAT_PRESENCE_TTL=${CHAT_PRESENCE_TTL:-6}
# The suite asks the demo issuer for a few dozen tokens; its per-address limit would make it wait.
export NGINX_AUTH_REQUESTS_PER_MINUTE=${NGINX_AUTH_REQUESTS_PER_MINUTE:-600}
export NGINX_AUTH_REQUEST_BURST=${NGINX_AUTH_REQUEST_BURST:-100}
# Two instances of each app: chat messages must cross replicas through Redis.
export LOCAL_REPLICAS=${LOCAL_REPLICAS:-2}
export STACK_BASE_URL=${STACK_BASE_URL:-http://127.0.0.1:${NGINX_PORT}}
# https/wss: the stack makes a development CA in its run dir; the suite trusts only that CA.
export NGINX_TLS_PORT=${NGINX_TLS_PORT:-8443}
export STACK_TLS_BASE_URL=${STACK_TLS_BASE_URL:-https://127.0.0.1:${NGINX_TLS_PORT}}
export STACK_TLS_CA_FILE=${STACK_TLS_CA_FILE:-$(realpath -m "${LOCAL_RUN_DIR:-.run}")/tls/ca.crt}
export STACK_MODE=local
# The apps a test starts of its own use the stack's Redis as the stack's apps do: the same
# user and the password file scripts/stack.py makes (tests/local_redis.py reads the admin's).
export REDIS_USERNAME=${REDIS_USERNAME:-chat}
export REDIS_PASSWORD_FILE=$(realpath -m "${LOCAL_RUN_DIR:-.run}")/secrets/redis-password
mkdir -p .run
log=.run/stack-test.log

.venv/bin/python scripts/stack.py >"$log" 2>&1 &
stack_pid=$!
stop_stack() {
    kill -TERM "$stack_pid" 2>/dev/null || true
    wait "$stack_pid" 2>/dev/null || true
}
trap stop_stack EXIT

# Readiness is the stack's own health checks: stack.py prints "ready" only after each
# service passed its probe; we give up at once if it exits instead.
until grep -q '^stack: ready' "$log"; do
    if ! kill -0 "$stack_pid" 2>/dev/null; then
        echo "test: the stack failed to start; its output:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.2
done
# ...and both apps answer through nginx, as the tests will reach them.
for app in uwsgi flask; do
    PYTHONPATH=common .venv/bin/python -m wsstack.probe "$STACK_BASE_URL/$app"
done

status=0
# --durations: the slowest tests in every run's output, where the suite's time goes.
.venv/bin/python -m pytest -c tests/pytest.ini --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure here" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "test: stack log: $log (last lines below)" >&2
    tail -n 40 "$log" >&2
fi
exit "$status"
