#!/usr/bin/env bash
# The quick benchmark gate (CI; called by scripts/test.sh after the tests). About a minute on 2 cores.
# Ratio gates only, measured in the same run (docs/BENCHMARKS.md, "The quick CI gate"): the server
# reports the compiled extension in /healthz; the framer it runs >= 3x the pure-Python twin and
# >= 3x a Fernet.encrypt loop; single-record POSTs: accepted (2xx) records per server CPU-second
# >= 0.7x the raw ASGI ceiling (and per second >= 0.25x), medians of 7 interleaved 2 s rounds,
# no non-2xx answers, every acknowledged record on disk. A gate never skips (a skip is a failure,
# in CI and anywhere), and a run missing any gate fails. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "run_quick: installing wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
exec .venv/bin/python -m pytest benchmarks -m quick -p no:cacheprovider --benchmark-disable -s -q \
    -o console_output_style=classic "$@"
