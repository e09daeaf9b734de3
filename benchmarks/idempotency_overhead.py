#!/usr/bin/env python3
"""Server cost of `Idempotency-Key`: one server, the same wrk load without a key and with a fresh key
on every request (lua/post_keyed.lua for both, so wrk does the same work), alternating plain, keyed,
plain, keyed, ... in the same run.

    .venv/bin/python benchmarks/idempotency_overhead.py [--payload single array100] [--ack buffered|durable]
        [--seconds 5] [--rounds 3] [--connections 32] [--array-connections 4] [--array-rate-bytes 8388608]

Prints, per payload, the server's CPU microseconds per accepted request in each mode (median of the
rounds: CPU per request, not req/s, so that other load on the machine matters less) and keyed/plain,
checks that the log holds exactly the accepted records (a replay would store nothing and show as a
shortfall), then restarts the server on its log and reports the start-up key recovery (its log line).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from telemetry_sink.testing import ServerProcess

KEYED_LUA = harness.BENCH_DIR / "lua" / "post_keyed.lua"
_RECOVERED = re.compile(r"idempotency: (\d+) keys of the last \d+s recovered from the log in ([\d.]+)s")


def cpu_us_per_request(server: harness.Server, body: harness.Payload, seconds: float, connections: int,
                       keyed: bool) -> tuple[float, int, int]:
    """(server CPU microseconds per accepted request, accepted requests, 503s) of one wrk run. A 503
    (buffer full: the writer is behind) is refused before the key is looked at, the same in both modes."""
    cpu0 = harness.cpu_seconds(server.pid)
    res = harness.run_wrk(server.url, body, seconds, connections, script=KEYED_LUA,
                          script_args=(uuid.uuid4().hex if keyed else "-",))
    cpu1 = harness.cpu_seconds(server.pid)
    if set(res.refused) - {"503"} or any(v for k, v in res.errors.items() if k != "status"):
        raise RuntimeError(f"unexpected answers or errors: {res.statuses} {res.errors}")
    return (cpu1 - cpu0) * 1e6 / max(1, res.accepted), res.accepted, res.refused.get("503", 0)


def recovery(config: Path, workdir: Path) -> tuple[int, float, float]:
    """Restart on the same log: (keys recovered, seconds the scan took, seconds until /healthz answered)."""
    started = time.monotonic()
    server = ServerProcess.serve(config, workdir / "restart.log", args=("--log-level", "info"))
    try:
        server.wait_ready()
        ready_s = time.monotonic() - started
        found = _RECOVERED.search(server.log())
        server.stop()
    finally:
        server.close()
    if found is None:
        raise RuntimeError("no key recovery line in the restart log")
    return int(found.group(1)), float(found.group(2)), ready_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payload", nargs="+", default=["single", "array100"])
    parser.add_argument("--ack", choices=("buffered", "durable"), default="buffered",
                        help="durable: each request waits for its batch, so arrays do not overrun the writer")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32, help="for single-record bodies")
    parser.add_argument("--array-connections", type=int, default=4, help="for array bodies")
    parser.add_argument("--array-rate-bytes", type=int, default=8 << 20,
                        help="pace array bodies to this many bytes/s (0: unpaced; then the writer is the limit "
                             "and buffer-full 503s blur the figure)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
        for name in args.payload:
            body = harness.payload(name)
            workdir = Path(tmp) / name
            connections = args.connections if body.records_per_request == 1 else args.array_connections
            extra: harness.ConfigValues = {"ingest": {"ack": args.ack}}
            if body.records_per_request > 1 and args.array_rate_bytes:
                # Arrays outrun the writer: pace them with the server's own delay-mode limiter, below what it
                # writes, so both modes are measured at the same offered load instead of among buffer-full 503s.
                extra["rate_limit"] = {"bytes_per_second": args.array_rate_bytes, "burst_bytes": 1 << 20,
                                       "mode": "delay", "max_delay_ms": 10_000}
            server = harness.start_product(workdir, name=name, extra=extra)
            costs: dict[bool, list[float]] = {False: [], True: []}
            accepted = runs = refused = 0
            try:
                for keyed in (False, True):  # warm-up, both modes
                    _, n, r = cpu_us_per_request(server, body, 1.0, connections, keyed)
                    accepted, runs, refused = accepted + n, runs + 1, refused + r
                for _ in range(args.rounds):
                    for keyed in (False, True):
                        us, n, r = cpu_us_per_request(server, body, args.seconds, connections, keyed)
                        costs[keyed].append(us)
                        accepted, runs, refused = accepted + n, runs + 1, refused + r
                server.stop()
            finally:
                server.close()
            assert server.data_dir is not None and server.key_file is not None and server.config_path is not None
            logged, _ = harness.count_logged(server.data_dir, server.key_file, decrypt_every=1000)
            plain, keyed_us = statistics.median(costs[False]), statistics.median(costs[True])
            paced = f", paced to {args.array_rate_bytes:,} B/s" if "rate_limit" in extra else ""
            print(f"{name}: server CPU per accepted request: plain {plain:.1f} us, keyed {keyed_us:.1f} us, "
                  f"keyed/plain = {keyed_us / plain:.3f} (median of {args.rounds} rounds of {args.seconds:g} s, "
                  f"{connections} connections, ack {args.ack}{paced}; {refused} buffer-full 503s)", flush=True)
            keys, scan_s, ready_s = recovery(server.config_path, workdir)
            print(f"{name}: log holds {logged:,} records; restart recovered {keys:,} keys in {scan_s:.2f} s "
                  f"(ready after {ready_s:.2f} s)", flush=True)
            # wrk stops without waiting for the requests in flight: the server may store up to one more per connection
            slack = runs * connections
            if not accepted * body.records_per_request <= logged <= (accepted + slack) * body.records_per_request:
                raise RuntimeError(f"the log holds {logged} records; {accepted} requests were accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
