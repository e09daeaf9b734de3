"""TelemetryService: parsing, validation (all or nothing), rate limit and buffer outcomes."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import orjson
import pytest

from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.errors import IngestError
from telemetry_sink.ingest_http import retry_after_header
from telemetry_sink.rate_limiter import RateLimiter
from telemetry_sink.records import encode_body, encode_records, parse_body
from telemetry_sink.segment_writer import SegmentWriter
from telemetry_sink.service import SLICE_BODY_BYTES, WHOLE_PASS_BODY_BYTES, TelemetryService

NOW = 1_800_000_000.5


def make_service(tmp_path: Path, *, limiter: RateLimiter | None = None, max_records: int = 1000,
                 max_bytes: int = 1 << 20) -> TelemetryService:
    crypto = CryptoService([generate_key().decode()], "test")
    writer = SegmentWriter(tmp_path, crypto, batch_size=10, flush_interval_ms=10, fsync="never", fsync_interval_ms=1000,
                       max_segment_bytes=1 << 20)
    writer.open()
    return TelemetryService(limiter or RateLimiter(0, 1), BufferManager(max_records, max_bytes), writer,
                            wall_clock=lambda: NOW)


@pytest.mark.parametrize(
    ("body", "fmt", "expected"),
    [
        pytest.param(b'{"node_id":"a"}', "json", [{"node_id": "a"}], id="object"),
        pytest.param(b'[{"node_id":"a"},{"node_id":"b"}]', "json", [{"node_id": "a"}, {"node_id": "b"}], id="array"),
        pytest.param(b'{"node_id":"a"}\n\n{"node_id":"b"}\r\n', "ndjson", [{"node_id": "a"}, {"node_id": "b"}],
                     id="ndjson-blank-lines"),
    ],
)
def test_parse_body(body: bytes, fmt: str, expected: list[object]) -> None:
    assert parse_body(body, fmt) == expected


@pytest.mark.parametrize(
    ("body", "fmt", "status", "error", "index", "detail"),
    [
        pytest.param(b"{", "json", 400, "invalid_json", None, "", id="truncated"),
        pytest.param(b"\xff\xfe", "json", 400, "invalid_json", None, "", id="not-utf8"),
        pytest.param(b"[]", "json", 422, "invalid_record", 0, "no records", id="empty-array"),
        pytest.param(b"", "ndjson", 422, "invalid_record", 0, "no records", id="empty-ndjson"),
        pytest.param(b'"x"', "json", 422, "invalid_record", 0, "not a string", id="scalar"),
        pytest.param(b'{"node_id":"a"}\n{oops\n', "ndjson", 400, "invalid_json", None, "line 2", id="ndjson-bad-line"),
    ],
)
def test_parse_errors(body: bytes, fmt: str, status: int, error: str, index: int | None, detail: str) -> None:
    with pytest.raises(IngestError) as info:
        parse_body(body, fmt)
    assert (info.value.status, info.value.error, info.value.index) == (status, error, index)
    assert detail in info.value.detail


@pytest.mark.parametrize(
    ("record", "detail"),
    [
        pytest.param({}, "node_id is missing", id="missing"),
        pytest.param({"node_id": None}, "node_id must be a string, not null", id="null"),
        pytest.param({"node_id": 5}, "node_id must be a string, not a number", id="number"),
        pytest.param({"node_id": ""}, "1 to 128 characters, not 0", id="empty"),
        pytest.param({"node_id": "é" * 129}, "1 to 128 characters, not 129", id="too-long"),
        pytest.param({"node_id": "a", "ts": "now"}, "ts must be a number", id="ts-string"),
        pytest.param({"node_id": "a", "ts": True}, "ts must be a number (Unix seconds), not a boolean", id="ts-bool"),
        pytest.param({"node_id": "a", "ts": None}, "not null", id="ts-null"),
        pytest.param([1], "a record must be a JSON object, not an array", id="array-record"),
    ],
)
def test_invalid_records_name_the_first_bad_index(record: object, detail: str) -> None:
    values = [{"node_id": "ok"}, record, {"bad": "too"}]
    with pytest.raises(IngestError) as info:
        encode_records(values, NOW)
    assert (info.value.status, info.value.error, info.value.index) == (422, "invalid_record", 1)
    assert detail in info.value.detail


def test_encode_adds_ts_when_absent_and_keeps_it_otherwise() -> None:
    plaintexts, nbytes = encode_records([{"node_id": "a", "x": [1, {"y": "ü"}]}, {"node_id": "b", "ts": 7}], NOW)
    assert [orjson.loads(p) for p in plaintexts] == [{"node_id": "a", "x": [1, {"y": "ü"}], "ts": NOW},
                                                     {"node_id": "b", "ts": 7}]
    assert plaintexts[1] == orjson.dumps({"node_id": "b", "ts": 7})
    assert nbytes == sum(map(len, plaintexts))
    assert encode_records([{"node_id": "x" * 128}], NOW)[0]  # the longest allowed node_id


async def test_ingest_is_all_or_nothing(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    with pytest.raises(IngestError):
        await service.ingest(b'[{"node_id":"a"},{"node_id":""}]', "json")
    assert service.buffer.records == 0
    assert await service.ingest(b'[{"node_id":"a"},{"node_id":"b"}]', "json") == 2
    assert service.buffer.records == 2


async def test_ingest_rate_limited_429_with_retry_after(tmp_path: Path) -> None:
    now = [0.0]
    service = make_service(tmp_path, limiter=RateLimiter(10, 20, "reject", clock=lambda: now[0]))
    body = b'{"node_id":"abc"}'  # 17 bytes
    assert await service.ingest(body, "json") == 1
    with pytest.raises(IngestError) as info:
        await service.ingest(body, "json")
    assert (info.value.status, info.value.error) == (429, "rate_limited")
    assert retry_after_header(info.value.retry_after_s or 0) == b"2"


async def test_ingest_buffer_full_503(tmp_path: Path) -> None:
    service = make_service(tmp_path, max_records=3)
    await service.ingest(b'[{"node_id":"a"},{"node_id":"b"}]', "json")
    with pytest.raises(IngestError) as info:
        await service.ingest(b'[{"node_id":"a"},{"node_id":"b"}]', "json")
    assert (info.value.status, info.value.error, info.value.retry_after_s) == (503, "buffer_full", 1.0)


async def test_a_full_buffer_refuses_before_parsing(tmp_path: Path) -> None:
    service = make_service(tmp_path, max_records=2)
    await service.ingest(b'[{"node_id":"a"},{"node_id":"b"}]', "json")
    with pytest.raises(IngestError) as info:  # not 400: the body is never parsed
        await service.ingest(b"{not json", "json")
    assert (info.value.status, info.value.error) == (503, "buffer_full")


def large_body(records: int, *, canonical: bool) -> bytes:
    """A JSON array over SLICE_BODY_BYTES; not canonical: an escape in every record, so that the
    compiled one-pass reader declines it and it is parsed in slices."""
    note = "plain" if canonical else 'say "hi"'
    body = orjson.dumps([{"node_id": f"n{i}", "v": i, "note": note, "pad": "x" * 80} for i in range(records)])
    assert len(body) > SLICE_BODY_BYTES
    return body


async def test_a_canonical_large_body_is_taken_whole_with_the_same_plaintexts(tmp_path: Path) -> None:
    body = large_body(1000, canonical=True)
    assert len(body) <= WHOLE_PASS_BODY_BYTES and encode_body(body, "json", NOW) is not None
    service = make_service(tmp_path, max_records=5000)
    assert await service.ingest(body, "json") == 1000
    assert await service.buffer.next_batches(5000, 0.0, 1) == [encode_records(parse_body(body, "json"), NOW)[0]]


async def test_a_sliced_body_that_waited_its_turn_is_refused_unparsed_when_the_buffer_filled(tmp_path: Path) -> None:
    first = large_body(1000, canonical=False)
    service = make_service(tmp_path, max_records=1000)
    garbage = b"{not json" + b" " * SLICE_BODY_BYTES  # a 400 if it were parsed
    results = await asyncio.gather(service.ingest(first, "json"), service.ingest(garbage, "json"),
                                   return_exceptions=True)
    assert results[0] == 1000
    assert isinstance(results[1], IngestError) and (results[1].status, results[1].error) == (503, "buffer_full")


async def test_sliced_bodies_take_turns_so_one_parse_is_held_at_a_time(tmp_path: Path) -> None:
    """Interleaved, every connection's half-parsed body would be held at once: with 16 at a time the
    transient memory (peak minus what the buffer keeps) measured 3.3x one body's without the turns
    (the encoder's scratch space, the same either way, is most of one body's)."""
    bodies = [large_body(700, canonical=False) for _ in range(17)]

    async def transient(ingests: list[bytes]) -> int:
        service = make_service(tmp_path / str(len(ingests)), max_records=20_000, max_bytes=1 << 24)
        tracemalloc.start()
        try:
            await asyncio.gather(*(service.ingest(body, "json") for body in ingests))
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert service.buffer.records == 700 * len(ingests)
        return peak - current

    one = await transient(bodies[:1])
    sixteen = await transient(bodies[1:])
    assert sixteen < 1.5 * one, (one, sixteen)


def test_encoded_records_hold_no_oversized_allocation() -> None:
    """orjson.dumps results keep ~4 KiB each; stored plaintexts must be exact-size copies."""
    values = [{"node_id": f"n{i}", "v": i, "pad": "x" * 100} for i in range(20_000)]
    tracemalloc.start()
    try:
        plaintexts, nbytes = encode_records(values, NOW)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert nbytes == sum(map(len, plaintexts))
    assert held < 3 * nbytes  # ~80 MB without the copy, ~4 MB with it


async def test_start_stop_drains_everything_and_refuses_after(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    await service.start()
    assert service.writer_alive
    for i in range(25):
        await service.ingest(orjson.dumps({"node_id": "n", "i": i}), "json")
    service.begin_shutdown()
    with pytest.raises(IngestError) as info:
        await service.ingest(b'{"node_id":"late"}', "json")
    assert (info.value.status, info.value.error) == (503, "shutting_down")
    await asyncio.wait_for(service.stop(10), 20)
    assert service.writer.stats.records == 25 and service.buffer.records == 0
    assert not service.writer_alive
