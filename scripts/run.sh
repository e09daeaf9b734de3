#!/usr/bin/env bash
# Install what serving needs (if needed; the test tools come with scripts/test.sh) and run the
# server on the default config.ini, creating a development key (./dev.key, mode 0600) if there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
[ -f dev.key ] || [ -n "${TELEMETRY_SINK_KEY:-}" ] || .venv/bin/telemetry-sink keygen --config config.ini --out dev.key
exec .venv/bin/telemetry-sink serve --config config.ini "$@"
