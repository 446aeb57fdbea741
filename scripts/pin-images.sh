#!/usr/bin/env bash
# make pin-images: pin the upstream base images by digest, so a tag moved on the registry
# (a rebuilt or replaced image) changes nothing until this is run again and the change is
# reviewed. Each default, name:tag, becomes name:tag@sha256:DIGEST wherever it is written:
# docker-compose.yml's ${PYTHON_IMAGE:-...}, ${NGINX_IMAGE:-...} and ${REDIS_IMAGE:-...}, the
# Dockerfiles' ARG defaults, docs/configuration.md, and k8s/base/kustomization.yaml's
# `images:` entry for Redis (the one upstream image Kubernetes pulls). The tag stays in the
# reference for the reader; the digest is what is pulled.
#   scripts/pin-images.sh                     ask the registry (skopeo) for each tag's digest
#   scripts/pin-images.sh VAR=name:tag@sha256:...
#                                             write digests obtained elsewhere (a mirror, a
#                                             registry's web page), for those variables only
# To move to a new tag: change the tag everywhere (tests/test_supply_chain.py checks that the
# places agree), then run this. The digest is the one of the tag's manifest list, which covers
# every platform the image is built for.
set -euo pipefail
cd "$(dirname "$0")/.."

# The registry asked for the digests: Docker Hub, where the images come from. A mirror of it
# (host[:port]) serves the same digests, since a digest is the hash of the manifest itself.
PIN_IMAGES_REGISTRY=${PIN_IMAGES_REGISTRY:-docker.io}

variables=(PYTHON_IMAGE NGINX_IMAGE REDIS_IMAGE)
declare -A wanted=()
for argument in "$@"; do
    [[ $argument =~ ^([A-Z_]+)=([^@[:space:]]+@sha256:[0-9a-f]{64})$ ]] \
        || { echo "pin-images: expected VAR=name:tag@sha256:<64 hex digits>, got $argument" >&2; exit 2; }
    wanted[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done

current() {  # compose's default for the variable
    grep -o "\${$1:-[^}]*}" docker-compose.yml | head -1 | sed "s/^\${$1:-\(.*\)}$/\1/"
}
regex() {  # a literal string as a sed regular expression
    printf '%s' "$1" | sed 's/[.[\*^$/]/\\&/g'
}

if [ $# -eq 0 ]; then
    command -v skopeo >/dev/null || { echo "pin-images: skopeo is missing (apt-get install skopeo)" >&2; exit 1; }
    manifest=$(mktemp)
    trap 'rm -f "$manifest"' EXIT
    for variable in "${variables[@]}"; do
        reference=$(current "$variable")
        reference=${reference%@*}
        # Docker Hub's short names: python:TAG is library/python:TAG there.
        path=$reference
        [[ $path == */* ]] || path=library/$path
        # The raw manifest as the registry serves it for the tag; its digest is what a pull by
        # digest asks for.
        skopeo inspect --raw "docker://$PIN_IMAGES_REGISTRY/$path" >"$manifest"
        wanted[$variable]=$reference@$(skopeo manifest-digest "$manifest")
    done
fi

for variable in "${!wanted[@]}"; do
    old=$(current "$variable")
    new=${wanted[$variable]}
    [ -n "$old" ] || { echo "pin-images: docker-compose.yml has no \${$variable:-...} default" >&2; exit 1; }
    [ "${old%@*}" = "${new%@*}" ] \
        || { echo "pin-images: $variable is $old here, not ${new%@*}: change the tag first" >&2; exit 1; }
    sed -i "s|\${$variable:-$(regex "$old")}|\${$variable:-$new}|g" docker-compose.yml
    sed -i "s|^ARG $variable=$(regex "$old")\$|ARG $variable=$new|" */Dockerfile
    sed -i "s#^\(| \`$variable\` | \)\`$(regex "$old")\`#\1\`$new\`#" docs/configuration.md
    if [ "$variable" = REDIS_IMAGE ]; then
        # kustomize writes name:newTag@digest into the Deployment: the same reference as compose's.
        named=${new%@*}
        name=$(regex "${named%:*}")
        sed -i -e "/^  - name: $name\$/,/^  - /{s|^    newTag: .*|    newTag: \"${named##*:}\"|;/^    digest: /d}" \
            -e "/^  - name: $name\$/,/^  - /s|^    newTag: .*|&\n    digest: ${new#*@}|" k8s/base/kustomization.yaml
    fi
    echo "pin-images: $variable=$new"
done
