"""The lean ingest route, measured: POST /telemetry through IngestFastPath (raw ASGI, what the
server runs) against the same request through FastAPI's router and request machinery (the
documented route, which delegates to the same handler), in process, same run.

Run:  .venv/bin/python -m pytest benchmarks/test_bench_route.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import pytest

from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.http_server import IngestFastPath, create_app
from telemetry_sink.rate_limiter import RateLimiter
from telemetry_sink.segment_writer import SegmentWriter
from telemetry_sink.service import TelemetryService

REQUESTS = 2000


@pytest.fixture
def app(tmp_path: Path) -> Iterator[IngestFastPath]:
    crypto = CryptoService([generate_key().decode()], "bench")
    writer = SegmentWriter(tmp_path, crypto, batch_size=1000, flush_interval_ms=1000, fsync="never",
                       fsync_interval_ms=1000, max_segment_bytes=1 << 30)
    writer.open()
    # The writer task is not started: records pile up in a large buffer, emptied between rounds.
    service = TelemetryService(RateLimiter(0, 1), BufferManager(10**7, 1 << 34), writer)
    built = create_app(service, 1 << 20)
    assert isinstance(built, IngestFastPath)
    yield built
    writer.close()


def _drive(asgi: Any, buffer: BufferManager, body: bytes) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/telemetry", "raw_path": b"/telemetry", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            statuses.append(event["status"])

    async def run() -> None:
        for _ in range(REQUESTS):
            await asgi(dict(scope), receive, send)

    asyncio.run(run())
    assert statuses == [202] * REQUESTS, statuses[:3]
    buffer._queue.clear()
    buffer.records = buffer.bytes = 0


@pytest.mark.parametrize("route", ["fast-path", "fastapi-router"])
def test_ingest_route_cost(benchmark: Any, app: IngestFastPath, route: str) -> None:
    asgi = app if route == "fast-path" else app.api
    body = harness.json_object_body()
    buffer = app.handler.service.buffer
    benchmark.group = "ingest route, single record"
    benchmark.pedantic(_drive, args=(asgi, buffer, body), rounds=5, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        # Per request, in the column run_all.py shows per record (one record a request here).
        benchmark.extra_info["us_per_record_median"] = stats.stats.median / REQUESTS * 1e6
        print(f"\n{route}: {stats.stats.median / REQUESTS * 1e6:.1f} us/request (median of 5 x {REQUESTS})")
