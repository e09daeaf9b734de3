#!/usr/bin/env bash
# The quick benchmark gate (CI; called by scripts/test.sh after the tests). Under 3 minutes on 2 cores.
# Ratio gates only, measured in the same run: the extension is compiled (unless
# TELEMETRY_SINK_NO_EXTENSIONS=1), compiled framer >= 3x the pure-Python twin and >= 3x a
# Fernet.encrypt loop, single-record POST >= 0.5x the raw ASGI ceiling (wrk, 3 s runs, alternating,
# best of 2). Exits non-zero when a gate is missed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "run_quick: installing wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
exec .venv/bin/python -m pytest benchmarks -m quick -p no:cacheprovider --benchmark-disable -s -q \
    -o console_output_style=classic "$@"
