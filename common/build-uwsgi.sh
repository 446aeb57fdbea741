#!/bin/sh
# Build and install uWSGI with the project's patch set, into the virtualenv that owns PIP.
# Used by scripts/bootstrap.sh (local mode) and by both app Dockerfiles, so every mode runs
# the same uWSGI: the pinned sdist (from PyPI, or wheelhouse/ through PIP_FIND_LINKS and
# PIP_NO_INDEX), the patches in common/uwsgi-patches/ applied in order, compiled against
# libssl-dev (the WebSocket handshake needs SSL).
#   usage: build-uwsgi.sh PIP REQUIREMENTS_FILE
set -eu
pip=$1
requirements=$2
here=$(cd "$(dirname "$0")" && pwd)

version=$(sed -n 's/^uWSGI==\([0-9.]*\).*/\1/p' "$requirements")
[ -n "$version" ] || { echo "build-uwsgi: no uWSGI==VERSION pin in $requirements" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$pip" download --quiet --disable-pip-version-check --no-deps --no-binary uWSGI -d "$work" "uWSGI==$version"
tar -xzf "$work"/[uU][wW][sS][gG][iI]-"$version".tar.gz -C "$work"
source_dir=$(find "$work" -mindepth 1 -maxdepth 1 -type d -iname "uwsgi-$version")
for p in "$here"/uwsgi-patches/*.patch; do
    patch --quiet --batch --forward -p1 -d "$source_dir" <"$p" \
        || { echo "build-uwsgi: $(basename "$p") does not apply to uWSGI $version" >&2; exit 1; }
done
"$pip" install --quiet --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps "$source_dir"

uwsgi=$(dirname "$pip")/uwsgi
"$uwsgi" --cflags | tr ' ' '\n' | grep -qx -- -DUWSGI_SSL \
    || { echo "build-uwsgi: uWSGI was built without SSL; install libssl-dev" >&2; exit 1; }
echo "build-uwsgi: uWSGI $("$uwsgi" --version) with SSL and $(ls "$here"/uwsgi-patches/*.patch | wc -l) patches"
