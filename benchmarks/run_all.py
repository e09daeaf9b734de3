#!/usr/bin/env python3
"""Run the whole benchmark suite once and record it.

    .venv/bin/python benchmarks/run_all.py [--e2e-seconds 10] [--overload-seconds 60]
                                           [--server-extra server.workers=2] [--no-docs] [-- PYTEST ARGS]

Runs `pytest benchmarks -m "not quick"` (micro, framing, pipeline, end to end, overload, profile) with
--benchmark-json, then writes benchmarks/results/<date>-<host>.json (machine, settings, every figure,
the targets) and a markdown table, which also replaces the part of docs/BENCHMARKS.md between the
BENCH:BEGIN / BENCH:END markers. Exit status: pytest's (a failed log check fails it), or 3 with
--strict when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"

TARGET_CEILING = 0.70
TARGET_NAIVE = 5.0
TARGET_RECORDS = 150_000
TARGET_RSS_MIB = 150.0
MAX_RECORDS_DEFAULT = 100_000


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = subprocess.run([sys.executable, "-m", "telemetry_sink", "info"], capture_output=True, text=True,
                          env=harness.clean_env(), cwd=ROOT)
    fields = dict(line.split(": ", 1) for line in info.stdout.splitlines() if ": " in line)
    wrk = harness.ensure_wrk()
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()[0] if wrk else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT)
    return {
        "host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "openssl": fields.get("openssl"),
        "implementation": fields.get("implementation"), "telemetry_sink": fields.get("version"),
        "wrk": wrk_version, "git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip()),
    }


def run_pytest(args: argparse.Namespace, json_path: Path, log_path: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "not quick", "-p", "no:cacheprovider", "-s",
           "--benchmark-json", str(json_path), "--e2e-seconds", str(args.e2e_seconds),
           "--overload-seconds", str(args.overload_seconds), "--connections", str(args.connections),
           *[f"--server-extra={x}" for x in args.server_extra], *args.pytest_args]
    print("running:", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)
        return proc.wait()


def collect(bench: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"micro": [], "framing": [], "pipeline": [], "e2e": [], "overload": None, "profile": []}
    for b in bench.get("benchmarks", []):
        name, extra, stats = b["name"], b.get("extra_info", {}), b.get("stats", {})
        path = b.get("fullname", "")
        if "test_bench_micro" in path or "test_bench_route" in path:
            out["micro"].append({"name": name, "group": b.get("group"), "median_s": stats.get("median"), **extra})
        elif "test_bench_speedups" in path:
            out["framing"].append({"name": name, "group": b.get("group"), "median_s": stats.get("median"),
                                   **extra})
        elif "test_bench_pipeline" in path:
            out["pipeline"].append({"name": name, "median_s": stats.get("median"), **extra})
        elif "test_overload" in name:
            out["overload"] = extra
        elif "test_profile" in name:
            out["profile"].append(extra)
        elif "test_e2e" in name:
            out["e2e"].append(extra)
    return out


def _point(e2e: list[dict[str, Any]], payload: str, server: str) -> dict[str, Any] | None:
    return next((p for p in e2e if p.get("payload") == payload and p.get("server") == server), None)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    e2e = res["e2e"]
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, goal: float, unit: str, detail: str, below: bool = False) -> None:
        if measured is None:
            out.append({"target": name, "measured": None, "goal": goal, "met": None, "detail": "not measured"})
            return
        met = measured < goal if below else measured >= goal
        miss = "" if met else f"; missed by {abs(measured - goal) / goal:.0%}"
        out.append({"target": name, "measured": round(measured, 3), "goal": goal, "unit": unit, "met": met,
                    "cmp": "<" if below else ">=",
                    "detail": detail + miss})

    prod, raw = _point(e2e, "single", "product"), _point(e2e, "single", "raw")
    add("single-record POST vs raw ASGI ceiling (req/s)",
        prod["rps"] / raw["rps"] if prod and raw else None, TARGET_CEILING, "x",
        f"{prod['rps']:,.0f} vs {raw['rps']:,.0f} req/s" if prod and raw else "")
    prod, naive = _point(e2e, "array100", "product"), _point(e2e, "array100", "naive")
    add("100-record arrays vs naive FastAPI (records/s)",
        prod["records_per_s"] / naive["records_per_s"] if prod and naive and naive["records_per_s"] else None,
        TARGET_NAIVE, "x",
        f"{prod['records_per_s']:,.0f} vs {naive['records_per_s']:,.0f} records/s" if prod and naive else "")
    add("100-record arrays, one process, compiled (records/s)", prod["records_per_s"] if prod else None,
        TARGET_RECORDS, "records/s", f"implementation {res['machine'].get('implementation')}")
    ov = res.get("overload")
    if ov:
        add(f"peak RSS under {ov['seconds']:.0f} s of overload, default config (MiB)", ov["peak_rss_mib"],
            TARGET_RSS_MIB, "MiB", f"statuses {ov['statuses']}", below=True)
        mb = ov.get("max_buffer_records")
        out.append({"target": "buffer never past max_records (100000) under overload", "measured": mb,
                    "goal": MAX_RECORDS_DEFAULT, "unit": "records", "cmp": "<=",
                    "met": mb is not None and mb <= MAX_RECORDS_DEFAULT,
                    "detail": f"max of {ov.get('buffer_samples')} /healthz samples; log {ov['log_check'][:2]}"})
    return out


def _f(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        f"Run {res['date']} on `{m['host']}`: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python "
        f"{m['python']}, {m['openssl']}, speedups **{m['implementation']}**, {m['wrk']}, commit "
        f"{m['git_commit']}{' (dirty tree)' if m['git_dirty'] else ''}. wrk: {s['connections']} connections, 1 "
        f"thread, {s['e2e_seconds']:g} s per point after 1 s of warm-up; overload {s['overload_seconds']:g} s; "
        f"server extra config: {s['server_extra'] or 'none'}. Suite wall time {res['wall_s']:.0f} s.",
        "",
        "**Targets** (ratios measured in the same run):",
        "",
        "| target | goal | measured | met | detail |",
        "|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        met = {True: "yes", False: "**NO**", None: "-"}[t["met"]]
        unit = "x" if t.get("unit") == "x" else " " + t.get("unit", "")
        goal = f"{t.get('cmp', '>=')} {t['goal']:,}{unit}"
        lines.append(f"| {t['target']} | {goal} | {_f(t['measured'], 2)} | {met} | {t['detail']} |")
    lines += ["", "**End to end** (HTTP on loopback, one server process each):", "",
              "| payload | server | req/s | records/s | p50 ms | p99 ms | server CPU s | CPU µs/record | "
              "peak RSS MiB | answers | log check |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in res["e2e"]:
        per_rec = (p["server_cpu_s"] / (p["records_per_s"] * p["seconds"]) * 1e6) if p["records_per_s"] else None
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(p["statuses"].items()))
        check = p["log_check"].split(":")[0] if p["log_check"] else ""
        lines.append(f"| {p['payload']} | {p['server']} | {_f(p['rps'])} | {_f(p['records_per_s'])} | "
                     f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['server_cpu_s']:.2f} | {_f(per_rec, 2)} | "
                     f"{p['peak_rss_mib']:.0f} | {answers} | {check} |")
    ov = res.get("overload")
    if ov:
        lines += ["", f"**Overload** (config.ini defaults, 1000-record arrays of {ov['body_bytes']:,} B, "
                  f"{ov['connections']} connections, {ov['seconds']:.0f} s): offered {ov['offered_mib_per_s']:,.0f} "
                  f"MiB/s, accepted {ov['accepted_mib_per_s']:,.1f} MiB/s = {ov['records_per_s']:,.0f} records/s; "
                  f"answers {ov['statuses']}; p99 {ov['p99_ms']:.0f} ms; peak RSS **{ov['peak_rss_mib']:.0f} MiB**; "
                  f"max buffer_records {ov['max_buffer_records']}; log {ov['log_check']}."]
    lines += ["", "**In-process pipeline** (`TelemetryService.ingest` → bytes on disk, incl. start/drain/close; "
              "median of 3 rounds):", "", "| fsync | records/request | records | records/s (median) | "
              "records/s (best) |", "|---|---:|---:|---:|---:|"]
    for p in res["pipeline"]:
        lines.append(f"| {p.get('fsync')} | {p.get('records_per_request')} | {_f(p.get('records'))} | "
                     f"{_f(p.get('records_per_s_median'))} | {_f(p.get('records_per_s_max'))} |")
    lines += ["", "**Micro** (median):", "", "| benchmark | µs/call | µs/record |", "|---|---:|---:|"]
    for p in res["micro"] + [f for f in res["framing"] if f.get("records_per_batch") in (1000, None)]:
        per = p.get("us_per_record_median")
        lines.append(f"| {p['name']} | {_f((p.get('median_s') or 0) * 1e6, 2)} | {_f(per, 3)} |")
    for prof in res["profile"]:
        if "self" not in prof:
            continue
        lines += ["", f"**py-spy, product under `{prof['payload']}` load** ({prof['seconds']:g} s at 100 Hz, "
                  f"{prof.get('rps_while_profiled', 0):,.0f} req/s while sampled; % of samples, all threads):", "",
                  "| self % | function (self time) | | incl. % | function (inclusive) |", "|---:|---|---|---:|---|"]
        for (sname, spct), (iname, ipct) in zip(prof["self"][:12], prof["inclusive"][:12], strict=False):
            lines.append(f"| {spct} | `{sname}` | | {ipct} | `{iname}` |")
    return "\n".join(lines) + "\n"


def update_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e-seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server-extra", action="append", default=[],
                        help="extra product config section.key=value (e.g. server.workers=2)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--render", metavar="RESULTS_JSON", type=Path,
                        help="run nothing: re-render the table (and docs, unless --no-docs) from a results file")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    if args.render:
        res = json.loads(args.render.read_text())
        res["targets"] = targets(res)
        args.render.write_text(json.dumps(res, indent=1) + "\n")
        table = markdown(res)
        args.render.with_suffix(".md").write_text(table)
        if not args.no_docs:
            update_doc(table)
        print(table)
        return 0
    if harness.ensure_wrk() is None:
        print("run_all: wrk is missing and could not be installed", file=sys.stderr)
        return 2
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        json_path, log_path = Path(tmp) / "bench.json", Path(tmp) / "pytest.log"
        rc = run_pytest(args, json_path, log_path)
        bench = json.loads(json_path.read_text()) if json_path.exists() else {}
    res: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": info, "pytest_exit": rc,
        "settings": {"e2e_seconds": args.e2e_seconds, "overload_seconds": args.overload_seconds,
                     "connections": args.connections, "server_extra": args.server_extra},
        **collect(bench),
    }
    res["wall_s"] = time.monotonic() - started
    res["targets"] = targets(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{now:%Y-%m-%d}-{info['host']}.json"
    out.write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")
    table = markdown(res)
    out.with_suffix(".md").write_text(table)
    if not args.no_docs:
        update_doc(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}" + ("" if args.no_docs else f" and {DOC}"))
    print(table)
    missed = [t for t in res["targets"] if t["met"] is False]
    if rc != 0:
        return rc
    return 3 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
