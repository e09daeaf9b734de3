#!/usr/bin/env python3
"""The product (fast lane on, with 1 and 2 workers, and off) against Fluent Bit 5.1.1 and the bare ASGI
app, same run.

    .venv/bin/python benchmarks/fast_lane_vs_peers.py [--rounds 2] [--seconds 5] [--out benchmarks/results]

Servers are alternated within each round (one at a time, 64 wrk connections, 1 s warm-up); each
figure is the median over the rounds. Single ~150 B records: req/s. 100-record arrays: accepted
records/s (202, or Fluent Bit's 201) and the share of 503s; after each run the server is stopped
and the records on disk are compared with the acknowledgements. Also the idle RSS (after start-up
before any request) and the peak RSS under load. Writes `<date>-fast-lane.json`, `.md` and `.png`
(matplotlib, from the `bench` extra; skipped without it). The machine is shared: only the ratios
within one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

# fast-2w: the fast lane with `[server] workers = 2` (one per core of the 2-core machine).
KINDS = ("fluentbit", "fast", "fast-2w", "asgi", "raw")
PAYLOADS = {"single": KINDS, "array100": ("fluentbit", "fast", "fast-2w", "asgi")}


def start(kind: str, workdir: Path) -> harness.Server:
    if kind == "fluentbit":
        return harness.start_fluent_bit(workdir)
    if kind == "raw":
        return harness.start_reference("raw", workdir)
    server = {"fast_lane": "off" if kind == "asgi" else "on", "workers": 2 if kind == "fast-2w" else 1}
    return harness.start_product(workdir, name=kind, extra={"server": server})


def one_point(kind: str, body: harness.Payload, seconds: float, workdir: Path) -> dict[str, Any]:
    server = start(kind, workdir)
    try:
        time.sleep(0.5)
        idle = harness.rss_mib(server.pid)  # after start-up, before any request
        point, runs = harness.measure(server, body, seconds)
        server.stop()
    finally:
        server.close()
    _, verdict = harness.check_log(server, runs, body.records_per_request, point.connections)
    total = sum(point.statuses.values()) or 1
    return {"kind": kind, "payload": body.name, "rps": point.rps, "records_per_s": point.records_per_s,
            "share_503": point.statuses.get("503", 0) / total, "p99_ms": point.p99_ms, "idle_rss_mib": idle,
            "peak_rss_mib": point.peak_rss_mib, "cpu_util": point.server_cpu_util, "statuses": point.statuses,
            "log_check": verdict}


def summarise(points: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for payload, kinds in PAYLOADS.items():
        out[payload] = {}
        for kind in kinds:
            mine = [p for p in points if p["payload"] == payload and p["kind"] == kind]
            out[payload][kind] = {k: statistics.median(p[k] for p in mine)
                                  for k in ("rps", "records_per_s", "share_503", "p99_ms", "idle_rss_mib",
                                            "peak_rss_mib")}
    return out


def report(summary: dict[str, dict[str, dict[str, float]]], rounds: int, seconds: float) -> str:
    lines = [f"# Fast lane vs Fluent Bit 5.1.1 and bare ASGI ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"Medians of {rounds} rounds, servers alternated, wrk 64 connections {seconds:g} s each; "
             "shared 2-core machine: only same-run ratios count.", "",
             "| payload | server | req/s | records/s | vs Fluent Bit | 503s | p99 ms | idle RSS MiB | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for payload, kinds in summary.items():
        fb = kinds["fluentbit"]["records_per_s"] or 1.0
        for kind, m in kinds.items():
            lines.append(f"| {payload} | {kind} | {m['rps']:,.0f} | {m['records_per_s']:,.0f} | "
                         f"{m['records_per_s'] / fb:.2f} | {m['share_503']:.1%} | {m['p99_ms']:.1f} | "
                         f"{m['idle_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} |")
    single = summary["single"]
    lines += ["", f"single: fast lane / raw ASGI = {single['fast']['rps'] / single['raw']['rps']:.2f}, "
              f"fast lane / ASGI lane = {single['fast']['rps'] / single['asgi']['rps']:.2f}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (payload, kinds) in zip(axes, summary.items(), strict=True):
        names = list(kinds)
        values = [kinds[k]["records_per_s"] for k in names]
        ax.bar(names, values, color=["#888888" if k == "fluentbit" else "#3070b0" for k in names])
        ax.set_title(f"{payload}: accepted {'req' if payload == 'single' else 'records'}/s")
        ax.ticklabel_format(axis="y", style="plain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=harness.BENCH_DIR / "results")
    args = parser.parse_args()
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastlane-") as tmp:
        for n in range(args.rounds):
            for payload, kinds in PAYLOADS.items():
                body = harness.payload(payload)
                for kind in kinds:
                    point = one_point(kind, body, args.seconds, Path(tmp) / f"{kind}-{payload}-{n}")
                    points.append(point)
                    print(f"round {n} {payload} {kind}: {point['rps']:,.0f} req/s, {point['records_per_s']:,.0f} "
                          f"records/s, 503s {point['share_503']:.1%}, log {point['log_check']}", flush=True)
    summary = summarise(points)
    stem = args.out / f"{time.strftime('%Y-%m-%d', time.gmtime())}-fast-lane"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"points": points, "summary": summary}, indent=1))
    text = report(summary, args.rounds, args.seconds)
    stem.with_suffix(".md").write_text(text)
    plot(summary, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
