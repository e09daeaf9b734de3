#!/usr/bin/env python3
"""A/B of the offline tools from two checkouts on the same local segments, alternating A, B, A, B.

    .venv/bin/python benchmarks/bench_read.py PATH_A PATH_B [--records 1000000] [--rounds 2] \
        [--command "read"] [--command "export --force --out {out}/x.parquet"]

Writes `--records` ~150-byte records (harness.make_record, 1000 a batch, 128 MiB segments, as the
server does by default) once, then times each command from each checkout (its directory first on
PYTHONPATH and as the working directory, this venv's Python; copy the compiled `_speedups*.so` into
a checkout or it runs on the twin), stdout to /dev/null; `{out}` in a command is a scratch directory.
Prints wall time, records/s, records per CPU-second (user + system: the per-core figure) and peak
RSS of each run, then the best wall time of each and A/B. The same path twice measures one checkout.
Before and after, a `Fernet.decrypt` loop's µs per token says how fast the (shared) machine was.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from telemetry_sink import segment_format
from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.testing import clean_env

BATCH = 1000
SEGMENT_BYTES = 128 << 20


def write_segments(directory: Path, key_file: Path, records: int) -> None:
    """`records` records in TSB1 batches of 1000, one series, new segment past 128 MiB."""
    framer = CryptoService.from_key_file(key_file).new_framer()
    out = None
    size = 0
    for first in range(0, records, BATCH):
        if out is None or size > SEGMENT_BYTES:
            if out is not None:
                out.close()
            out = open(directory / segment_format.segment_name("bench", first), "wb")  # noqa: SIM115
            size = out.write(segment_format.FILE_HEADER_BYTES)
        chunk = [orjson.dumps(harness.make_record(i)) for i in range(first, min(first + BATCH, records))]
        size += out.write(framer.frame(first, 1_767_225_600_000 + first, chunk))
    if out is not None:
        out.close()


def run_once(checkout: Path, command: str, data: Path, key_file: Path, out: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one `telemetry-sink COMMAND
    --key-file K DATA` run."""
    argv = [sys.executable, "-m", "telemetry_sink", *command.format(out=out).split(), "--key-file", str(key_file),
            str(data)]
    env = clean_env({"PYTHONPATH": str(checkout.resolve())})
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        # cwd too: `python -m` puts the working directory ahead of PYTHONPATH.
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=checkout)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{checkout}: {command} failed ({proc.returncode}): {err.read().decode()[-400:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def fernet_calibration_us(tokens: int = 4096) -> float:
    """µs per 150-byte token of a plain `Fernet.decrypt` loop, best of 3: how fast the machine is right
    now, printed beside the figures because this shared machine's speed moves them by half."""
    import timeit

    from cryptography.fernet import Fernet

    fernet = Fernet(Fernet.generate_key())
    batch = [fernet.encrypt(os.urandom(150)) for _ in range(tokens)]
    return min(timeit.repeat(lambda: [fernet.decrypt(t) for t in batch], number=2, repeat=3)) / 2 / tokens * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--command", action="append", help="default: read")
    args = parser.parse_args()
    commands = args.command or ["read"]
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        base = Path(tmp)
        data, out = base / "data", base / "out"
        data.mkdir()
        out.mkdir()
        key_file = base / "sink.key"
        write_key_file(key_file)
        start = time.perf_counter()
        write_segments(data, key_file, args.records)
        size = sum(p.stat().st_size for p in data.iterdir())
        print(f"wrote {args.records:,} records ({size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s",
              flush=True)
        print(f"Fernet.decrypt calibration: {fernet_calibration_us():.2f} µs/token", flush=True)
        for command in commands:
            best = {"A": float("inf"), "B": float("inf")}
            for n in range(args.rounds):
                for label, path in (("A", args.a), ("B", args.b)):
                    wall, cpu, rss = run_once(path, command, data, key_file, out)
                    print(f"{command!r} {label} round {n}: {wall:.2f} s, {args.records / wall:,.0f} records/s, "
                          f"{args.records / cpu:,.0f} records per CPU-second, peak RSS {rss:.0f} MiB", flush=True)
                    best[label] = min(best[label], wall)
            a, b = best["A"], best["B"]
            print(f"{command!r} best: A {a:.2f} s ({args.records / a:,.0f} records/s), "
                  f"B {b:.2f} s ({args.records / b:,.0f} records/s), A/B = {a / b:.2f}x",
                  flush=True)
        print(f"Fernet.decrypt calibration: {fernet_calibration_us():.2f} µs/token", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
