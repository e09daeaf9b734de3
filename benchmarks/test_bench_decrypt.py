"""Benchmarks: per-record decryption cost (compiled BatchDecryptor vs twin vs a Fernet.decrypt loop).

Run:  .venv/bin/python -m pytest benchmarks/test_bench_decrypt.py -p no:cacheprovider --benchmark-only -s
Self-contained like test_bench_speedups.py; figures are recorded in docs/speedups.md.
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

KEY = os.urandom(32)
OLD_KEY = os.urandom(32)
FERNET = Fernet(base64.urlsafe_b64encode(KEY))

RECORD_SIZES = {"150B": 150, "1KiB": 1024}
BATCH_SIZES = [1, 100, 1000]
GATE_SPEEDUP = 8.0  # the target for 150-byte records


def _tokens(size: int, count: int) -> list[bytes]:
    return [FERNET.encrypt(os.urandom(size)) for _ in range(count)]


def _fernet_loop(tokens: list[bytes]) -> Callable[[], list[bytes]]:
    """The baseline: what `read` did before, one Fernet.decrypt a record."""
    decrypt = FERNET.decrypt
    return lambda: [decrypt(t) for t in tokens]


def _decryptor_call(impl: str, tokens: list[bytes], keys: list[bytes]) -> Callable[[], list[bytes | None]]:
    decryptor = speedups_module(impl).BatchDecryptor(keys)
    return lambda: decryptor.decrypt(tokens)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("size_name", list(RECORD_SIZES))
@pytest.mark.parametrize("impl", ["compiled", "pure-python", "fernet-loop"])
def test_decrypt(benchmark: Any, impl: str, size_name: str, batch: int) -> None:
    tokens = _tokens(RECORD_SIZES[size_name], batch)
    call: Callable[[], object] = _fernet_loop(tokens) if impl == "fernet-loop" else _decryptor_call(impl, tokens, [KEY])
    benchmark.group = f"decrypt {size_name} x{batch}"
    benchmark.extra_info.update(impl=impl, records_per_batch=batch, record_bytes=RECORD_SIZES[size_name])
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_record_median"] = stats.stats.median / batch * 1e6


def test_decrypt_second_key(benchmark: Any) -> None:
    """Tokens under the second key of two: each pays one failed HMAC first (MultiFernet order)."""
    tokens = _tokens(150, 1000)
    benchmark.group = "decrypt 150B x1000, key 2 of 2"
    benchmark(_decryptor_call("compiled", tokens, [OLD_KEY, KEY]))


def test_gate_compiled_vs_fernet(benchmark: Any) -> None:
    """Gate: compiled decryption of 1000 x 150-byte records is >= 8x a Fernet.decrypt loop.

    Interleaved best-of rounds in one process, as in test_bench_speedups.py's framing gate.
    """
    tokens = _tokens(150, 1000)
    compiled = _decryptor_call("compiled", tokens, [KEY])
    fernet = _fernet_loop(tokens)
    assert compiled() == fernet()

    def compare() -> dict[str, float]:
        compiled_s = fernet_s = float("inf")
        for _ in range(5):
            compiled_s = min(compiled_s, harness.best_of(compiled, 3))
            fernet_s = min(fernet_s, harness.best_of(fernet, 3))
        return {
            "compiled_us_per_record": compiled_s / len(tokens) * 1e6,
            "fernet_us_per_record": fernet_s / len(tokens) * 1e6,
            "speedup": fernet_s / compiled_s,
        }

    benchmark.group = "gate: compiled vs Fernet.decrypt, 150B x1000"
    result = benchmark.pedantic(compare, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(
        f"\ncompiled {result['compiled_us_per_record']:.3f} us/record, "
        f"Fernet.decrypt {result['fernet_us_per_record']:.3f} us/record, "
        f"speedup {result['speedup']:.1f}x (gate {GATE_SPEEDUP}x)"
    )
    assert result["speedup"] >= GATE_SPEEDUP, result
