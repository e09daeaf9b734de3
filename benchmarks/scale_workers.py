#!/usr/bin/env python3
"""Multi-worker scaling: the product with [server] workers = N for each N given, under the same
wrk load (single records and 100-record arrays), one after the other in one run.

    .venv/bin/python benchmarks/scale_workers.py [--workers 1 2 4 8] [--seconds 15] [--connections 256]
                                                 [--threads 4] [--json OUT.json]

Meant for a many-core machine (the 2-core development box can only show 1 vs 2). Every point
checks afterwards that the log holds exactly the records that got a 202.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--payloads", nargs="+", default=["single", "array100"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--threads", type=int, default=4, help="wrk threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for payload_name in args.payloads:
            body = harness.payload(payload_name)
            for workers in args.workers:
                server = harness.start_product(Path(tmp) / f"{payload_name}-w{workers}",
                                               extra={"server": {"workers": workers}}, name=f"w{workers}")
                try:
                    point, runs = harness.measure(server, body, args.seconds, args.connections, args.threads)
                    server.stop()
                finally:
                    server.close()
                _, verdict = harness.check_log(server, runs, body.records_per_request, args.connections)
                row = {"workers": workers, "payload": payload_name, "rps": point.rps,
                       "records_per_s": point.records_per_s, "p50_ms": point.p50_ms, "p99_ms": point.p99_ms,
                       "server_cpu_util": point.server_cpu_util, "peak_rss_mib": point.peak_rss_mib,
                       "statuses": point.statuses, "log_check": verdict}
                results.append(row)
                print(json.dumps(row), flush=True)
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "results": results}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    failed = [r for r in results if r["log_check"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
