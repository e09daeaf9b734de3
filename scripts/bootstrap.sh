#!/usr/bin/env bash
# Idempotent set-up: system packages (when root), .venv inside the repo, the package (with its
# test tools when called as `bootstrap.sh --test`), and the compiled extension. Used by
# scripts/run.sh (serving only), scripts/test.sh and .ci/run (--test). Never fails on a missing
# compiler, Cython or headers: the extension build then warns and the pure-Python twin is used.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=build
if [ "${1:-}" = --test ]; then extras=build,test; fi

# System packages: a C compiler and the OpenSSL and zlib headers build the extension. With --test,
# the tools the tests and the quick gate run for real: wrk (HTTP load), tmux (`top` on a terminal),
# HAProxy (the local cluster) and libyaml (the Fluent Bit peer in ../shared/peers). Installed with
# apt-get when we may (root on Debian/Ubuntu), else a warning.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ "$extras" = build,test ]; then
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    { ldconfig -p 2>/dev/null | grep -q 'libyaml-0\.so\.2'; } || missing+=(libyaml-0-2)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "bootstrap: WARNING: missing system packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
    fi
fi

# Python 3.11 or newer.
python=""
for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$candidate
        break
    fi
done
[ -n "$python" ] || { echo "bootstrap: Python 3.11+ is required" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.telemetry-sink-installed-${extras/,/-}"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py -newer "$stamp" 2>/dev/null)" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # The extension is compiled below, where its warning is visible (pip hides build output).
    TELEMETRY_SINK_NO_EXTENSIONS=1 .venv/bin/python -m pip install -q -e ".[$extras]"
    if [ "$extras" = build,test ]; then
        # The coverage-guided fuzzer is best-effort: a prebuilt wheel or nothing (its test skips).
        .venv/bin/python -m pip install -q --only-binary=:all: atheris ||
            echo "bootstrap: note: no atheris wheel for this platform; its fuzz test will be skipped"
    fi
    touch "$stamp"
fi
# (Re-)compile the extension in place when its binary is missing or older than its sources; a
# failed build prints one warning line, removes any old binary and exits 0 (setup.py).
so=$(.venv/bin/python -c 'import importlib.machinery as m; print("telemetry_sink/_speedups" + m.EXTENSION_SUFFIXES[0])')
if [ ! -f "$so" ] || [ telemetry_sink/_speedups.pyx -nt "$so" ] || [ setup.py -nt "$so" ]; then
    .venv/bin/python setup.py -q build_ext --inplace
fi
.venv/bin/telemetry-sink info
