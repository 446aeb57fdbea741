#!/usr/bin/env bash
# `make autobahn`: install what is missing (the project's .venv, stock uWSGI, the wstest
# chroot), then run Autobahn|Testsuite against both apps on both builds (tests/autobahn/run.py).
#   tests/autobahn/run.sh [--skip-9] [--only-9] [--builds patched|stock|patched,stock]
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/bootstrap.sh >/dev/null
case " $* " in
    *" --builds patched "*|*" --builds=patched "*) ;;
    *) scripts/stock-uwsgi.sh ;;
esac
tests/autobahn/setup.sh
exec .venv/bin/python tests/autobahn/run.py "$@"
