#!/usr/bin/env bash
# `make conformance`: the RFC 6455 checks (common/wsstack/conformance.py) against both apps
# running on STOCK uWSGI and on the project's patched build, side by side. The stock build
# goes to .run/stock-venv (uWSGI from the same pinned sdist, without common/uwsgi-patches).
# The apps run directly on loopback ports (no nginx), one worker each.
#   CONFORMANCE_ARGS=--brief make conformance    (pass/FAIL only; --json for JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh >/dev/null

scripts/stock-uwsgi.sh
stock=.run/stock-venv

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
port=18300
urls=()
for build in stock patched; do
    bin=$([ "$build" = stock ] && echo "$stock/bin/uwsgi" || echo .venv/bin/uwsgi)
    for app in uwsgi-app flask-app; do
        port=$((port + 1))
        WSSTACK_ALLOW_STOCK_UWSGI=1 UWSGI_PROCESSES=1 UWSGI_HTTP_SOCKET="127.0.0.1:$port" \
            "$bin" --ini "$app/uwsgi.ini" >".run/conformance-$build-$app.log" 2>&1 &
        pids+=($!)
        PYTHONPATH=common .venv/bin/python - "$port" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"conformance: app on port {sys.argv[1]} did not become healthy")
        time.sleep(0.2)
PY
        urls+=("ws://127.0.0.1:$port/ws/echo#$app-on-$build-uwsgi")
    done
done
# The stock columns fail by design: report, do not fail.
PYTHONPATH=common .venv/bin/python -m wsstack.conformance ${CONFORMANCE_ARGS:-} "${urls[@]}" || true
for build in stock patched; do
    echo "worker crashes (segmentation faults) on $build uWSGI: $(cat .run/conformance-"$build"-*.log | grep -ac "Segmentation Fault" || true)"
done
