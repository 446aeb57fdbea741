# Local mode needs no Docker: `make run` and `make test` install what is missing first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

.PHONY: help bootstrap run test test-compose test-k8s conformance autobahn fuzz fuzz-replay bench wheelhouse lock pin-images secrets clean compose-up compose-test compose-down

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

bootstrap: ## install nginx, redis-server, libssl-dev (apt, when missing) and .venv with uWSGI built with SSL
	scripts/bootstrap.sh

# `make run REPLICAS=2`: that many instances of each app behind nginx (local mode).
REPLICAS ?= 1

run: bootstrap ## run the stack as local processes on http://127.0.0.1:8080 (Ctrl-C stops it); REPLICAS=N
	LOCAL_REPLICAS=$(REPLICAS) .venv/bin/python scripts/stack.py

test: ## run every test against a freshly started local stack; TEST_ARGS="-k idle" narrows it
	scripts/test.sh $(TEST_ARGS)

test-compose: ## without Docker: build the images and run the compose stack with podman, test it, tear it down
	tests/compose/run.sh

test-k8s: ## without a cluster: run the rendered k8s/ pods with podman as a kubelet would, test them, tear down
	tests/k8s/run.sh $(K8S_ARGS)

conformance: ## RFC 6455 checks on stock uWSGI vs the project's patched build, both apps, as a table
	scripts/conformance.sh

autobahn: ## Autobahn|Testsuite 1-10 (no deflate) via nginx, ws+wss, patched vs stock (root); AUTOBAHN_ARGS="--skip-9"
	tests/autobahn/run.sh $(AUTOBAHN_ARGS)

# `make fuzz FUZZ_SECONDS=3600` for a longer run; FUZZ_ARGS passes libFuzzer options.
FUZZ_SECONDS ?= 300

fuzz: bootstrap ## fuzz the patched WebSocket engine for FUZZ_SECONDS (300) with ASan/UBSan; crash inputs in .run/uwsgi-fuzz/crashes
	FUZZ_SECONDS=$(FUZZ_SECONDS) common/uwsgi-fuzz/run.sh fuzz

fuzz-replay: bootstrap ## replay the committed fuzz corpus and regression inputs once (bounded, for CI)
	common/uwsgi-fuzz/run.sh replay

bench: bootstrap ## benchmark against the targets P1-P5 of docs/benchmark.md (about 10 min); BENCH_ARGS="--quick" or see --help
	.venv/bin/python bench/bench.py $(BENCH_ARGS)

wheelhouse: bootstrap ## download every locked Python package of the images into wheelhouse/ (for offline image builds)
	.venv/bin/pip download -q --disable-pip-version-check --require-hashes --no-build-isolation -d wheelhouse \
		-r common/build-requirements.txt -r uwsgi-app/requirements.txt -r flask-app/requirements.txt \
		-r tests/requirements.txt
# The locks are resolved for Python 3.11.2 (scripts/lock.sh), so they carry what an older
# Python needs (async-timeout for redis before 3.11.3) without a marker that a download on
# this machine's newer Python would skip.

lock: ## regenerate every requirements.txt from its requirements.in (pinned, hashed closure); LOCK_UPGRADE=1 upgrades all
	LOCK_UPGRADE=$(LOCK_UPGRADE) scripts/lock.sh

# `make lock LOCK_UPGRADE=1` re-resolves every transitive pin; plain `make lock` keeps them.
LOCK_UPGRADE ?= 0

pin-images: ## pin the base images (compose defaults, Dockerfiles, docs, kustomize images:) to their registry digests
	scripts/pin-images.sh $(PIN_IMAGES_ARGS)

# `make pin-images PIN_IMAGES_ARGS="REDIS_IMAGE=redis:7.4.8@sha256:..."` writes a digest you have.
PIN_IMAGES_ARGS ?=

clean: ## remove the virtualenv and run-time files
	rm -rf .venv .run

secrets: ## make the compose stack's secrets once (secrets/redis-password, git-ignored); compose-up runs it
	scripts/make-secrets.sh

compose-up: secrets ## Docker: build and start the stack
	docker compose up --build

compose-test: secrets ## Docker: run the suite in the tests container against nginx
	NGINX_PROXY_READ_TIMEOUT=5s UWSGI_WEBSOCKETS_PING_FREQ=2 NGINX_AUTH_REQUESTS_PER_MINUTE=600 NGINX_AUTH_REQUEST_BURST=100 \
		docker compose --profile test run --rm --build tests

compose-down: ## Docker: stop and remove the stack (apps first: their WebSocket clients get close 1001 through nginx)
	docker compose stop uwsgi-app flask-app
	docker compose --profile test down --volumes --remove-orphans
