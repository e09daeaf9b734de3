"""End to end over HTTP on loopback: server subprocesses loaded by wrk (64 connections).

Servers: `product` (`python -m telemetry_sink serve`, rate limit off, fsync = interval, log in a tmp dir),
`product-twin` (the same with TELEMETRY_SINK_NO_EXTENSIONS=1), `raw` (benchmarks/raw_asgi.py, the
ceiling) and `naive` (benchmarks/naive_fastapi.py, what a user would write). Payloads: `single` (one
~150 B record a POST), `array100` (100 records as a JSON array), `ndjson100` (the same as NDJSON).

Each point: a fresh server, 1 s of warm-up load, then --e2e-seconds of measured load; server CPU
seconds (/proc/<pid>/stat utime + stime over the measured run), peak RSS (VmHWM), wrk's latency
percentiles, answers by status (counted in the wrk Lua script); after SIGTERM the log is read back and
must hold every record that got a 202 (plus at most the whole requests wrk abandoned in flight).
Figures land in the pytest-benchmark JSON as extra_info; run_all.py turns them into tables.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_http.py -p no:cacheprovider [--e2e-seconds 3]
      [--server-extra server.workers=2]     # the hook for measuring 1 vs 2 workers once they exist
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import harness
import pytest

QUICK_ROUNDS = 7
QUICK_SECONDS = 2.0
# single-record POST: product >= 0.7 x the raw ASGI ceiling's accepted records per CPU-second. The fast lane
# measured medians of 0.96-1.28 over three runs (2026-12-02), its ASGI lane 0.39: a hot path routed back
# through ASGI fails, with room below the fast lane's lowest run for this machine's noise.
QUICK_GATE = 0.7
QUICK_WALL_FLOOR = 0.25  # ... and >= 0.25 x its accepted records per second (medians over the rounds)
MAX_RECORDS_DEFAULT = 100_000  # [buffer] max_records in config.ini

E2E_POINTS = [
    ("single", "raw"), ("single", "product"), ("single", "naive"),
    ("array100", "raw"), ("array100", "product"), ("array100", "naive"), ("array100", "product-twin"),
    ("ndjson100", "raw"), ("ndjson100", "product"),
    # [ingest] ack = durable against the default buffered acks, same run
    ("single", "product-durable"), ("array100", "product-durable"),
    # [server] workers = 2 against one worker, same run
    ("single", "product-2w"), ("array100", "product-2w"),
]
VARIANTS: dict[str, harness.ConfigValues] = {
    "product-durable": {"ingest": {"ack": "durable"}},
    "product-2w": {"server": {"workers": 2}},
}


def start(kind: str, workdir: Path, extra: harness.ConfigValues) -> harness.Server:
    if kind == "product":
        return harness.start_product(workdir, extra=extra)
    if kind in VARIANTS:
        return harness.start_product(workdir, extra=harness.merge_config(VARIANTS[kind], extra), name=kind)
    if kind == "product-twin":
        return harness.start_product(workdir, extra=extra, env={"TELEMETRY_SINK_NO_EXTENSIONS": "1"},
                                     name="product-twin")
    return harness.start_reference(kind, workdir)


@pytest.mark.e2e
@pytest.mark.parametrize(("payload_name", "kind"), E2E_POINTS, ids=[f"{p}-{k}" for p, k in E2E_POINTS])
def test_e2e(benchmark: Any, wrk: str, bench_options: dict[str, Any], bench_workdir: Path,
             payload_name: str, kind: str) -> None:
    body = harness.payload(payload_name)
    conns = bench_options["connections"]
    extra = bench_options["server_extra"]

    def point() -> harness.PointResult:
        server = start(kind, bench_workdir / f"{payload_name}-{kind}", extra)
        try:
            result, runs = harness.measure(server, body, bench_options["e2e_seconds"], conns)
            server.stop()
        finally:
            server.close()
        result.server = kind
        result.accepted_total = sum(r.accepted for r in runs)
        result.logged_records, result.log_check = harness.check_log(server, runs, body.records_per_request, conns)
        result.extra["server_extra"] = extra if kind.startswith("product") else {}
        return result

    benchmark.group = f"e2e {payload_name}"
    result = benchmark.pedantic(point, rounds=1, iterations=1)
    benchmark.extra_info.update(result.as_dict())
    print(f"\n{kind} {payload_name}: {result.rps:,.0f} req/s, {result.records_per_s:,.0f} records/s, "
          f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, cpu {result.server_cpu_s:.2f} s, "
          f"peak RSS {result.peak_rss_mib:.1f} MiB, statuses {result.statuses}; log {result.log_check}")
    assert not result.log_check.startswith("FAILED"), result.log_check


@pytest.mark.overload
def test_overload_memory(benchmark: Any, wrk: str, bench_options: dict[str, Any], bench_workdir: Path) -> None:
    """Sustained load above the rate limit with config.ini's defaults (only port, dir and key changed):
    1000-record JSON arrays (~150 KB each) from 64 connections for --overload-seconds."""
    body = harness.payload("array1000")
    seconds = bench_options["overload_seconds"]
    conns = bench_options["connections"]
    workdir = bench_workdir / "overload"
    workdir.mkdir(parents=True, exist_ok=True)
    values = harness.default_config(0, workdir / "data", workdir / "sink.key")

    def run() -> dict[str, Any]:
        server = harness.start_product(workdir, values=values, extra=bench_options["server_extra"],
                                       name="overload")
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=lambda: samples.extend(harness.sample_while(server, stop)), daemon=True)
        try:
            sampler.start()
            cpu0 = harness.cpu_seconds(server.pid)
            res = harness.run_wrk(server.url, body, seconds, conns)
            cpu1 = harness.cpu_seconds(server.pid)
            stop.set()
            sampler.join()
            peak = harness.peak_rss_mib(server.pid)
            server.stop()
        finally:
            stop.set()
            server.close()
        logged, verdict = harness.check_log(server, [res], body.records_per_request, conns)
        buffer_samples = [s["buffer_records"] for s in samples if s["buffer_records"] is not None]
        return {
            "seconds": res.seconds, "connections": conns, "body_bytes": len(body.body),
            "records_per_request": body.records_per_request, "requests": res.requests, "rps": res.rps,
            "offered_mib_per_s": res.requests * len(body.body) / res.seconds / 2**20,
            "accepted_mib_per_s": res.accepted * len(body.body) / res.seconds / 2**20,
            "records_per_s": res.accepted * body.records_per_request / res.seconds,
            "statuses": res.statuses, "errors": res.errors, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
            "server_cpu_s": cpu1 - cpu0, "peak_rss_mib": peak,
            "max_sampled_rss_mib": max((s["rss_mib"] for s in samples), default=None),
            "max_buffer_records": max(buffer_samples, default=None), "buffer_samples": len(buffer_samples),
            "logged_records": logged, "log_check": verdict,
        }

    benchmark.group = "overload"
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\noverload {seconds:g} s: {result}")
    assert not verdict_failed(result["log_check"]), result["log_check"]
    assert result["max_buffer_records"] is None or result["max_buffer_records"] <= MAX_RECORDS_DEFAULT


def verdict_failed(verdict: str) -> bool:
    return verdict.startswith("FAILED")


@pytest.mark.profile
@pytest.mark.parametrize("payload_name", ["single", "array100"])
def test_profile_product(benchmark: Any, wrk: str, bench_options: dict[str, Any], bench_workdir: Path,
                         payload_name: str) -> None:
    """py-spy (100 Hz, raw collapsed stacks) of the product server under wrk load: top functions."""
    if harness.py_spy() is None:
        pytest.skip("py-spy not installed (.venv/bin/pip install py-spy)")
    body = harness.payload(payload_name)
    workdir = bench_workdir / f"profile-{payload_name}"
    seconds = max(3.0, min(8.0, bench_options["e2e_seconds"]))

    def run() -> dict[str, Any]:
        server = harness.start_product(workdir, extra=bench_options["server_extra"], name="profile")
        try:
            harness.run_wrk(server.url, body, 1, bench_options["connections"])
            return harness.profile_under_load(server, body, seconds, workdir / "py-spy.txt",
                                              bench_options["connections"])
        finally:
            server.stop()

    benchmark.group = "profile"
    summary = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(payload=payload_name, seconds=seconds, **summary)
    if "error" in summary:
        pytest.skip(summary["error"])
    for name, pct in summary["self"][:10]:
        print(f"  {pct:5.1f}%  {name}")


@pytest.mark.quick
def test_quick_gate_single_post(wrk: str, bench_options: dict[str, Any], bench_workdir: Path) -> None:
    """Single-record POSTs, product against the raw ASGI ceiling, both up at once.

    After 1 s of warm-up each, QUICK_ROUNDS rounds of QUICK_SECONDS wrk runs, raw and product in
    alternating order; per round and server: accepted (2xx) records per second of wall time and
    per CPU-second of the server (utime + stime over the run). Gates, all of which must hold:

    - the product's /healthz reports the compiled extension (the gate measures that build);
    - every answer of both servers is 2xx and wrk saw no socket errors (none are expected here);
    - at least one record on disk, and every acknowledged record is (harness.check_log);
    - median over rounds of product/raw accepted records per CPU-second >= QUICK_GATE. This is the
      figure that decides: on a shared 2-core machine the other jobs take CPU from either server at
      random (the wall-clock ratio of one run went 0.37-2.71 over 6 rounds), but what a record costs
      the server is steady (0.55-0.68 in the same run; the ingest routed through FastAPI 0.17-0.20);
    - median of the wall-clock ratio >= QUICK_WALL_FLOOR: a loose floor for a product that idles
      (sleeps, waits on a lock) instead of spending CPU, which the CPU ratio cannot see.
    """
    body = harness.payload("single")
    conns = bench_options["connections"]
    raw = harness.start_reference("raw", bench_workdir / "quick")
    product = harness.start_product(bench_workdir / "quick", extra=bench_options["server_extra"])
    health = product.healthz() or {}
    runs: dict[str, list[harness.WrkResult]] = {"raw": [], "product": []}
    rounds: list[dict[str, harness.PointResult]] = []
    try:
        for server in (raw, product):
            runs[server.kind].append(harness.run_wrk(server.url, body, 1, conns))
        for i in range(QUICK_ROUNDS):
            points: dict[str, harness.PointResult] = {}
            for server in (raw, product) if i % 2 == 0 else (product, raw):
                point, measured = harness.measure(server, body, QUICK_SECONDS, conns, warmup_s=0)
                points[server.kind] = point
                runs[server.kind].extend(measured)
            rounds.append(points)
        product.stop()
    finally:
        raw.close()
        product.close()
    _, verdict = harness.check_log(product, runs["product"], 1, conns)
    cpu_ratios = [_per_cpu_s(r["product"]) / _per_cpu_s(r["raw"]) for r in rounds]
    wall_ratios = [r["product"].records_per_s / r["raw"].records_per_s for r in rounds]
    for i, r in enumerate(rounds):
        print(f"\nround {i}: raw {r['raw'].records_per_s:,.0f} records/s, {_per_cpu_s(r['raw']):,.0f} per CPU-s; "
              f"product {r['product'].records_per_s:,.0f} records/s, {_per_cpu_s(r['product']):,.0f} per CPU-s; "
              f"ratios: wall {wall_ratios[i]:.2f}, CPU {cpu_ratios[i]:.2f}", end="")
    cpu_ratio, wall_ratio = statistics.median(cpu_ratios), statistics.median(wall_ratios)
    print(f"\nsingle-record POST, median of {QUICK_ROUNDS} x {QUICK_SECONDS:g} s rounds: accepted records per "
          f"server CPU-second {cpu_ratio:.2f} of the raw ASGI ceiling (gate {QUICK_GATE}), per second "
          f"{wall_ratio:.2f} (floor {QUICK_WALL_FLOOR}); implementation {health.get('implementation')}; log {verdict}")
    failures = []
    if health.get("implementation") != "compiled":
        failures.append(f"the measured server runs {health.get('implementation')!r}, not the compiled extension")
    for kind, kind_runs in runs.items():
        refused = sum((Counter(r.refused) for r in kind_runs), Counter())
        errors = sum((Counter(r.errors) for r in kind_runs), Counter())
        if refused or +errors:
            failures.append(f"{kind}: unexpected answers {dict(refused)}, socket errors {dict(+errors)}")
    if verdict_failed(verdict):
        failures.append(f"log: {verdict}")
    if cpu_ratio < QUICK_GATE:
        failures.append(f"accepted records per CPU-second at {cpu_ratio:.2f} of the raw ASGI ceiling "
                        f"(gate {QUICK_GATE})")
    if wall_ratio < QUICK_WALL_FLOOR:
        failures.append(f"accepted records per second at {wall_ratio:.2f} of the raw ASGI ceiling "
                        f"(floor {QUICK_WALL_FLOOR})")
    assert not failures, "; ".join(failures)


def _per_cpu_s(point: harness.PointResult) -> float:
    """Accepted records per CPU-second of the server (0 when it accepted none)."""
    return point.records_per_s * point.seconds / point.server_cpu_s if point.server_cpu_s > 0 else 0.0
