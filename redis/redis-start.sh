#!/bin/sh
# Start redis-server with the chat's boundary, the same way in compose, Kubernetes (a copy in
# k8s/base/, tests/test_k8s.py keeps them equal) and local mode (scripts/stack.py):
#   - the default user is off: a connection that did not authenticate can run nothing;
#   - the apps' user, REDIS_USERNAME with the password in REDIS_PASSWORD_FILE, may run only
#     the commands the chat sends, on the chat's keys (docs/operations.md, "Redis");
#   - REDIS_ADMIN_PASSWORD_FILE, when set, adds user admin with every command (local mode
#     makes one for its tests and for you; compose and Kubernetes have none);
#   - maxmemory REDIS_MAXMEMORY with noeviction: a full Redis refuses writes, it drops nothing;
#   - REDIS_APPENDONLY=yes: an append-only file in the working directory (compose: the
#     redis-data volume), which a restart replays.
# The configuration reaches redis-server on its standard input, each password only as its
# SHA-256: no password or hash is on a command line, in the environment or in a file of ours.
# Arguments go to redis-server after the configuration (local mode's --bind, --port, --dir).
# With --health it checks a running Redis instead (the healthchecks).
set -eu

fail() {
    echo "redis-start: $*" >&2
    exit 2
}

# The password is the file's content without its trailing newlines, as the apps read it
# (wsstack/settings.py). printf is a builtin: the password is no process's argument.
password_hash() {
    [ -n "$2" ] || fail "$1 is empty: it must name the file that holds the password"
    [ -f "$2" ] && [ -r "$2" ] || fail "$1=$2 is not a readable file"
    password=$(cat -- "$2") || fail "$1=$2 cannot be read"
    [ -n "$password" ] || fail "$1=$2 is empty"
    printf %s "$password" | sha256sum | cut -d' ' -f1
}

required() {
    eval "value=\${$1-}"
    [ -n "$value" ] || fail "$1 is not set"
    printf %s "$value"
}

# `redis-start.sh --health`: the healthcheck (compose, the Kubernetes probes). PONG for the
# apps' user; the default user may not even PING.
# Further arguments go to redis-cli (-p PORT).
if [ "${1-}" = --health ]; then
    shift
    REDISCLI_AUTH=$(cat -- "$(required REDIS_PASSWORD_FILE)")
    export REDISCLI_AUTH
    [ "$(redis-cli --no-auth-warning --user "$(required REDIS_USERNAME)" "$@" ping)" = PONG ]
    exit
fi

user=$(required REDIS_USERNAME)
case $user in
    *[!A-Za-z0-9_-]*) fail "REDIS_USERNAME=$user: letters, digits, _ and - only" ;;
    default|admin) fail "REDIS_USERNAME=$user is reserved" ;;
esac
maxmemory=$(required REDIS_MAXMEMORY)
printf '%s\n' "$maxmemory" | grep -Eqix '[1-9][0-9]*([kmg]b?|b)?' \
    || fail "REDIS_MAXMEMORY=$maxmemory is not a size such as 160mb (bytes, or kb, mb, gb; 0 is refused)"
appendonly=$(required REDIS_APPENDONLY)
case $appendonly in
    yes|no) ;;
    *) fail "REDIS_APPENDONLY=$appendonly must be yes or no" ;;
esac
app_hash=$(password_hash REDIS_PASSWORD_FILE "$(required REDIS_PASSWORD_FILE)")
admin_hash=
if [ -n "${REDIS_ADMIN_PASSWORD_FILE-}" ]; then
    admin_hash=$(password_hash REDIS_ADMIN_PASSWORD_FILE "$REDIS_ADMIN_PASSWORD_FILE")
fi

# The chat's commands (wsstack/chat_store.py, chat_hub.py, auth.py, health.py), nothing else:
# no scripting, no KEYS/SCAN, no administration. CLIENT SETNAME names the reader connections.
chat_commands="+ping +select +client|setname +multi +exec +discard"
chat_commands="$chat_commands +xadd +xread +xrange +xrevrange +xinfo|stream"
chat_commands="$chat_commands +set +expire +hset +hget +hmget +hdel +hincrby"
chat_commands="$chat_commands +zadd +zrem +zcard +zcount +zrangebyscore"
# Its keys: chat:ROOM..., each process's chat-wake:INSTANCE stream, the shared token secret.
chat_keys="~chat:* ~chat-wake:* ~chat-auth:*"
admin_user=
if [ -n "$admin_hash" ]; then
    admin_user="user admin reset on #$admin_hash ~* &* +@all"
fi

# A here-document, not a pipe: redis-server replaces this shell (PID 1 in a container, which
# then gets the stop signal) and reads the lines from it.
exec redis-server - "$@" <<EOF
save ""
appendonly $appendonly
maxmemory $maxmemory
maxmemory-policy noeviction
user default reset
user $user reset on #$app_hash $chat_keys -@all $chat_commands
$admin_user
EOF
