"""Reading damaged segments in linear time (issue 10 item 10): time against size for a crafted
file (a fake batch header every 12 bytes, each claiming a body to the end of the file, each with a
wrong CRC) and for a valid file of the same size, through the reader walk, `verify` and start-up
recovery. Before the fix the crafted walk was quadratic: 34 s at 1 MiB, 99 s at 2 MiB.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_resync.py -p no:cacheprovider -s
The assert is a same-run ratio: 8x the size must cost well under the 64x of quadratic time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from telemetry_sink import segment_format
from telemetry_sink.segment_format import BATCH_HEADER, FILE_HEADER_BYTES, FILE_HEADER_SIZE, frame_batch
from telemetry_sink.segment_recovery import recover_series

SIZES_KIB = (512, 1024, 2048, 4096)


def crafted(size: int) -> bytes:
    n = (size - FILE_HEADER_SIZE) // BATCH_HEADER.size
    total = FILE_HEADER_SIZE + BATCH_HEADER.size * n
    return FILE_HEADER_BYTES + b"".join(BATCH_HEADER.pack(b"TSB1", total - off - BATCH_HEADER.size, 0xDEADBEEF)
                                        for off in range(FILE_HEADER_SIZE, total, BATCH_HEADER.size))


def valid(size: int) -> bytes:
    """20 records of 150 bytes a batch (the shape of real traffic), up to `size` bytes."""
    parts, total, seq = [FILE_HEADER_BYTES], FILE_HEADER_SIZE, 0
    while total < size:
        batch = frame_batch(seq, 1_767_225_600_000, [b"t" * 150] * 20)
        parts.append(batch)
        total += len(batch)
        seq += 20
    return b"".join(parts)


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def walk(path: Path) -> None:
    with segment_format.SegmentImage(path) as image:
        for _ in image.batches():
            pass


def verify(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "telemetry_sink", "verify", str(path)], capture_output=True, check=False)


def recover(path: Path, image: bytes) -> Callable[[], object]:
    def run() -> object:
        path.write_bytes(image)  # recovery cuts the damage: start from the same bytes each time
        return recover_series(path.parent, "w0")
    return run


@pytest.mark.parametrize("kind", ["crafted", "valid"])
def test_resync_time_is_linear_in_size(tmp_path: Path, kind: str) -> None:
    make = crafted if kind == "crafted" else valid
    rows = []
    for kib in SIZES_KIB:
        data = make(kib << 10)
        directory = tmp_path / f"{kib}"
        directory.mkdir()
        path = directory / segment_format.segment_name("w0", 0)
        path.write_bytes(data)
        spare = tmp_path / f"{kib}-verify.tslog"
        shutil.copy(path, spare)
        rows.append((kib, best_of(3, lambda p=path: walk(p)), best_of(2, lambda p=spare: verify(p)),
                     best_of(2, recover(path, data))))
    print(f"\n{kind}: size KiB, reader walk s, verify s (process), start-up recovery s")
    for kib, walk_s, verify_s, recover_s in rows:
        print(f"  {kib:5d}  {walk_s:8.3f}  {verify_s:8.3f}  {recover_s:8.3f}")
    ratio = rows[-1][1] / rows[0][1]
    print(f"  reader walk {SIZES_KIB[-1] // SIZES_KIB[0]}x the size: {ratio:.1f}x the time")
    if kind == "valid":
        return  # milliseconds, shown for comparison; too short to assert a ratio on a loaded machine
    # Linear: ~8x (a little more: longer bodies have one more hex digit to shift by); quadratic: 64x.
    assert ratio < 24, "superlinear: 8x the size should cost ~8x the time"
