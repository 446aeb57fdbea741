#!/bin/sh
# TEST INFRASTRUCTURE: like the official redis image, no protected mode inside the network.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
