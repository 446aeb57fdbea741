#!/bin/sh
# Render nginx templates exactly as the official nginx image does at container start
# (/docker-entrypoint.d/20-envsubst-on-templates.sh): every TEMPLATE_DIR/*.template becomes
# OUTPUT_DIR/<name without .template>, substituting only the environment variables whose
# names match NGINX_ENVSUBST_FILTER, so nginx's own $variables are left alone.
# Unlike the image, a variable the template uses but the environment lacks is an error.
#   usage: render-nginx-templates.sh TEMPLATE_DIR OUTPUT_DIR
set -eu
template_dir=$1
output_dir=$2
filter=${NGINX_ENVSUBST_FILTER:?set NGINX_ENVSUBST_FILTER, e.g. ^NGINX_}

# A listening port that is not a number (NGINX_PORT=tcp://... from a Kubernetes service link)
# would render a `listen` line nginx refuses without naming the variable; the image's
# 10-ports.envsh says the same before its own rendering.
for setting in $(awk 'END { for (name in ENVIRON) if (name ~ /^NGINX_([A-Z]+_)?PORT$/) print name }' </dev/null); do
    value=$(printenv "$setting")
    if ! printf '%s' "$value" | grep -Eqx '[1-9][0-9]{0,4}' || [ "$value" -gt 65535 ]; then
        echo "render-nginx-templates: $setting='$value' is not a port number (1-65535)" >&2
        exit 1
    fi
done

# The server name's check and the setting derived from it, as in the image, unless an
# entrypoint already sourced that script (make test-compose's stand-in image renders with
# this script, after its /docker-entrypoint.d/*.envsh).
if [ -z "${NGINX_UNKNOWN_HOST_SERVER_FLAGS+set}" ]; then
    . "$(dirname "$0")/../nginx/docker-entrypoint.d/17-server-name.envsh"
fi

defined_envs=$(printf '${%s} ' $(awk "END { for (name in ENVIRON) { print ( name ~ /${filter}/ ) ? name : \"\" } }" </dev/null))
mkdir -p "$output_dir"
for template in "$template_dir"/*.template; do
    output="$output_dir/$(basename "$template" .template)"
    envsubst "$defined_envs" <"$template" >"$output"
    missing=$(grep -o '\${NGINX_[A-Z0-9_]*}' "$output" | sort -u | tr '\n' ' ' || true)
    if [ -n "$missing" ]; then
        echo "render-nginx-templates: $template uses unset variables: $missing" >&2
        exit 1
    fi
done
