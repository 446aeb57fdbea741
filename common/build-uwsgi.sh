#!/bin/sh
# Build and install uWSGI with the project's patch set, into the virtualenv that owns PIP.
# Used by scripts/bootstrap.sh (local mode) and by both app Dockerfiles, so every mode runs
# the same uWSGI: the pinned sdist (from the index, or wheelhouse/ through PIP_FIND_LINKS and
# PIP_NO_INDEX), checked against the sha256 its lock file pins, the patches in
# common/uwsgi-patches/ applied in order, compiled against libssl-dev (the WebSocket handshake
# needs SSL).
#   usage: build-uwsgi.sh PIP REQUIREMENTS_FILE
#          build-uwsgi.sh --source-only DIR REQUIREMENTS_FILE [PIP]
# REQUIREMENTS_FILE is a lock written by `make lock`: its uwsgi==VERSION entry and that
# entry's --hash lines say which sdist to build. PIP's environment must hold the build lock
# (common/build-requirements.txt): the sdist's metadata and build run without build isolation,
# with that hash-checked setuptools.
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

# The lock's uwsgi entry: the pin line, then its --hash lines (names are case-insensitive).
entry=$(awk 'tolower($1) ~ /^uwsgi==/ { keep = 1; print; next } keep && $1 ~ /^--hash=/ { print; next } { keep = 0 }' "$requirements")
version=$(printf '%s\n' "$entry" | sed -n '1s/^[^=]*==\([0-9.]*\).*/\1/p')
[ -n "$version" ] || { echo "build-uwsgi: no uwsgi==VERSION pin in $requirements" >&2; exit 1; }
sha256s=$(printf '%s\n' "$entry" | sed -n 's/^ *--hash=sha256:\([0-9a-f]\{64\}\).*/\1/p')
[ -n "$sha256s" ] || { echo "build-uwsgi: $requirements pins uWSGI $version without a sha256 (a lock written by make lock has one)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pip checks the hash in hash-checking mode before it runs anything of the sdist (its setup.py
# prepares the metadata), so a file that is not the locked one is never executed.
printf 'uwsgi==%s%s\n' "$version" "$(printf ' --hash=sha256:%s' $sha256s)" >"$work/uwsgi.txt"
run_pip() {
    if [ -n "$pip" ]; then "$pip" "$@"; else python3 -m pip "$@"; fi
}
if ! run_pip download --quiet --disable-pip-version-check --require-hashes --no-deps --no-binary uWSGI \
        --no-build-isolation -d "$work" -r "$work/uwsgi.txt" 2>"$work/pip.log"; then
    cat "$work/pip.log" >&2
    if grep -q "DO NOT MATCH THE HASHES" "$work/pip.log"; then
        echo "build-uwsgi: the uWSGI $version sdist that pip found is not the one $requirements pins" \
            "(sha256 $(echo $sha256s)): refusing to build it" >&2
    fi
    exit 1
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

run_pip install --quiet --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps --no-build-isolation "$source_dir"

uwsgi=$(dirname "$pip")/uwsgi
"$uwsgi" --cflags | tr ' ' '\n' | grep -qx -- -DUWSGI_SSL \
    || { echo "build-uwsgi: uWSGI was built without SSL; install libssl-dev" >&2; exit 1; }
echo "build-uwsgi: uWSGI $("$uwsgi" --version) with SSL and $(ls "$here"/uwsgi-patches/*.patch | wc -l) patches"
