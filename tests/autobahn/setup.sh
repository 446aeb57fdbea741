#!/usr/bin/env bash
# Autobahn|Testsuite (wstest) runs on Python 2.7 only, which Debian 12 no longer ships: this
# makes a Debian bullseye root file system with its python2.7 (debootstrap) and installs the
# pinned, hash-checked tests/autobahn/requirements-py27.txt into it with pip 20.3.4 (the last
# pip for Python 2). Idempotent: a stamp records what was installed; a second run only checks
# that `wstest --help` works.
#   tests/autobahn/setup.sh          AUTOBAHN_DIR (default .run/autobahn) holds the chroot
# Needs root (debootstrap, chroot). Reads the Debian mirror from the host's apt sources and
# pip's index settings from the host's pip configuration, at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/autobahn
dir=$(realpath -m "${AUTOBAHN_DIR:-.run/autobahn}")
root=$dir/chroot
suite=bullseye

[ "$(id -u)" -eq 0 ] || { echo "autobahn-setup: needs root (debootstrap and chroot)" >&2; exit 1; }
mkdir -p "$dir"
# Two setups of the same directory at once would debootstrap over each other.
exec 9>"$dir/.setup.lock"
flock 9

if ! command -v debootstrap >/dev/null; then
    echo "autobahn-setup: installing debootstrap (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

debian_mirror() {
    # The host's own mirror (deb822 sources first, then the one-line format); the security
    # archive has no bullseye base system to bootstrap from.
    local uri
    uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {if ($i !~ /security/) {print $i; exit} else break}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    [ -n "$uri" ] || { echo "autobahn-setup: no Debian mirror in the host's apt sources; set AUTOBAHN_DEBIAN_MIRROR" >&2; exit 1; }
    echo "$uri"
}

if [ ! -e "$root/.debootstrap-done" ]; then
    mirror=${AUTOBAHN_DEBIAN_MIRROR:-$(debian_mirror)}
    echo "autobahn-setup: debootstrap $suite (minbase + python2.7) from $mirror into $root"
    # A half-made tree from an interrupted run is never reused.
    rm -rf "$root.partial"
    debootstrap --variant=minbase --include=python2.7 "$suite" "$root.partial" "$mirror" >"$dir/debootstrap.log" 2>&1 \
        || { tail -n 20 "$dir/debootstrap.log" >&2; echo "autobahn-setup: debootstrap failed (log: $dir/debootstrap.log)" >&2; exit 1; }
    touch "$root.partial/.debootstrap-done"
    rm -rf "$root"
    mv "$root.partial" "$root"
fi

# wss runs verify the development certificate, issued for localhost (not for 127.0.0.1 as a
# name): the chroot must resolve it, and debootstrap writes no /etc/hosts.
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n' >"$root/etc/hosts"

# pip's settings for the chroot, from the host's (`pip config list`, with PIP_* variables as
# :env:): index and extra indexes over http(s), trusted hosts, timeout, CA bundle. Local paths
# (file:// indexes, find-links directories, constraint files) do not exist inside the chroot
# and are dropped; the requirements file pins and hashes everything anyway.
pip_args() {
    python3 -m pip config list 2>/dev/null | python3 -c '
import ast, os, shlex, sys
rank = {":env:": 0, "site": 1, "user": 2, "global": 3}
best = {}
for line in sys.stdin:
    key, _, raw = line.strip().partition("=")
    scope, _, name = key.rpartition(".")
    scope_rank = rank.get(scope.split(".")[0] if scope != ":env:" else scope, 4)
    if name not in best or scope_rank < best[name][0]:
        best[name] = (scope_rank, ast.literal_eval(raw))
value = {name: v for name, (_, v) in best.items()}
remote = lambda url: url.startswith(("http://", "https://"))
args = []
if remote(value.get("index-url", "")):
    args += ["--index-url", value["index-url"]]
for url in value.get("extra-index-url", "").split():
    if remote(url):
        args += ["--extra-index-url", url]
for url in value.get("find-links", "").split():
    if remote(url):
        args += ["--find-links", url]
for host in value.get("trusted-host", "").split():
    args += ["--trusted-host", host]
if value.get("default-timeout") or value.get("timeout"):
    args += ["--timeout", value.get("timeout") or value["default-timeout"]]
cert = value.get("cert", "")
if cert and os.path.isfile(cert):
    args += ["--cert", "/opt/autobahn/host-ca.pem"]
    print("CERT " + cert)
print("ARGS " + " ".join(shlex.quote(a) for a in args))
'
}

in_chroot() {
    # A clean environment: the host's PIP_* variables name paths that exist only on the host.
    chroot "$root" /usr/bin/env -i HOME=/root LC_ALL=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin PIP_CONFIG_FILE=/dev/null "$@"
}

# The entries (name==version and its hash lines) of the named packages in the requirements file.
pinned() {
    awk -v names=" $* " '/^[^ #]/ {split($1, pin, "=="); keep = index(names, " " pin[1] " ") > 0} keep' \
        "$here/requirements-py27.txt"
}

stamp=$root/opt/autobahn/.installed.sha256
wanted=$(cat "$here/requirements-py27.txt" "$here/setup.sh" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    mkdir -p "$root/opt/autobahn"
    settings=$(pip_args)
    cert=$(sed -n 's/^CERT //p' <<<"$settings")
    [ -z "$cert" ] || cp "$cert" "$root/opt/autobahn/host-ca.pem"
    eval "args=($(sed -n 's/^ARGS //p' <<<"$settings"))"
    # pip 20.3.4 itself comes from the requirements file's hashed pin, fetched by the host's pip
    # (which may use its local indexes); it then runs from its wheel inside the chroot.
    pip_wheel=/opt/autobahn/pip-20.3.4-py2.py3-none-any.whl
    if [ ! -e "$root$pip_wheel" ]; then
        pinned pip >"$dir/pip-requirement.txt"
        python3 -m pip download -q --no-deps --require-hashes --only-binary :all: --python-version 2.7 \
            -d "$root/opt/autobahn" -r "$dir/pip-requirement.txt"
    fi
    cp "$here/requirements-py27.txt" "$root/opt/autobahn/requirements-py27.txt"
    pinned setuptools wheel >"$root/opt/autobahn/build-requirements.txt"
    echo "autobahn-setup: installing $here/requirements-py27.txt into the chroot (pip 20.3.4, hashes required)"
    # --no-deps: the file is the whole closure, so nothing unpinned comes in. No build
    # isolation: the sdists build with the pinned setuptools and wheel, installed first, rather
    # than with whatever versions the index offers today.
    for requirements in build-requirements.txt requirements-py27.txt; do
        in_chroot python2.7 "$pip_wheel/pip" install -q --no-cache-dir --disable-pip-version-check \
            --no-python-version-warning --require-hashes --no-deps --no-build-isolation "${args[@]}" \
            -r "/opt/autobahn/$requirements"
    done
    echo "$wanted" >"$stamp"
fi

if ! in_chroot wstest --help >"$dir/wstest-help.txt" 2>&1 || ! grep -q fuzzingclient "$dir/wstest-help.txt"; then
    cat "$dir/wstest-help.txt" >&2
    rm -f "$stamp"
    echo "autobahn-setup: wstest --help failed in $root" >&2
    exit 1
fi
echo "autobahn-setup: ready ($(in_chroot wstest --autobahnversion 2>&1 | tail -n 1 || true); chroot $root)"
