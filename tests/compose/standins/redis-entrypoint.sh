#!/bin/sh
# TEST INFRASTRUCTURE: the official redis image's entrypoint, reduced: started as root it
# takes /data and drops to the redis user (the official one uses gosu; setpriv is in Debian's
# base); started as a non-root user it runs redis-server directly. Like the official image,
# no protected mode inside the network.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
    fi
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
