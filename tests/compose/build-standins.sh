#!/usr/bin/env bash
# TEST INFRASTRUCTURE: build local stand-ins for the upstream base images (python, nginx,
# redis) from Debian packages, for machines where no image registry is reachable. The
# project's Dockerfiles and compose file are used unchanged on top of them (see run.sh).
#   usage: build-standins.sh   (prints the image references, as shell assignments)
# The Debian root filesystem is made with debootstrap once and cached in $STANDIN_CACHE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${STANDIN_CACHE:-$repo/.run/compose}
# The host's own Debian mirror (apt is reachable from CI), unless DEBIAN_MIRROR says otherwise.
host_mirror=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${DEBIAN_MIRROR:-${host_mirror:-http://deb.debian.org/debian}}
prefix=localhost/websockets-behind-nginx-standin
# Everything the three stand-ins need, in one root filesystem they share as a base layer.
packages=python3,python3-venv,python3-pip,python3-dev,python-is-python3,gcc,libc6-dev,libssl-dev,patch,nginx,gettext-base,curl,redis-server,redis-tools,ca-certificates,tini

key=$(printf '%s %s' "$packages" "$(cat "$0")" | sha256sum | cut -c1-12)
base="$prefix/base:$key"
# The slow part (debootstrap, ~1 min) is cached as a tarball; images are made from it each run
# and removed by run.sh at the end.
rootfs_tar="$cache/rootfs-$key.tar"
mkdir -p "$cache"
if [ ! -s "$rootfs_tar" ]; then
    rootfs="$cache/rootfs"
    rm -rf "$rootfs" "$cache"/rootfs-*.tar
    echo "standins: debootstrap bookworm into $rootfs" >&2
    debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # debootstrap can leave the chroot's /proc mounted (seen once a package's maintainer script
    # ran in it); the tarball must hold the file system only, and rm must be able to remove it.
    for mounted in proc sys dev/pts dev; do
        if mountpoint -q "$rootfs/$mounted"; then umount "$rootfs/$mounted"; fi
    done
    # Offline apt: an empty local repository, so `apt-get update` succeeds without network and
    # `apt-get install` of the packages already present is a no-op.
    rm -f "$rootfs"/etc/apt/sources.list "$rootfs"/etc/apt/sources.list.d/*
    mkdir -p "$rootfs/var/local/offline-apt"
    : >"$rootfs/var/local/offline-apt/Packages"
    echo "deb [trusted=yes] file:/var/local/offline-apt ./" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -cf "$rootfs_tar.partial" . && mv "$rootfs_tar.partial" "$rootfs_tar"
    rm -rf "$rootfs"
fi
podman image exists "$base" || podman import --quiet "$rootfs_tar" "$base" >/dev/null

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$here"/standins/* "$repo/scripts/render-nginx-templates.sh" "$context/"
for name in python nginx redis; do
    podman build --quiet --network=none --build-arg "BASE=$base" -t "$prefix/$name:$key" \
        -f "$context/$name.Containerfile" "$context" >/dev/null
done
echo "STANDIN_BASE=$base"
echo "PYTHON_IMAGE=$prefix/python:$key"
echo "NGINX_IMAGE=$prefix/nginx:$key"
echo "REDIS_IMAGE=$prefix/redis:$key"
