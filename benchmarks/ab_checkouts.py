#!/usr/bin/env python3
"""A/B the product from two checkouts under the same wrk load, alternating A, B, A, B, ...

    .venv/bin/python benchmarks/ab_checkouts.py PATH_A PATH_B [--payload single] [--seconds 5] [--rounds 3]

Each path is a checkout (e.g. `git worktree add /tmp/before <commit>`; copy the compiled
`telemetry_sink/_speedups*.so` into it, or it runs on the twin). Both run with this venv's Python;
the checkout is put first on PYTHONPATH. Prints the best accepted records/s of each (202s only:
req/s would count 503s too) and B/A.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--payload", default="single")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    body = harness.payload(args.payload)
    best: dict[str, float] = {"A": 0.0, "B": 0.0}
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        for n in range(args.rounds):
            for label, path in (("A", args.a), ("B", args.b)):
                server = harness.start_product(Path(tmp) / f"{label}{n}", name=label,
                                               env={"PYTHONPATH": str(path.resolve())})
                try:
                    point, runs = harness.measure(server, body, args.seconds, args.connections)
                    server.stop()
                finally:
                    server.close()
                _, verdict = harness.check_log(server, runs, body.records_per_request, args.connections)
                print(f"{label} round {n}: {point.rps:,.0f} req/s, {point.records_per_s:,.0f} records/s; log {verdict}",
                      flush=True)
                best[label] = max(best[label], point.records_per_s)
    print(f"best accepted records/s: A {best['A']:,.0f}, B {best['B']:,.0f}, B/A = {best['B'] / best['A']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
