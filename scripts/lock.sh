#!/usr/bin/env bash
# make lock: every requirements.in (hand-edited, direct dependencies only) becomes its
# requirements.txt, the whole closure pinned with sha256 hashes, by `uv pip compile
# --generate-hashes`. Every install (scripts/bootstrap.sh, the Dockerfiles,
# tests/compose/bootstrap.sh) uses those files with --require-hashes.
#   make lock                  keeps the versions already locked, changes only what the .in
#                              files now ask for (uv prefers the existing output file)
#   make lock LOCK_UPGRADE=1   re-resolves every transitive pin to the newest allowed
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK_VENV=${LOCK_VENV:-.run/lock-venv}
# The oldest Python every lock must install on: Debian bookworm's 3.11.2 (make test-compose's
# stand-in images). Resolving for it keeps dependencies whose marker admits only older
# Pythons (redis needs async-timeout before 3.11.3); they install harmlessly on the official
# image's 3.11.14. The platform is bookworm's glibc on x86_64; the hashes cover every file of
# each pinned release, so pip can pick another platform's wheel of the same version.
LOCK_PYTHON_VERSION=${LOCK_PYTHON_VERSION:-3.11.2}
LOCK_PYTHON_PLATFORM=${LOCK_PYTHON_PLATFORM:-x86_64-manylinux_2_36}
LOCK_UPGRADE=${LOCK_UPGRADE:-0}

# uv itself, from its own lock (scripts/requirements-lock.txt, which this script writes too).
wanted_uv=$(sed -n 's/^uv==\([^ ]*\) .*/\1/p' scripts/requirements-lock.txt)
if [ "$("$LOCK_VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$wanted_uv" ]; then
    python3 -m venv "$LOCK_VENV"
    "$LOCK_VENV/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps \
        -r scripts/requirements-lock.txt
fi

upgrade=()
[ "$LOCK_UPGRADE" = 1 ] && upgrade=(--upgrade)
compile() {
    local name=$1
    shift
    echo "lock: $name.txt" >&2
    "$LOCK_VENV/bin/uv" pip compile --quiet --generate-hashes --custom-compile-command "make lock" \
        --python-version "$LOCK_PYTHON_VERSION" --python-platform "$LOCK_PYTHON_PLATFORM" \
        "${upgrade[@]}" "$@" "$name.in" -o "$name.txt"
}

compile scripts/requirements-lock
# Local mode's closure first: the parts below are constrained to its versions, so two
# virtualenvs never run different versions of a package.
compile scripts/requirements-local
for part in common/build-requirements uwsgi-app/requirements flask-app/requirements \
    tests/requirements tests/compose/requirements; do
    compile "$part" --constraints scripts/requirements-local.txt
done
compile tests/requirements-compose-schema --no-deps
