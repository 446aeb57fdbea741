#!/bin/sh
# TEST INFRASTRUCTURE: the official nginx image's entrypoint, reduced to what this project
# uses: when starting nginx, source the executable /docker-entrypoint.d/*.envsh scripts in
# order (the project's resolver and TLS checks and development certificate; what they export
# reaches the rendering), then render the templates (same script as local mode).
set -eu
if [ "${1:-}" = "nginx" ]; then
    for script in /docker-entrypoint.d/*.envsh; do
        if [ -x "$script" ]; then
            . "$script"
        fi
    done
    if [ -d /etc/nginx/templates ]; then
        render-nginx-templates.sh /etc/nginx/templates /etc/nginx/conf.d
    fi
fi
exec "$@"
