#!/bin/sh
# TEST INFRASTRUCTURE: the official nginx image's entrypoint, reduced to what this project
# uses: when starting nginx, source the executable /docker-entrypoint.d/*.envsh scripts in
# order (the project's resolver and TLS checks and development certificate; what they export
# reaches the rendering), then render the templates (same script as local mode). Like the
# official 20-envsubst script, it renders only when the output directory is writable (as
# root, or as a non-root user on a writable mount) and otherwise says so and goes on.
set -eu
if [ "${1:-}" = "nginx" ]; then
    for script in /docker-entrypoint.d/*.envsh; do
        if [ -x "$script" ]; then
            . "$script"
        fi
    done
fi
if [ "${1:-}" = "nginx" ] && [ -d /etc/nginx/templates ]; then
    if [ -w /etc/nginx/conf.d ]; then
        render-nginx-templates.sh /etc/nginx/templates /etc/nginx/conf.d
    else
        echo "$0: ERROR: /etc/nginx/templates exists, but /etc/nginx/conf.d is not writable" >&2
    fi
fi
exec "$@"
