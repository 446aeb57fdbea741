#!/usr/bin/env bash
# STOCK uWSGI for the side-by-side comparisons (make conformance, make autobahn): a venv with
# the same pinned uWSGI sdist and the apps' requirements, built without common/uwsgi-patches.
#   scripts/stock-uwsgi.sh      builds .run/stock-venv when it has no working uWSGI yet
set -euo pipefail
cd "$(dirname "$0")/.."
stock=.run/stock-venv
if ! "$stock/bin/uwsgi" --version 2>/dev/null | grep -qx '[0-9.]*'; then
    echo "stock-uwsgi: building stock uWSGI into $stock" >&2
    python3 -m venv "$stock"
    # The apps' locks, hash-checked as everywhere; the build lock first, for the uWSGI sdist's
    # build without build isolation.
    "$stock/bin/pip" install -q --disable-pip-version-check --no-cache-dir --require-hashes \
        -r common/build-requirements.txt
    "$stock/bin/pip" install -q --disable-pip-version-check --no-cache-dir --require-hashes \
        --no-build-isolation --no-binary uWSGI -r uwsgi-app/requirements.txt -r flask-app/requirements.txt
fi
