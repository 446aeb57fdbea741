#!/usr/bin/env bash
# `make secrets`: the compose stack's secrets, made once, kept, git-ignored (secrets/):
#   secrets/redis-password   the apps' Redis password (docker-compose.yml's redis-password)
# An existing file is left as it is: Redis and the apps must keep agreeing, and a password
# you put there yourself is yours. For Kubernetes, make the Secret from the same file
# (docs/kubernetes.md): kubectl create secret generic redis-password --from-file=password=secrets/redis-password
set -euo pipefail
cd "$(dirname "$0")/.."

dir=secrets
# Only you can list or open the directory; the file itself is world-readable because
# compose bind-mounts it as it is, and the containers read it as their own non-root users.
mkdir -p "$dir"
chmod 700 "$dir"
file=$dir/redis-password
if [ ! -e "$file" ]; then
    umask 022
    # 32 random bytes, URL-safe base64: no character a shell, a URL or redis-cli would mangle.
    python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file.new"
    mv -n "$file.new" "$file"
    rm -f "$file.new"
    echo "secrets: made $file (keep it; docs/operations.md, \"Redis\")"
fi
[ -s "$file" ] || { echo "secrets: $file is empty" >&2; exit 1; }
