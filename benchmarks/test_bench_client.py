"""telemetry_sink.client's throughput: records/s of `Client` and `AsyncClient` on one core sending 100-record
batches to a local server, as ratios against plain httpx loops posting the same batches (orjson-encoded
from the same dicts, one request at a time) in the same run, alternating, best of several rounds.

The client process is pinned to one CPU and the server to the others. Both sides do the same work per batch
(encode 100 dicts, one POST, wait for the 202); the client adds its batching, its sender thread or task,
the Idempotency-Key and the bookkeeping.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_client.py -p no:cacheprovider -s
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCH = 100
BATCHES = 300  # 30,000 records a round
ROUNDS = 5


def _driver(url: str) -> dict[str, float]:
    """Runs in the pinned client process: every variant in turn, ROUNDS times; best records/s of each."""
    import httpx
    import orjson

    sys.path.insert(0, str(Path(__file__).parent))
    import harness

    from telemetry_sink.client import AsyncClient, Client

    batches = [harness.records(BATCH, start=i * BATCH) for i in range(BATCHES)]
    endpoint = url + "/telemetry"
    headers = {"content-type": "application/json"}

    def plain_sync() -> None:
        with httpx.Client() as http:
            for batch in batches:
                assert http.post(endpoint, content=orjson.dumps(batch), headers=headers).status_code == 202

    def plain_async() -> None:
        async def go() -> None:
            async with httpx.AsyncClient() as http:
                for batch in batches:
                    r = await http.post(endpoint, content=orjson.dumps(batch), headers=headers)
                    assert r.status_code == 202

        asyncio.run(go())

    def client_sync() -> None:
        with Client(url, max_batch_records=BATCH) as client:
            for batch in batches:
                client.send_many(batch)
            client.flush()
            assert client.stats.records_sent == BATCH * BATCHES

    def client_async() -> None:
        async def go() -> None:
            async with AsyncClient(url, max_batch_records=BATCH) as client:
                for batch in batches:
                    await client.send_many(batch)
                await client.flush()
                assert client.stats.records_sent == BATCH * BATCHES

        asyncio.run(go())

    variants: dict[str, Callable[[], None]] = {"httpx_sync": plain_sync, "client_sync": client_sync,
                                               "httpx_async": plain_async, "client_async": client_async}
    best = dict.fromkeys(variants, 0.0)
    for _ in range(ROUNDS):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            best[name] = max(best[name], BATCH * BATCHES / (time.perf_counter() - start))
    return best


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def test_client_records_per_second_against_plain_httpx(bench_workdir: Path, benchmark: Any) -> None:
    import harness

    cpus = sorted(os.sched_getaffinity(0))
    server = harness.start_product(bench_workdir / "client-bench", name="client-bench")
    try:
        if len(cpus) > 1:
            _pin(server.pid, set(cpus[:-1]))
        proc = subprocess.run([sys.executable, __file__, server.url, str(cpus[-1])], capture_output=True,
                              text=True, timeout=600, env=harness.clean_env())
        assert proc.returncode == 0, proc.stderr
        best = json.loads(proc.stdout.splitlines()[-1])
    finally:
        server.stop()
    ratios = {"sync": best["client_sync"] / best["httpx_sync"], "async": best["client_async"] / best["httpx_async"],
              "async_vs_httpx_sync": best["client_async"] / best["httpx_sync"]}
    benchmark.extra_info.update({f"{k}_records_per_s": round(v) for k, v in best.items()})
    benchmark.extra_info.update({f"ratio_{k}": round(v, 3) for k, v in ratios.items()})
    print("\nclient on one core, 100-record batches, best of", ROUNDS, "rounds of", BATCH * BATCHES, "records:")
    for name, value in best.items():
        print(f"  {name:13s} {value:10,.0f} records/s")
    print(f"  Client / plain httpx.Client loop: {ratios['sync']:.2f}; AsyncClient / plain httpx.AsyncClient "
          f"loop: {ratios['async']:.2f}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # Generous floor (a noisy shared machine): the client's batching must not cost more than a third.
    assert ratios["sync"] > 0.67 and ratios["async"] > 0.67, ratios


if __name__ == "__main__":
    os.sched_setaffinity(0, {int(sys.argv[2])})
    print(json.dumps(_driver(sys.argv[1])))
