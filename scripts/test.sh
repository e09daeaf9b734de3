#!/usr/bin/env bash
# Install everything (if needed) and run the whole test suite: lint, types, tests (both
# _speedups implementations), then the quick benchmark gate. .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
.venv/bin/ruff check telemetry_sink tests benchmarks
.venv/bin/mypy
# pytest exits 5 when it collects nothing: with set -e that fails the run, as it should.
.venv/bin/python -m pytest tests "$@"
if [ -f benchmarks/run_quick.sh ]; then benchmarks/run_quick.sh; fi
