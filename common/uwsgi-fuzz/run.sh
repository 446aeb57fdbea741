#!/usr/bin/env bash
# Build and run the libFuzzer harness of the patched WebSocket engine (see README.md here).
#   run.sh build             patched source (build-uwsgi.sh --source-only) + the harness
#   run.sh replay            every committed input (corpus/ and crashes/) once; fails naming
#                            each input that crashes, with the sanitizer's verdict
#   run.sh fuzz [SECONDS]    coverage-guided run (default FUZZ_SECONDS, else 300); new corpus
#                            entries go to .run/uwsgi-fuzz/corpus, crash inputs to
#                            .run/uwsgi-fuzz/crashes (FUZZ_WORK moves both); exits
#                            non-zero on a crash
# FUZZ_ARGS adds libFuzzer options, e.g. FUZZ_ARGS="-fork=2 -ignore_crashes=1" for long runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${FUZZ_OUT:-$repo/.run/uwsgi-fuzz}
requirements=$repo/uwsgi-app/requirements.txt
binary=$out/fuzz_websockets
work=${FUZZ_WORK:-$out}
# Recoverable UBSan checks with halt_on_error: fatal like -fno-sanitize-recover, except for
# the few understood reports in ubsan.supp (a fatal check ignores suppressions).
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:suppressions=$here/ubsan.supp}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:symbolize=1}
libfuzzer_opts=(-max_len=4096 -timeout=10 -rss_limit_mb=2048)

build() {
    command -v clang >/dev/null || { echo "uwsgi-fuzz: clang is missing (scripts/bootstrap.sh installs it)" >&2; exit 1; }
    mkdir -p "$out"
    # The source is prepared again whenever the patch set or its pin changes.
    local stamp
    stamp=$(cat "$repo"/common/build-uwsgi.sh "$requirements" "$repo"/common/uwsgi-patches/*.patch | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$out/src.sha256" 2>/dev/null)" != "$stamp" ] || [ ! -f "$out/src/core/websockets.c" ]; then
        rm -rf "$out/src" "$out/src.sha256"
        local pip=""
        [ -x "$repo/.venv/bin/pip" ] && pip=$repo/.venv/bin/pip
        "$repo/common/build-uwsgi.sh" --source-only "$out/src" "$requirements" $pip
        echo "$stamp" >"$out/src.sha256"
    fi
    # The defines of the real build (uwsgiconfig.py's default profile on this machine): they
    # change uwsgi.h's struct layouts, and UWSGI_SSL compiles the handshake in.
    local cflags
    cflags=$(cd "$out/src" && UWSGI_PROFILE=default python3 uwsgiconfig.py --cflags | tr ' ' '\n' | grep -E '^-[DI]' | grep -v EMBEDDED_PLUGINS)
    grep -qx -- -DUWSGI_SSL <<<"$cflags" \
        || { echo "uwsgi-fuzz: uwsgiconfig.py found no SSL (install libssl-dev): the handshake would not be fuzzed" >&2; exit 1; }
    if [ -x "$binary" ] && [ -z "$(find "$here" "$out/src.sha256" -newer "$binary" -type f)" ]; then
        return 0
    fi
    local defines=()
    mapfile -t defines <<<"$cflags"
    # -fsanitize-recover=undefined + halt_on_error=1 (above): see ubsan.supp
    clang -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fsanitize-recover=undefined \
        -I"$out/src" -I"$here" "${defines[@]}" \
        "$out/src/core/websockets.c" "$out/src/core/buffer.c" "$here/stubs.c" "$here/fuzz_websockets.c" "$here/mutator.c" \
        -lcrypto -o "$binary.new"
    mv "$binary.new" "$binary"
    echo "uwsgi-fuzz: built $binary from $out/src/core/websockets.c"
}

replay() {
    local failed=0 total=0 input log
    log=$(mktemp)
    for input in "$here"/corpus/* "$here"/crashes/*; do
        [ -f "$input" ] || continue
        total=$((total + 1))
        # in a subshell, so the shell's own "Aborted" goes to the log too
        if ! ("$binary" "${libfuzzer_opts[@]}" -runs=1 "$input") >"$log" 2>&1; then
            failed=$((failed + 1))
            echo "uwsgi-fuzz: FAIL ${input#"$repo"/}:"
            # the sanitizer's or the oracle's verdict, then where it happened
            grep -m1 -E '^==[0-9]+==ERROR|runtime error|^==ORACLE==|^SUMMARY' "$log" | sed 's/^/    /'
            grep -m1 -E '^SUMMARY' "$log" | sed 's/^/    /'
            grep -m3 -E '^    #[0-9]+ .* in ' "$log" | sed 's/^/    /'
        fi
    done
    rm -f "$log"
    echo "uwsgi-fuzz: replayed $total inputs, $failed failed"
    [ "$failed" -eq 0 ]
}

fuzz() {
    local seconds=${1:-${FUZZ_SECONDS:-300}}
    mkdir -p "$work/corpus" "$work/crashes"
    # new units go to the first folder, so the committed seeds stay as they are
    # shellcheck disable=SC2086
    "$binary" "${libfuzzer_opts[@]}" -max_total_time="$seconds" -print_final_stats=1 \
        -dict="$here/websocket.dict" -artifact_prefix="$work/crashes/" ${FUZZ_ARGS:-} "$work/corpus" "$here/corpus"
}

case "${1:-}" in
    build) build ;;
    replay) build; replay ;;
    fuzz) build; fuzz "${2:-}" ;;
    *) echo "usage: run.sh build | replay | fuzz [SECONDS]" >&2; exit 2 ;;
esac
