#!/usr/bin/env bash
# Install everything local mode and the test suite need, on a bare Debian + Python machine:
#   - Debian packages (when missing): nginx, redis-server, envsubst, a C compiler and
#     libssl-dev (uWSGI's WebSocket handshake needs SSL at build time), clang with the
#     libFuzzer runtime (the engine's fuzz harness)
#   - .venv with the apps' and the tests' pinned Python dependencies, uWSGI compiled with SSL
# Idempotent and quick when nothing changed (a stamp records the requirements installed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import sys; assert sys.version_info >= (3, 11)" 2>/dev/null \
    || { echo "bootstrap: $PYTHON must be Python 3.11 or newer" >&2; exit 1; }

apt_packages=()
command -v nginx >/dev/null || apt_packages+=(nginx)
command -v redis-server >/dev/null || apt_packages+=(redis-server)
command -v envsubst >/dev/null || apt_packages+=(gettext-base)
# make run's DNS server for the service names (scripts/localdns.py); dnsmasq-base is the bare
# program, without a system service.
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || apt_packages+=(dnsmasq-base)
dpkg -s libssl-dev >/dev/null 2>&1 || apt_packages+=(libssl-dev)
command -v gcc >/dev/null || apt_packages+=(gcc)
dpkg -s libc6-dev >/dev/null 2>&1 || apt_packages+=(libc6-dev)
command -v patch >/dev/null || apt_packages+=(patch)
# The WebSocket engine's fuzz harness (common/uwsgi-fuzz/, tests/test_fuzz.py): clang, and the
# libFuzzer and sanitizer runtimes, which clang-14 does not pull in without recommends.
command -v clang >/dev/null || apt_packages+=(clang)
dpkg -s libclang-rt-14-dev >/dev/null 2>&1 || apt_packages+=(libclang-rt-14-dev)
# nginx/dev-certs.sh makes the development TLS certificate with it.
command -v openssl >/dev/null || apt_packages+=(openssl)
# make pin-images asks a registry for the base images' digests with skopeo; the tests run it
# against Debian's docker-registry on 127.0.0.1 (tests/test_supply_chain.py).
command -v skopeo >/dev/null || apt_packages+=(skopeo)
command -v docker-registry >/dev/null || apt_packages+=(docker-registry)
# A Debian-packaged python3 needs these to create the venv and to compile uWSGI against it.
"$PYTHON" -c "import ensurepip" 2>/dev/null || apt_packages+=(python3-venv)
"$PYTHON" -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
    2>/dev/null || apt_packages+=(python3-dev)
# --- browser tests (tests/test_browser.py) -------------------------------------------------
# Debian's Chromium, driven by Playwright (tests/requirements-browser.in, locked with the
# other requirements below). Playwright's own browser download is unreachable here: never
# `playwright install`; the tests launch /usr/bin/chromium.
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
# --- end of browser tests ------------------------------------------------------------------
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${apt_packages[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    # The packages' own nginx and redis-server services would start on ports 80 and 6379 (the
    # latter is ours): a temporary policy-rc.d tells Debian's maintainer scripts not to start them.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        $sudo sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# Every Python package comes from a lock written by `make lock` (scripts/lock.sh), installed
# with --require-hashes: the build lock (pip, setuptools, wheel) first, then local mode's whole
# closure (scripts/requirements-local.txt), built without build isolation so the sdists use
# that hash-checked setuptools.
locks=(common/build-requirements.txt scripts/requirements-local.txt tests/requirements-compose-schema.txt)
stamp="$VENV/.requirements.sha256"
wanted=$(cat "${locks[@]}" scripts/bootstrap.sh common/build-uwsgi.sh common/uwsgi-patches/*.patch | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! "$VENV/bin/uwsgi" --version 2>/dev/null | grep -q -- -wsstack; then
    echo "bootstrap: installing Python dependencies into $VENV"
    # A new virtualenv each time the locks change: pip only adds and replaces, so a package
    # that left the locks would otherwise stay installed, unlocked.
    if [ -f "$VENV/pyvenv.cfg" ]; then
        rm -rf "$VENV"
    fi
    "$PYTHON" -m venv "$VENV"
    pip_install=("$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes)
    "${pip_install[@]}" -r common/build-requirements.txt
    # uWSGI first, patched and compiled with SSL (the same script the Dockerfiles run); the
    # lock then finds uwsgi==2.0.31 already installed.
    common/build-uwsgi.sh "$VENV/bin/pip" scripts/requirements-local.txt
    "${pip_install[@]}" --no-build-isolation -r scripts/requirements-local.txt
    # The Compose Specification JSON schema for tests/test_static.py; only its data file is
    # used, so docker-compose comes without its dependencies.
    "${pip_install[@]}" --no-deps -r tests/requirements-compose-schema.txt
    echo "$wanted" >"$stamp"
fi

echo "bootstrap: ready (nginx $(nginx -v 2>&1 | cut -d/ -f2), redis $(redis-server --version | grep -o "v=[0-9.]*" | cut -d= -f2), uWSGI $("$VENV/bin/uwsgi" --version) with SSL and the project's patches)"
