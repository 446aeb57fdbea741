#!/bin/sh
# TEST INFRASTRUCTURE: the official nginx image's entrypoint, reduced to what this project
# uses: render the templates (same script as local mode) when starting nginx.
set -eu
if [ "${1:-}" = "nginx" ] && [ -d /etc/nginx/templates ]; then
    render-nginx-templates.sh /etc/nginx/templates /etc/nginx/conf.d
fi
exec "$@"
