"""In-process pipeline: records/s from TelemetryService.ingest to bytes on disk.

The service is wired exactly as `telemetry-sink serve` wires it (load_config + TelemetryService.from_config:
SegmentWriter + BufferManager + RateLimiter(0, ...)), on uvloop; one round = writer.open(), service.start(),
ingest N records in requests of 1 / 100 / 1000 records (yielding to the loop after each request, as the
HTTP server does; a 503 buffer_full is retried after 1 ms, like a client would), service.stop() (drain,
fsync, close). fsync = never and fsync = batch; writer batch_size 1000, flush_interval_ms 200.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_pipeline.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import harness
import pytest
import uvloop

from telemetry_sink.config import load_config
from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.errors import IngestError
from telemetry_sink.service import TelemetryService

TOTAL_RECORDS = {1: 50_000, 100: 300_000, 1000: 300_000}  # 300k: 3x the buffer bound
_counter = itertools.count()


async def _pipeline(config_path: Path, crypto: CryptoService, body: bytes, requests: int) -> int:
    service = TelemetryService.from_config(load_config(config_path, environ={}), crypto)
    service.writer.open()
    await service.start()
    retries = 0
    for _ in range(requests):
        while True:
            try:
                await service.ingest(body, "json")
                break
            except IngestError as exc:
                if exc.status != 503:
                    raise
                retries += 1
                await asyncio.sleep(0.001)
        await asyncio.sleep(0)
    await service.stop(120)
    return retries


@pytest.mark.parametrize("per_request", [1, 100, 1000])
@pytest.mark.parametrize("fsync", ["never", "batch"])
def test_pipeline(benchmark: Any, tmp_path: Path, fsync: str, per_request: int) -> None:
    key_file = tmp_path / "sink.key"
    write_key_file(key_file)
    crypto = CryptoService.from_key_file(key_file)
    body = harness.json_object_body() if per_request == 1 else harness.json_array_body(per_request)
    total = TOTAL_RECORDS[per_request]
    requests = total // per_request
    dirs: list[Path] = []
    retries: list[int] = []

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        directory = tmp_path / f"data-{next(_counter)}"
        dirs.append(directory)
        config = harness.write_config(tmp_path / f"config-{len(dirs)}.ini", {
            "rate_limit": {"bytes_per_second": 0},
            "writer": {"directory": str(directory), "fsync": fsync},
            "crypto": {"key_file": str(key_file)},
        })
        return (config,), {}

    def run(config: Path) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            retries.append(runner.run(_pipeline(config, crypto, body, requests)))

    benchmark.group = f"pipeline fsync={fsync}"
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    for directory in dirs:
        logged, _ = harness.count_logged(directory, key_file, decrypt_every=997)
        assert logged == total, f"{directory}: {logged} records on disk, expected {total}"
    stats = getattr(benchmark, "stats", None)
    benchmark.extra_info.update(fsync=fsync, records_per_request=per_request, records=total,
                                buffer_full_retries=sum(retries))
    if stats is not None:
        benchmark.extra_info["records_per_s_median"] = total / stats.stats.median
        benchmark.extra_info["records_per_s_max"] = total / stats.stats.min
