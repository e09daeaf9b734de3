"""Segment indexes: written at seal by the real server, used by filtered reads to skip segments that
cannot match (counted), ignored whenever they do not describe their segment as it is now."""

from __future__ import annotations

import signal
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from conftest import ServerProcess, StartServer

from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService
from telemetry_sink.reader import RecordFilter, RecordWalker
from telemetry_sink.segment_format import list_segments
from telemetry_sink.segment_index import index_path, read_index
from telemetry_sink.segment_source import LocalSegment

HOUR = 3600.0
DAY0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z


def post_hours(server: ServerProcess, hours: int, per_hour: int = 60) -> list[dict[str, Any]]:
    """`per_hour` records for each hour of DAY0, from node `hour-H-N`, 10 a request, hour by hour."""
    sent = []
    for h in range(hours):
        for first in range(0, per_hour, 10):
            batch = [{"node_id": f"hour-{h}-{i % 3}", "ts": DAY0 + h * HOUR + i, "h": h, "i": i}
                     for i in range(first, first + 10)]
            assert server.post(orjson.dumps(batch)).status_code == 202
            sent.extend(batch)
    return sent


def walk(data: Path, key_file: Path, keep: RecordFilter) -> tuple[RecordWalker, list[dict[str, Any]]]:
    walker = RecordWalker(CryptoService.from_key_file(key_file), warn=lambda _: None, keep=keep)
    refs = [LocalSegment(p) for p in list_segments(data)]
    out = [orjson.loads(p) for _, kept in walker.walk(refs, final=True) for p in kept]
    return walker, out


@pytest.fixture
def hours_log(start_server: StartServer, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    # Small segments and one request per flush, so each hour's records land in a few segments of their own.
    server = start_server({"writer": {"max_segment_bytes": 6000, "batch_size": 10, "flush_interval_ms": 1},
                           "rate_limit": {"bytes_per_second": 0}})
    sent = post_hours(server, 6)
    server.stop()
    return tmp_path / "data", sent


def test_every_sealed_segment_gets_an_index_that_covers_its_records(hours_log: tuple[Path, list[Any]],
                                                                    key_file: Path) -> None:
    data, _ = hours_log
    segments = list_segments(data)
    assert len(segments) >= 6
    crypto = CryptoService.from_key_file(key_file)
    for path in segments:
        index = read_index(path)
        assert index is not None, f"{path.name} has no index"
        walker = RecordWalker(crypto, warn=lambda _: None)
        records = [orjson.loads(p) for _, kept in walker.walk([LocalSegment(path)], final=True) for p in kept]
        assert index.span.records == len(records) > 0
        assert index.span.ts_min == min(r["ts"] for r in records)
        assert index.span.ts_max == max(r["ts"] for r in records)
        assert index.span.nodes == {r["node_id"] for r in records}
        doc = orjson.loads(index_path(path).read_bytes())
        assert doc["telemetry_sink_segment_index"] == 1 and doc["size"] == path.stat().st_size


def test_a_filtered_read_of_one_hour_opens_only_the_segments_that_overlap_it(
        hours_log: tuple[Path, list[Any]], key_file: Path) -> None:
    data, sent = hours_log
    since, until = DAY0 + 2 * HOUR, DAY0 + 3 * HOUR
    # Which segments hold an hour-2 record, found the long way (decrypting everything).
    crypto = CryptoService.from_key_file(key_file)
    overlapping = 0
    for path in list_segments(data):
        walker = RecordWalker(crypto, warn=lambda _: None)
        records = [orjson.loads(p) for _, kept in walker.walk([LocalSegment(path)], final=True) for p in kept]
        overlapping += any(since <= r["ts"] < until for r in records)
    walker, got = walk(data, key_file, RecordFilter(since=since, until=until))
    assert got == [r for r in sent if since <= r["ts"] < until]
    assert walker.segments_opened == overlapping
    assert walker.segments_skipped == len(list_segments(data)) - overlapping > 0


def test_a_node_filter_skips_segments_without_those_nodes(hours_log: tuple[Path, list[Any]], key_file: Path) -> None:
    data, sent = hours_log
    walker, got = walk(data, key_file, RecordFilter(nodes=["hour-4-*"]))
    assert got == [r for r in sent if r["node_id"].startswith("hour-4-")]
    assert walker.segments_skipped > 0 and walker.segments_opened < len(list_segments(data))


def test_an_index_that_does_not_describe_its_segment_is_ignored(hours_log: tuple[Path, list[Any]],
                                                                key_file: Path) -> None:
    data, _ = hours_log
    segments = list_segments(data)
    index_path(segments[0]).write_bytes(b"{not json")  # damaged
    doc = orjson.loads(index_path(segments[1]).read_bytes())
    doc["size"] += 1  # written for another size of its segment
    index_path(segments[1]).write_bytes(orjson.dumps(doc))
    doc = orjson.loads(index_path(segments[2]).read_bytes())
    doc["telemetry_sink_segment_index"] = 99  # a version this reader does not know
    index_path(segments[2]).write_bytes(orjson.dumps(doc))
    assert all(read_index(p) is None for p in segments[:3])
    far_future = DAY0 + 1000 * HOUR  # no record matches: only the unindexed segments are opened
    walker, got = walk(data, key_file, RecordFilter(since=far_future))
    assert got == [] and walker.segments_opened == 3


def test_a_segment_reopened_after_a_crash_gets_no_index(start_server: StartServer, tmp_path: Path,
                                                        key_file: Path) -> None:
    # What the killed process wrote into the segment is not known to the restarted one: no index
    # is better than one that could hide records.
    overrides = {"writer": {"flush_interval_ms": 1, "fsync": "batch"}, "rate_limit": {"bytes_per_second": 0}}
    first = start_server(overrides)
    post_hours(first, 1, per_hour=20)
    first.signal(signal.SIGKILL)
    first.wait()
    second = start_server(overrides)
    post_hours(second, 1, per_hour=20)
    second.stop()
    [segment] = list_segments(tmp_path / "data")
    assert read_index(segment) is None
    walker, got = walk(tmp_path / "data", key_file, RecordFilter(since=DAY0 + 1000 * HOUR))
    assert walker.segments_opened == 1 and got == []


def test_record_span_twins_agree(speedups_impl: ModuleType) -> None:
    values = [{"node_id": "b", "ts": 5}, {"node_id": "a", "ts": 1.25}, {"node_id": "b", "ts": 9.5}]
    assert speedups_impl.record_span(values) == (1.25, 9.5, {"a", "b"})


async def test_span_of_covers_split_requests_and_refuses_gaps() -> None:
    buffer = BufferManager(1000, 1 << 20)
    buffer.put([b"a"] * 3, 3, span=(10.0, 12.0, {"n1"}))
    buffer.put([b"b"] * 3, 3, span=(1.0, 2.0, {"n2"}))
    first = await buffer.next_batches(4, 0.0, 1)  # 3 of the first request, 1 of the second
    span = buffer.span_of(first)
    assert span is not None and (span.ts_min, span.ts_max, span.nodes, span.records) == (1.0, 12.0, {"n1", "n2"}, 4)
    buffer.stored(first[0])
    rest = await buffer.next_batches(4, 0.0, 1)
    span = buffer.span_of(rest)
    assert span is not None and (span.ts_min, span.ts_max, span.nodes, span.records) == (1.0, 2.0, {"n2"}, 2)
    buffer.stored(rest[0])
    buffer.put([b"c"], 1)  # no span: the batch's segment cannot be indexed
    assert buffer.span_of(await buffer.next_batches(4, 0.0, 1)) is None
