"""Micro benchmarks: JSON parse + validation per record, segment read (+ decrypt) per record,
and the quick gates that need no server (extension compiled, compiled framer >= 3x the twin).

Run:  .venv/bin/python -m pytest benchmarks/test_bench_micro.py -p no:cacheprovider
(framing itself: benchmarks/test_bench_speedups.py)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import pytest

from telemetry_sink import segment_format, speedups
from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.records import encode_records, parse_body

TWIN_GATE = 3.0  # quick gate: compiled BatchFramer >= 3x the pure-Python twin (1000 x 150 B records)


def _per_record(benchmark: Any, n: int) -> None:
    stats = getattr(benchmark, "stats", None)
    benchmark.extra_info["records_per_call"] = n
    if stats is not None:
        benchmark.extra_info["us_per_record_median"] = stats.stats.median / n * 1e6
        benchmark.extra_info["us_per_record_min"] = stats.stats.min / n * 1e6


# -- parse + validate --

PARSE_CASES = {
    "object x1": (harness.json_object_body(), "json", 1),
    "array x100": (harness.json_array_body(100), "json", 100),
    "ndjson x100": (harness.ndjson_body(100), "ndjson", 100),
    "array x1000": (harness.json_array_body(1000), "json", 1000),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_parse_and_validate(benchmark: Any, case: str) -> None:
    """service.parse_body + encode_records (validation, ts check, orjson.dumps of each record)."""
    body, fmt, n = PARSE_CASES[case]

    def run() -> int:
        plaintexts, _ = encode_records(parse_body(body, fmt), 1767225600.0)
        return len(plaintexts)

    benchmark.group = "parse + validate"
    assert benchmark(run) == n
    _per_record(benchmark, n)


def test_parse_and_validate_without_ts(benchmark: Any) -> None:
    """The same for 100 records that lack `ts` (the server adds it: one more dict insert each)."""
    recs = harness.records(100)
    for r in recs:
        del r["ts"]
    body = harness.orjson.dumps(recs)

    benchmark.group = "parse + validate"
    assert benchmark(lambda: len(encode_records(parse_body(body, "json"), 1.0)[0])) == 100
    _per_record(benchmark, 100)


# -- segment read + decrypt --


@pytest.fixture(scope="module")
def segment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CryptoService, int]:
    """One segment of 20 batches x 1000 records (~150 B each) written by the active framer."""
    directory = tmp_path_factory.mktemp("segment")
    key_file = directory / "sink.key"
    write_key_file(key_file)
    crypto = CryptoService.from_key_file(key_file)
    framer = crypto.new_framer()
    plaintexts = [harness.orjson.dumps(r) for r in harness.records(1000)]
    path = directory / segment_format.segment_name("w0", 0)
    with open(path, "wb") as f:
        f.write(segment_format.FILE_HEADER_BYTES)
        for i in range(20):
            f.write(framer.frame(i * 1000, 1767225600000, plaintexts))
    return path, crypto, 20 * 1000


def _read(path: Path, decrypt: Callable[[bytes], bytes] | None) -> int:
    n = 0
    with segment_format.SegmentImage(path) as image:
        for item in image.batches():
            assert isinstance(item, segment_format.Batch)
            if decrypt is None:
                n += item.count
            else:
                for token in item.tokens:
                    decrypt(token)
                    n += 1
    return n


def test_segment_read(benchmark: Any, segment: tuple[Path, CryptoService, int]) -> None:
    """SegmentImage + iter_batches (mmap, CRC, token split) without the key: what `verify` does."""
    path, _, n = segment
    benchmark.group = "segment read"
    assert benchmark(_read, path, None) == n
    _per_record(benchmark, n)


def test_segment_read_and_decrypt(benchmark: Any, segment: tuple[Path, CryptoService, int]) -> None:
    """The same plus CryptoService.decrypt (MultiFernet) per record: what `read` does."""
    path, crypto, n = segment
    benchmark.group = "segment read"
    assert benchmark.pedantic(_read, (path, crypto.decrypt), rounds=3, iterations=1) == n
    _per_record(benchmark, n)


# -- quick gates --


@pytest.mark.quick
def test_quick_server_runs_compiled_extension(served_implementation: str) -> None:
    """The server the gate measures runs the compiled extension (/healthz says so), and so does this
    process. Fails, never skips, without it: the gate's figures are the compiled build's."""
    why = speedups.FALLBACK_REASON or "the server could not load it"
    assert served_implementation == speedups.IMPLEMENTATION == "compiled", (
        f"the server runs {served_implementation!r}, this process {speedups.IMPLEMENTATION!r} ({why}); "
        f"the gate measures the compiled extension: {speedups.HOW_TO_COMPILE}")


@pytest.mark.quick
def test_quick_gate_compiled_framer_vs_twin(served_implementation: str) -> None:
    """The server's BatchFramer.frame of 1000 x 150 B records >= 3x the pure-Python twin (interleaved)."""
    served = harness.speedups_module(served_implementation)
    twin = harness.speedups_module("pure-python")
    keys = os.urandom(16), os.urandom(16)
    recs = [os.urandom(150) for _ in range(1000)]
    fast, slow = served.BatchFramer(*keys), twin.BatchFramer(*keys)
    fast.frame(0, 0, recs)
    slow.frame(0, 0, recs)
    fast_s = slow_s = float("inf")
    for _ in range(5):
        fast_s = min(fast_s, harness.best_of(lambda: fast.frame(0, 0, recs), 3))
        slow_s = min(slow_s, harness.best_of(lambda: slow.frame(0, 0, recs), 2))
    ratio = slow_s / fast_s
    print(f"\nframer 1000 x 150 B: the server's ({served_implementation}) {fast_s / 1000 * 1e6:.3f} us/record, "
          f"twin {slow_s / 1000 * 1e6:.3f} us/record: {ratio:.1f}x (gate {TWIN_GATE}x)")
    assert ratio >= TWIN_GATE, (
        f"the server's framer ({served_implementation}) only {ratio:.2f}x the twin (gate {TWIN_GATE}x)")
