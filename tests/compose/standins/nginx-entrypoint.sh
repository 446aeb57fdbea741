#!/bin/sh
# TEST INFRASTRUCTURE: the official nginx image's entrypoint, reduced to what this project
# uses: source /docker-entrypoint.d/*.envsh in order (the project's TLS check and development
# certificate; what they export reaches the rendering), then render the templates (same
# script as local mode) when starting nginx.
set -eu
if [ "${1:-}" = "nginx" ]; then
    for script in $(find /docker-entrypoint.d -maxdepth 1 -type f -name '*.envsh' 2>/dev/null | sort); do
        . "$script"
    done
    if [ -d /etc/nginx/templates ]; then
        render-nginx-templates.sh /etc/nginx/templates /etc/nginx/conf.d
    fi
fi
exec "$@"
