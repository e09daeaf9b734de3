"""Benchmarks: per-record framing cost (compiled vs twin vs plain Fernet) and the token bucket.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_speedups.py -p no:cacheprovider --benchmark-only
Self-contained on purpose (no tests/conftest.py); figures are recorded in docs/speedups.md.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

import harness
import pytest
from cryptography.fernet import Fernet

from telemetry_sink.testing import speedups_module

SIGNING_KEY = os.urandom(16)
ENCRYPTION_KEY = os.urandom(16)
FERNET = Fernet(base64.urlsafe_b64encode(SIGNING_KEY + ENCRYPTION_KEY))

RECORD_SIZES = {"150B": 150, "1KiB": 1024}
BATCH_SIZES = [1, 100, 1000]
GATE_SPEEDUP = 3.0  # CI floor; the product target is 5x (see docs/speedups.md)


def _records(size: int, count: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def _fernet_loop(records: list[bytes]) -> Callable[[], list[bytes]]:
    """The baseline: what the service would do without the framer (no framing even)."""
    encrypt = FERNET.encrypt
    return lambda: [encrypt(r) for r in records]


def _framer_call(impl: str, records: list[bytes]) -> Callable[[], bytes]:
    framer = speedups_module(impl).BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    return lambda: framer.frame(1, 1_700_000_000_000, records)


def _note_per_record(benchmark: Any, records_per_batch: int) -> None:
    """Add µs/record to the saved JSON (stats is None under --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_record_min"] = stats.stats.min / records_per_batch * 1e6
        benchmark.extra_info["us_per_record_median"] = stats.stats.median / records_per_batch * 1e6


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("size_name", list(RECORD_SIZES))
@pytest.mark.parametrize("impl", ["compiled", "pure-python", "fernet-loop"])
def test_frame(benchmark: Any, impl: str, size_name: str, batch: int) -> None:
    records = _records(RECORD_SIZES[size_name], batch)
    call: Callable[[], object] = _fernet_loop(records) if impl == "fernet-loop" else _framer_call(impl, records)
    benchmark.group = f"frame {size_name} x{batch}"
    benchmark.extra_info.update(impl=impl, records_per_batch=batch, record_bytes=RECORD_SIZES[size_name])
    benchmark(call)
    _note_per_record(benchmark, batch)


@pytest.mark.parametrize("impl", ["compiled", "pure-python"])
def test_token_bucket_try_acquire(benchmark: Any, impl: str) -> None:
    # Huge capacity: every call takes the success path (refill, compare, subtract).
    bucket = speedups_module(impl).TokenBucket(1e9, 1e15, 0.0)
    benchmark.group = "token bucket try_acquire"
    benchmark.extra_info["impl"] = impl
    assert benchmark(bucket.try_acquire, 1.0, 1.0) is True


def test_gate_compiled_vs_fernet(benchmark: Any, served_implementation: str) -> None:
    """CI gate: the server's framing of 1000 x 150-byte records is >= 3x a Fernet.encrypt loop.

    Times the implementation a product server reports in /healthz (so a server on the twin fails
    here, at ~1x), with perf_counter (best of several interleaved rounds, same process, same
    moment, so machine load hits both sides alike). Routed through `benchmark.pedantic` only so
    that --benchmark-only does not skip the gate.
    """
    records = _records(150, 1000)
    framer = harness.speedups_module(served_implementation).BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)

    def framed() -> object:
        return framer.frame(1, 1_700_000_000_000, records)

    fernet = _fernet_loop(records)

    def compare() -> dict[str, float]:
        framed()
        fernet()  # warm both up first
        compiled_s = fernet_s = float("inf")
        for _ in range(5):  # interleave, so a burst of load cannot favour one side
            compiled_s = min(compiled_s, harness.best_of(framed, 3))
            fernet_s = min(fernet_s, harness.best_of(fernet, 3))
        return {
            "compiled_us_per_record": compiled_s / len(records) * 1e6,
            "fernet_us_per_record": fernet_s / len(records) * 1e6,
            "speedup": fernet_s / compiled_s,
        }

    benchmark.group = "gate: compiled vs Fernet.encrypt, 150B x1000"
    result = benchmark.pedantic(compare, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(
        f"\nthe server's framer ({served_implementation}) {result['compiled_us_per_record']:.3f} us/record, "
        f"Fernet.encrypt {result['fernet_us_per_record']:.3f} us/record, "
        f"speedup {result['speedup']:.1f}x (gate {GATE_SPEEDUP}x, target 5x)"
    )
    assert result["speedup"] >= GATE_SPEEDUP, f"the server's framer ({served_implementation}): {result}"
