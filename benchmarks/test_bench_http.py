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

import threading
from pathlib import Path
from typing import Any

import harness
import pytest

QUICK_SECONDS = 3.0
QUICK_GATE = 0.5  # single-record POST: product >= 0.5 x the raw ASGI ceiling's requests/s
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
    """Single-record POSTs: product >= 0.5 x the raw ASGI ceiling's requests/s.

    Both servers up at once; 3 s wrk runs alternating raw, product, raw, product after a 1 s warm-up
    each; best of 2 per server. Also checks the product's log against its 202s.
    """
    body = harness.payload("single")
    conns = bench_options["connections"]
    seconds = QUICK_SECONDS
    raw = harness.start_reference("raw", bench_workdir / "quick")
    product = harness.start_product(bench_workdir / "quick", extra=bench_options["server_extra"])
    product_runs: list[harness.WrkResult] = []
    best = {"raw": 0.0, "product": 0.0}
    try:
        for server in (raw, product):
            warm = harness.run_wrk(server.url, body, 1, conns)
            if server is product:
                product_runs.append(warm)
        for _ in range(2):
            for name, server in (("raw", raw), ("product", product)):
                res = harness.run_wrk(server.url, body, seconds, conns)
                if server is product:
                    product_runs.append(res)
                best[name] = max(best[name], res.rps)
        product.stop()
    finally:
        raw.close()
        product.close()
    _, verdict = harness.check_log(product, product_runs, 1, conns)
    ratio = best["product"] / best["raw"]
    print(f"\nsingle-record POST, best of 2 x {seconds:g} s: product {best['product']:,.0f} req/s, raw ASGI "
          f"{best['raw']:,.0f} req/s: {ratio:.2f} of the ceiling (gate {QUICK_GATE}); log {verdict}")
    assert not verdict_failed(verdict), verdict
    assert ratio >= QUICK_GATE, f"product at {ratio:.2f} of the raw ASGI ceiling (gate {QUICK_GATE})"
