#!/bin/sh
# Build and install uWSGI with the project's patch set, into the virtualenv that owns PIP.
# Used by scripts/bootstrap.sh (local mode) and by both app Dockerfiles, so every mode runs
# the same uWSGI: the pinned sdist (from PyPI, or wheelhouse/ through PIP_FIND_LINKS and
# PIP_NO_INDEX), the patches in common/uwsgi-patches/ applied in order, compiled against
# libssl-dev (the WebSocket handshake needs SSL).
#   usage: build-uwsgi.sh PIP REQUIREMENTS_FILE
#          build-uwsgi.sh --source-only DIR REQUIREMENTS_FILE [PIP]
# --source-only stops before compiling: DIR (created, must not exist yet) becomes the patched
# source tree. The fuzz harness (common/uwsgi-fuzz/) compiles from it, so it tests exactly
# the websockets.c that the installed uWSGI runs. PIP defaults to `python3 -m pip`; it is only
# used to download the sdist.
set -eu
here=$(cd "$(dirname "$0")" && pwd)

source_only=""
if [ "${1:-}" = "--source-only" ]; then
    [ $# -ge 3 ] || { echo "usage: build-uwsgi.sh --source-only DIR REQUIREMENTS_FILE [PIP]" >&2; exit 2; }
    source_only=$2
    requirements=$3
    pip=${4:-}
    [ ! -e "$source_only" ] || { echo "build-uwsgi: $source_only already exists" >&2; exit 1; }
else
    [ $# -eq 2 ] || { echo "usage: build-uwsgi.sh PIP REQUIREMENTS_FILE" >&2; exit 2; }
    pip=$1
    requirements=$2
fi

version=$(sed -n 's/^uWSGI==\([0-9.]*\).*/\1/p' "$requirements")
[ -n "$version" ] || { echo "build-uwsgi: no uWSGI==VERSION pin in $requirements" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -n "$pip" ]; then
    "$pip" download --quiet --disable-pip-version-check --no-deps --no-binary uWSGI -d "$work" "uWSGI==$version"
else
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary uWSGI -d "$work" "uWSGI==$version"
fi
tar -xzf "$work"/[uU][wW][sS][gG][iI]-"$version".tar.gz -C "$work"
source_dir=$(find "$work" -mindepth 1 -maxdepth 1 -type d -iname "uwsgi-$version")
for p in "$here"/uwsgi-patches/*.patch; do
    patch --quiet --batch --forward -p1 -d "$source_dir" <"$p" \
        || { echo "build-uwsgi: $(basename "$p") does not apply to uWSGI $version" >&2; exit 1; }
done

if [ -n "$source_only" ]; then
    # Moved out of the temporary directory only once complete: a half-patched tree never
    # appears at DIR.
    mkdir -p "$(dirname "$source_only")"
    mv "$source_dir" "$source_only"
    echo "build-uwsgi: uWSGI $version source with $(ls "$here"/uwsgi-patches/*.patch | wc -l) patches in $source_only"
    exit 0
fi

"$pip" install --quiet --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps "$source_dir"

uwsgi=$(dirname "$pip")/uwsgi
"$uwsgi" --cflags | tr ' ' '\n' | grep -qx -- -DUWSGI_SSL \
    || { echo "build-uwsgi: uWSGI was built without SSL; install libssl-dev" >&2; exit 1; }
echo "build-uwsgi: uWSGI $("$uwsgi" --version) with SSL and $(ls "$here"/uwsgi-patches/*.patch | wc -l) patches"
