"""Shipping to object storage (a real SeaweedFS on loopback), measured against references of the same run.

- Ingest at the single-instance peak (100-record arrays, wrk) with shipping off and on, alternating off, on,
  off, on: records/s on / off (target >= 0.8), and with shipping on, bytes shipped vs bytes written over the
  run, the backlog left at its end, and seal-to-confirmed latency p50/p99 (from the log lines' times).
- `read s3://…` of 1M records vs `read` of the same local segments (same run, best of 2 each).

    .venv/bin/python -m pytest benchmarks/test_bench_ship.py -s [--e2e-seconds 30]
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import harness
import httpx
import pytest

sys.path.insert(0, str(harness.ROOT / "tests"))
from s3_support import RO, RW, SeaweedS3, weed_binary

from telemetry_sink import segment_format
from telemetry_sink.testing import clean_env

SEGMENT_BYTES = 16 << 20  # small enough that a short run seals (and ships) several segments
_LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(sealed|shipped) segment (\S+)", re.M)

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="no weed binary: run scripts/bootstrap.sh")


def _metric(server: harness.Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^telemetry_sink_{name} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _seal_to_shipped_s(log: str) -> list[float]:
    sealed: dict[str, float] = {}
    out = []
    for stamp, what, name in _LINE_TIME.findall(log):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if what == "sealed":
            sealed[name] = t
        elif name in sealed:
            out.append(t - sealed[name])
    return out


def _run(workdir: Path, s3: SeaweedS3 | None, seconds: float, conns: int) -> dict[str, Any]:
    # The disk stays bounded however long the run (at ~100 MiB/s, 2 minutes are 12 GiB a run): with
    # shipping on, each segment is deleted once confirmed; off, retention keeps the newest 1 GiB.
    extra: dict[str, dict[str, Any]] = {"writer": {"max_segment_bytes": SEGMENT_BYTES, "max_segment_age_s": 0,
                                                   "retention_bytes": 0 if s3 else 1 << 30}}
    if s3 is not None:
        extra["ship"] = {"destination": s3.url(f"bench-{workdir.name}-{time.monotonic_ns()}"),
                         "endpoint_url": s3.endpoint, "region": "us-east-1", "allow_http": "true",
                         "after_upload": "delete"}
    server = harness.start_product(workdir, extra=extra, env=s3.env(RW) if s3 else None,
                                   name="ship-on" if s3 else "ship-off")
    try:
        started = time.monotonic()
        store_cpu = harness.cpu_seconds(s3.proc.pid) if s3 is not None and s3.proc is not None else 0.0
        backlog: list[float] = []
        done = threading.Event()

        def sample() -> None:  # the backlog through the run: bounded, or growing?
            while s3 is not None and not done.wait(1.0):
                backlog.append(_metric(server, "ship_waiting_bytes"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            point, _runs = harness.measure(server, harness.payload("array100"), seconds, conns)
        finally:
            done.set()
            sampler.join(10)
        elapsed = time.monotonic() - started
        if s3 is not None and s3.proc is not None:
            store_cpu = harness.cpu_seconds(s3.proc.pid) - store_cpu
        written = _metric(server, "written_bytes_total")
        half = len(backlog) // 2
        out = {"records_per_s": point.records_per_s, "elapsed_s": elapsed, "written_bytes": written,
               "backlog_max_first_half": max(backlog[:half], default=0.0),
               "backlog_max_second_half": max(backlog[half:], default=0.0),
               "sink_cpu_s": point.server_cpu_s, "store_cpu_s": store_cpu}
        if s3 is not None:
            out.update(shipped_bytes=_metric(server, "ship_uploaded_bytes_total"),
                       waiting_bytes=_metric(server, "ship_waiting_bytes"),
                       waiting_segments=_metric(server, "ship_waiting_segments"))
            # Keeping up means the backlog at the end is only what was in flight: it drains at once.
            drain_started = time.monotonic()
            while _metric(server, "ship_waiting_segments") > 0 and time.monotonic() - drain_started < 120:
                time.sleep(0.1)
            out["drain_s"] = time.monotonic() - drain_started
        server.stop()
        if s3 is not None:
            out["seal_to_shipped_s"] = _seal_to_shipped_s(server.log())
        return out
    finally:
        server.close()


@pytest.mark.e2e
def test_ship_keeps_up_with_peak_ingest(wrk: str, bench_options: dict[str, Any], bench_workdir: Path) -> None:
    seconds, conns = bench_options["e2e_seconds"], bench_options["connections"]
    s3 = SeaweedS3(bench_workdir / "seaweed-ingest").start()
    try:
        rounds = [(_run(bench_workdir / "ship-off", None, seconds, conns),
                   _run(bench_workdir / "ship-on", s3, seconds, conns)) for _ in range(2)]
    finally:
        s3.stop()
    off = max(r[0]["records_per_s"] for r in rounds)
    on = max(r[1]["records_per_s"] for r in rounds)
    latencies = sorted(x for r in rounds for x in r[1]["seal_to_shipped_s"])
    for i, (a, b) in enumerate(rounds):
        print(f"\nround {i}: off {a['records_per_s']:,.0f} records/s, on {b['records_per_s']:,.0f} records/s; "
              f"written {b['written_bytes'] / b['elapsed_s'] / 2**20:.1f} MiB/s, shipped "
              f"{b['shipped_bytes'] / b['elapsed_s'] / 2**20:.1f} MiB/s over {b['elapsed_s']:.1f} s; "
              f"left waiting at the end: {b['waiting_segments']:.0f} segment(s), {b['waiting_bytes'] / 2**20:.1f} MiB, "
              f"all shipped {b['drain_s']:.1f} s later; on / off {b['records_per_s'] / a['records_per_s']:.2f}x; "
              f"largest backlog in the first / second half of the run: {b['backlog_max_first_half'] / 2**20:.0f} / "
              f"{b['backlog_max_second_half'] / 2**20:.0f} MiB; CPU s during the measured run: "
              f"sink off {a['sink_cpu_s']:.1f}, sink on {b['sink_cpu_s']:.1f}, "
              f"SeaweedFS {b['store_cpu_s']:.1f}")
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    print(f"ingest with shipping on / off (best of 2, same run): {on / off:.2f}x ({on:,.0f} / {off:,.0f} records/s)"
          f"\nseal to confirmed object, {len(latencies)} segments of {SEGMENT_BYTES >> 20} MiB: "
          f"p50 {p50:.2f} s, p99 {p99:.2f} s")
    assert latencies, "no segment was shipped during the run"


def _timed_read(target: str, key_file: Path, env: dict[str, str] | None) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "telemetry_sink", "read", "--key-file", str(key_file), target],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(env), timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    return time.perf_counter() - started


@pytest.mark.e2e
def test_read_from_the_bucket_vs_local(bench_workdir: Path) -> None:
    import bench_read

    from telemetry_sink.crypto import write_key_file
    from telemetry_sink.objstore import Bucket, StoreSettings, object_key, parse_url
    from telemetry_sink.shipper import first_created_ms

    records = 1_000_000
    data = bench_workdir / "read-1m"
    data.mkdir()
    key_file = bench_workdir / "read-1m.key"
    write_key_file(key_file)
    bench_read.write_segments(data, key_file, records)
    s3 = SeaweedS3(bench_workdir / "seaweed-read").start()
    try:
        import os

        os.environ.update({"AWS_ACCESS_KEY_ID": RW[0], "AWS_SECRET_ACCESS_KEY": RW[1]})
        bucket = Bucket(parse_url(s3.url("read-1m")), StoreSettings(s3.endpoint, "us-east-1", True))
        for path in segment_format.list_segments(data):
            series, seq = segment_format.parse_segment_name(path)
            bucket.upload_create_only(object_key("bench", series, seq, first_created_ms(path)), path)
        local, remote = [], []
        for _ in range(2):
            local.append(_timed_read(str(data), key_file, None))
            remote.append(_timed_read(s3.url("read-1m"), key_file, s3.env(RO)))
    finally:
        s3.stop()
    size = sum(p.stat().st_size for p in segment_format.list_segments(data))
    print(f"\nread of {records:,} records ({size / 2**20:.0f} MiB of segments), best of 2, same run: local "
          f"{min(local):.2f} s ({records / min(local):,.0f} records/s), s3:// {min(remote):.2f} s "
          f"({records / min(remote):,.0f} records/s): s3 / local = {min(remote) / min(local):.2f}x the time")
