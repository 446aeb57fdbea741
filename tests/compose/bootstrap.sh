#!/usr/bin/env bash
# TEST INFRASTRUCTURE: what `make test-compose` needs beyond `make test`: podman (runc,
# netavark with aardvark-dns so containers find each other by service name on every network
# they share, catatonit as the containers' init), debootstrap for the stand-in base images,
# and podman-compose in .venv.
# Installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=()
command -v podman >/dev/null || packages+=(podman)
command -v runc >/dev/null || packages+=(runc)
command -v debootstrap >/dev/null || packages+=(debootstrap)
# containers.conf selects netavark: podman 4.3's CNI default (with the dnsname plugin) gives
# each network a DNS server that knows only that network, so a container on two compose
# networks could not resolve names on both (docs/testing.md).
[ -x /usr/lib/podman/netavark ] || packages+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || packages+=(aardvark-dns)
# podman's init for the services with `init: true` (Docker ships its own, docker-init)
[ -x /usr/libexec/podman/catatonit ] || packages+=(catatonit)
if [ ${#packages[@]} -gt 0 ]; then
    echo "compose bootstrap: installing Debian packages: ${packages[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# The lock (make lock) pins podman-compose's whole closure with hashes, at the versions of
# .venv's own lock; pip contacts no index when it is already installed. No conflict report:
# the only conflicts are docker-compose's, installed without its dependencies for a data file.
.venv/bin/pip install -q --disable-pip-version-check --no-warn-conflicts --require-hashes \
    -r tests/compose/requirements.txt
echo "compose bootstrap: ready ($(podman --version), $(.venv/bin/podman-compose --version 2>/dev/null | tail -1))"
