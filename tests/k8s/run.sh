#!/usr/bin/env bash
# TEST INFRASTRUCTURE: `make test-k8s`: run the rendered Kubernetes manifests with podman, as a
# kubelet would (tests/k8s/kubelet.py), on a machine without a cluster.
#   1. install what make test-compose needs (podman, stand-in base images, wheelhouse)
#   2. build the images as make test-compose does: the project's Dockerfiles, offline
#   3. for k8s/base and k8s/overlays/scaled: start every Deployment's pod template, run the
#      integration suite from the tests image against an nginx pod, then the pod checks of
#      tests/k8s/test_pods.py (rolling restarts, a killed pod, probes, ports and policies)
#   4. the regression: k8s/base with the service links the kubelet injects by default
#   5. remove every pod, network and image it made (also on failure)
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/bootstrap.sh >/dev/null
tests/compose/bootstrap.sh

export CONTAINERS_CONF=$PWD/tests/compose/containers.conf
# HEALTHCHECK instructions survive only in the docker image format.
export BUILDAH_FORMAT=docker
project=${K8S_TEST_PROJECT:-websockets-behind-nginx-k8s}
log_dir=.run/k8s
rm -rf "$log_dir"
mkdir -p "$log_dir"

dangling_before=$(podman images --quiet --filter dangling=true | sort)
eval "$(tests/compose/build-standins.sh)"
export PYTHON_IMAGE NGINX_IMAGE REDIS_IMAGE
make --no-print-directory wheelhouse >"$log_dir/wheelhouse.log" 2>&1 || { cat "$log_dir/wheelhouse.log" >&2; exit 1; }

# The images under this run's own names, so a concurrent make test-compose keeps its own.
compose=(.venv/bin/podman-compose -f docker-compose.yml -p "$project" --profile test
         --podman-build-args "--network=none --build-arg=PIP_NO_INDEX=1")
built=()
teardown() {
    status=$?
    set +e
    [ "$status" -eq 0 ] || echo "test-k8s: failed; the pods' logs are in $log_dir/" >&2
    podman pod ls --filter "label=k8s-test" --format '{{.Name}}' | grep -F "$project" | xargs --no-run-if-empty podman pod rm --force >/dev/null 2>&1
    podman network ls --format '{{.Name}}' | grep -F "$project" | xargs --no-run-if-empty podman network rm --force >/dev/null 2>&1
    # K8S_TEST_KEEP_IMAGES=1 (while working on the harness): the next run's build is cached.
    if [ "${K8S_TEST_KEEP_IMAGES:-0}" != 1 ]; then
        podman rmi --force "${built[@]}" "$PYTHON_IMAGE" "$NGINX_IMAGE" "$REDIS_IMAGE" "$STANDIN_BASE" >/dev/null 2>&1
    fi
    comm -13 <(echo "$dangling_before") <(podman images --quiet --filter dangling=true | sort) \
        | xargs --no-run-if-empty podman rmi --force >/dev/null 2>&1
    left=$(podman pod ls --format '{{.Name}}' | grep -F "$project"; podman network ls --format '{{.Name}}' | grep -F "$project")
    if [ -n "$left" ]; then
        echo "test-k8s: left behind: $left" >&2
        status=1
    fi
    exit "$status"
}
trap teardown EXIT

echo "test-k8s: building images (offline, the project's Dockerfiles)"
"${compose[@]}" build >"$log_dir/build.log" 2>&1 || { tail -30 "$log_dir/build.log" >&2; exit 1; }
# podman-compose names them as the compose file does (websockets-behind-nginx/*:dev): tag them
# for this run, so the harness maps each manifest image to one of these.
for name in nginx uwsgi-app flask-app tests; do
    podman tag "websockets-behind-nginx/$name:dev" "localhost/$project/$name:test"
    built+=("localhost/$project/$name:test" "websockets-behind-nginx/$name:dev")
done
podman tag "$REDIS_IMAGE" "localhost/$project/redis:test"
built+=("localhost/$project/redis:test")

.venv/bin/python tests/k8s/main.py --project "$project" --log-dir "$log_dir" "$@"
