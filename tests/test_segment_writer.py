"""SegmentWriter on real files: batches, sequence numbers, roll-over, fsync policy, torn-tail
recovery, series locks, and write failures (injected) that lose nothing."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from telemetry_sink import segment_format, segment_writer
from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.metrics import WriterMetrics
from telemetry_sink.segment_writer import SegmentWriter, WriterLockedError


@pytest.fixture
def crypto() -> CryptoService:
    return CryptoService([generate_key().decode()], "test")


def make_writer(directory: Path, crypto: CryptoService, **kw: Any) -> SegmentWriter:
    options: dict[str, Any] = dict(batch_size=10, flush_interval_ms=20, fsync="never", fsync_interval_ms=1000,
                                   max_segment_bytes=1 << 20)
    options.update(kw)
    return SegmentWriter(directory, crypto, **options)


def read_all(directory: Path, crypto: CryptoService) -> list[tuple[int, bytes]]:
    """(sequence number, plaintext) of every record, in file order; asserts no damage."""
    out: list[tuple[int, bytes]] = []
    for path in segment_format.list_segments(directory):
        with segment_format.SegmentImage(path) as seg:
            for item in seg.batches():
                assert isinstance(item, segment_format.Batch), f"{path}: {item}"
                out.extend((item.first_seq + i, crypto.decrypt(t)) for i, t in enumerate(item.tokens))
    return out


async def write_records(writer: SegmentWriter, records: list[bytes], per_put: int = 1,
                        one_write_each: bool = False) -> BufferManager:
    """Put `records` `per_put` at a time; with `one_write_each`, wait until each put is written
    (so every put becomes its own write instead of joining a backlog)."""
    buf = BufferManager(100_000, 1 << 30)
    task = asyncio.create_task(writer.run(buf))
    for i in range(0, len(records), per_put):
        chunk = records[i : i + per_put]
        buf.put(chunk, sum(map(len, chunk)))
        await asyncio.sleep(0)
        for _ in range(1000 if one_write_each else 0):
            if buf.records == 0:
                break
            await asyncio.sleep(0.002)
    buf.close()
    await asyncio.wait_for(task, 30)
    return buf


async def test_records_are_written_encrypted_with_consecutive_sequence_numbers(tmp_path: Path,
                                                                               crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto)
    writer.open()
    records = [b'{"node_id":"n","i":%d}' % i for i in range(95)]
    buf = await write_records(writer, records, per_put=7)
    writer.close()
    assert buf.records == 0
    assert read_all(tmp_path, crypto) == list(enumerate(records))
    raw = b"".join(p.read_bytes() for p in segment_format.list_segments(tmp_path))
    assert b'"node_id"' not in raw  # nothing in clear text
    assert writer.stats.records == 95 and writer.stats.batches >= 10


async def test_segments_roll_over_and_sort_in_write_order(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, batch_size=5, max_segment_bytes=2000)
    writer.open()
    records = [b"r%04d" % i * 20 for i in range(100)]
    await write_records(writer, records, per_put=5, one_write_each=True)
    writer.close()
    segments = segment_format.list_segments(tmp_path)
    assert len(segments) > 3
    assert read_all(tmp_path, crypto) == list(enumerate(records))
    for path in segments[:-1]:
        assert path.stat().st_size >= 2000  # rolled only after passing the limit
    first_seqs = [int(p.name.split("-")[1].split(".")[0]) for p in segments]
    assert first_seqs == sorted(first_seqs) and first_seqs[0] == 0


async def test_restart_continues_sequence_numbers(tmp_path: Path, crypto: CryptoService) -> None:
    for run in range(3):
        writer = make_writer(tmp_path, crypto)
        writer.open()
        await write_records(writer, [b"run%d-%d" % (run, i) for i in range(15)], per_put=15)
        writer.close()
    assert [seq for seq, _ in read_all(tmp_path, crypto)] == list(range(45))


@pytest.mark.parametrize("garbage", [b"TSB1\x00\x00", b"\x00" * 3, None], ids=["partial-header", "zeros", "half-batch"])
async def test_torn_tail_is_cut_at_start_up(tmp_path: Path, crypto: CryptoService, garbage: bytes | None,
                                            caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(tmp_path, crypto)
    writer.open()
    await write_records(writer, [b"a%d" % i for i in range(20)], per_put=10)
    writer.close()
    (segment,) = segment_format.list_segments(tmp_path)
    size = segment.stat().st_size
    if garbage is None:  # a crash half-way through the second batch
        garbage = crypto.new_framer().frame(20, 0, [b"lost"] * 4)[:-30]
    with open(segment, "ab") as f:
        f.write(garbage)
    with caplog.at_level(logging.WARNING, logger="telemetry_sink.writer"):
        writer = make_writer(tmp_path, crypto)
        recovery = writer.open()
    assert recovery.cut_bytes == len(garbage)
    assert f"cut {len(garbage)} bytes" in caplog.text
    assert segment.stat().st_size == size
    assert writer.next_seq == 20
    await write_records(writer, [b"after"], per_put=1)
    writer.close()
    assert read_all(tmp_path, crypto)[-1] == (20, b"after")


async def test_segment_torn_while_being_created(tmp_path: Path, crypto: CryptoService) -> None:
    (tmp_path / segment_format.segment_name("w0", 0)).write_bytes(b"")
    torn = tmp_path / segment_format.segment_name("w0", 7)
    torn.write_bytes(b"TSINK")
    writer = make_writer(tmp_path, crypto)
    recovery = writer.open()
    assert (recovery.segment, recovery.next_seq, recovery.cut_bytes) == (torn, 7, 5)
    await write_records(writer, [b"x"])
    writer.close()
    with segment_format.SegmentImage(torn) as seg:
        (batch,) = seg.batches()
    assert isinstance(batch, segment_format.Batch) and batch.first_seq == 7


def test_a_second_writer_cannot_take_the_same_series(tmp_path: Path, crypto: CryptoService) -> None:
    first = make_writer(tmp_path, crypto, workers=2)
    first.open()
    with pytest.raises(WriterLockedError, match="locked by another running writer"):
        make_writer(tmp_path, crypto).open()
    second = make_writer(tmp_path, crypto, workers=2)
    second.open()
    assert (first.series, second.series) == ("w0", "w1")
    first.close()
    second.close()


@pytest.mark.parametrize(("policy", "expected"), [("batch", 5), ("never", 0)])
async def test_fsync_policy(tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch,
                            policy: str, expected: int) -> None:
    writer = make_writer(tmp_path, crypto, fsync=policy, batch_size=2)
    writer.open()
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(segment_writer.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    buf = BufferManager(1000, 1 << 20)
    task = asyncio.create_task(writer.run(buf))
    for _ in range(5):
        buf.put([b"a", b"b"], 2)
        for _attempt in range(200):
            if buf.records == 0:
                break
            await asyncio.sleep(0.01)
    assert writer.stats.batches == 5
    assert len(calls) == expected + 2  # plus creating the segment: its header, then its directory
    buf.close()
    await task
    writer.close()
    assert len(calls) == expected + 3  # sealing at shutdown always fsyncs


async def test_interval_policy_fsyncs_an_idle_tail(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, fsync="interval", fsync_interval_ms=300, batch_size=1)
    writer.open()
    buf = BufferManager(1000, 1 << 20)
    task = asyncio.create_task(writer.run(buf))
    buf.put([b"x"], 1)  # the first batch is fsynced at once (no fsync for 300 ms yet)
    for _ in range(300):
        if writer.stats.batches == 1:
            break
        await asyncio.sleep(0.005)
    buf.put([b"y"], 1)  # the second one, right after, is not: the interval has not passed
    for _ in range(300):
        if writer.stats.batches == 2:
            break
        await asyncio.sleep(0.005)
    assert writer._dirty
    for _ in range(300):  # nothing else is written: the ticker must fsync the idle tail
        if not writer._dirty:
            break
        await asyncio.sleep(0.01)
    assert not writer._dirty
    buf.close()
    await task
    writer.close()


def fail_batch_writes(monkeypatch: pytest.MonkeyPatch, count: int, *, partial: bool) -> list[int]:
    """Make the first `count` batch writes (more than a file header's 16 bytes) fail with ENOSPC, with
    half of the data on disk first when `partial`; return the sizes of every batch write attempted."""
    real_write_all = segment_writer.write_all
    attempts: list[int] = []

    def flaky_write_all(fd: int, data: bytes) -> None:
        if len(data) > 16:
            attempts.append(len(data))
            if len(attempts) <= count:
                if partial:
                    real_write_all(fd, data[: len(data) // 2])  # half the batch reaches the file
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(segment_writer, "write_all", flaky_write_all)
    return attempts


async def test_write_failures_are_retried_and_lose_nothing(tmp_path: Path, crypto: CryptoService,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected ENOSPC after a partial write: the partial batch is cut, the batch retried."""
    fail_batch_writes(monkeypatch, 3, partial=True)
    writer = make_writer(tmp_path, crypto, batch_size=4)
    writer.open()
    records = [b"rec%d" % i for i in range(12)]
    await write_records(writer, records, per_put=4)
    writer.close()
    assert writer.stats.write_errors == 3
    assert read_all(tmp_path, crypto) == list(enumerate(records))


async def test_durable_writer_fsyncs_every_batch_and_fails_requests_on_error(
        tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make_writer(tmp_path, crypto, fsync="never", durable=True, batch_size=2)
    writer.open()
    fail = {"on": False}
    real_write_all = segment_writer.write_all

    def maybe_failing(fd: int, data: bytes) -> None:
        if fail["on"] and len(data) > 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(segment_writer, "write_all", maybe_failing)
    buf = BufferManager(100, 1 << 20, whole_requests=True)
    task = asyncio.create_task(writer.run(buf))
    ok = buf.put([b"a", b"b"], 2, want_ack=True)
    assert ok is not None
    await asyncio.wait_for(ok, 5)
    assert not writer._dirty  # fsynced before the ack, whatever the fsync policy says
    fail["on"] = True
    doomed = buf.put([b"c", b"d"], 2, want_ack=True)
    assert doomed is not None
    with pytest.raises(OSError):
        await asyncio.wait_for(doomed, 5)
    assert writer.stats.last_errno == errno.ENOSPC and buf.records == 0
    fail["on"] = False
    later = buf.put([b"e"], 1, want_ack=True)
    assert later is not None
    await asyncio.wait_for(later, 10)
    assert writer.stats.last_error is None
    buf.close()
    await task
    writer.close()
    assert read_all(tmp_path, crypto) == [(0, b"a"), (1, b"b"), (2, b"e")]  # the failed request left nothing


async def test_segment_rolls_on_age(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, max_segment_age_s=1, batch_size=1)
    writer.open()
    buf = BufferManager(100, 1 << 20)
    task = asyncio.create_task(writer.run(buf))
    buf.put([b"old"], 3)
    for _ in range(400):  # the ticker seals it once it is a second old, even with no new batch
        if writer._fd is None and writer.stats.batches == 1:
            break
        await asyncio.sleep(0.01)
    assert writer._fd is None
    buf.put([b"new"], 3)
    buf.close()
    await task
    writer.close()
    assert len(segment_format.list_segments(tmp_path)) == 2
    assert read_all(tmp_path, crypto) == [(0, b"old"), (1, b"new")]


async def test_retention_deletes_oldest_sealed_segments_first(tmp_path: Path, crypto: CryptoService,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(tmp_path, crypto, batch_size=5, max_segment_bytes=1500, retention_bytes=4000)
    writer.open()
    with caplog.at_level(logging.INFO, logger="telemetry_sink.writer"):
        await write_records(writer, [b"r%04d" % i * 20 for i in range(200)], per_put=5, one_write_each=True)
    writer.close()
    segments = segment_format.list_segments(tmp_path)
    sizes = [p.stat().st_size for p in segments]
    assert sum(sizes) - sizes[-1] <= 4000  # what is left of the sealed ones fits the budget
    assert writer.stats.segments_deleted > 0
    assert "retention: deleted segment w0-00000000000000000000.tslog" in caplog.text
    seqs = [seq for seq, _ in read_all(tmp_path, crypto)]
    assert seqs == list(range(seqs[0], 200)) and seqs[0] > 0  # the newest records survive, in order


async def test_retention_by_age_never_deletes_the_active_segment(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, batch_size=5, max_segment_bytes=2000, retention_days=1)
    writer.open()
    await write_records(writer, [b"x" * 40 for _ in range(35)], per_put=5, one_write_each=True)
    writer.close()
    segments = segment_format.list_segments(tmp_path)
    assert len(segments) > 2
    for path in segments:  # pretend all of them are two days old
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    writer = make_writer(tmp_path, crypto, batch_size=5, max_segment_bytes=2000, retention_days=1)
    assert writer.open().segment == segments[-1]  # not full: the writer appends to it again
    writer._apply_retention()
    writer.close()
    left = segment_format.list_segments(tmp_path)
    assert left == segments[-1:]  # the one a writer appends to is kept


async def test_a_backlog_goes_to_the_writer_thread_several_batches_at_a_time(tmp_path: Path,
                                                                            crypto: CryptoService) -> None:
    registry = CollectorRegistry()
    writer = make_writer(tmp_path, crypto, batch_size=10, metrics=WriterMetrics(registry))
    writer.open()
    records = [b"b%d" % i for i in range(100)]
    buf = BufferManager(1000, 1 << 20)
    buf.put(records, sum(map(len, records)))  # a backlog of 10 full batches before the writer runs
    buf.close()
    await writer.run(buf)
    writer.close()
    assert writer.stats.batches == 10
    writes = registry.get_sample_value("telemetry_sink_flush_seconds_count")
    assert writes is not None and writes <= 2  # 8 batches per hand-off at most: 8 + 2
    assert registry.get_sample_value("telemetry_sink_batch_records_count") == 10
    with segment_format.SegmentImage(segment_format.list_segments(tmp_path)[0]) as seg:
        counts = [b.count for b in seg.batches() if isinstance(b, segment_format.Batch)]
    assert counts == [10] * 10  # still batch_size records a batch, in order
    assert read_all(tmp_path, crypto) == list(enumerate(records))


async def test_a_header_only_leftover_at_roll_over_is_started_over_not_fatal(tmp_path: Path,
                                                                           crypto: CryptoService) -> None:
    """Should a failed roll-over's unlink fail too, the retry reuses the file instead of FileExistsError."""
    writer = make_writer(tmp_path, crypto, max_segment_bytes=300)
    writer.open()
    await write_records(writer, [b"x" * 200])  # one batch seals the first segment
    assert writer._fd is None
    leftover = tmp_path / segment_format.segment_name("w0", writer.next_seq)
    leftover.write_bytes(segment_format.FILE_HEADER_BYTES[:7])
    await write_records(writer, [b"after"])
    writer.close()
    assert [r for _, r in read_all(tmp_path, crypto)] == [b"x" * 200, b"after"]


async def test_a_segment_with_data_is_never_overwritten_at_roll_over(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, max_segment_bytes=300)
    writer.open()
    await write_records(writer, [b"x" * 200])
    squatter = tmp_path / segment_format.segment_name("w0", writer.next_seq)
    squatter.write_bytes(b"someone else's data")
    with pytest.raises(FileExistsError, match="already holds data"):
        writer._write_batches([[b"after"]])
    assert squatter.read_bytes() == b"someone else's data"
    assert writer._fd is None
    writer.close()


async def test_a_failure_after_the_batch_is_stored_does_not_write_it_twice(
        tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention failing after a seal (a segment deleted by hand meanwhile) used to requeue a stored batch."""
    writer = make_writer(tmp_path, crypto, max_segment_bytes=300, retention_bytes=1)

    def vanished() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    writer.open()
    monkeypatch.setattr(writer, "_apply_retention", vanished)
    await write_records(writer, [b"x" * 200, b"y" * 200], one_write_each=True)
    writer.close()
    assert [r for _, r in read_all(tmp_path, crypto)] == [b"x" * 200, b"y" * 200]


async def test_an_unexpected_error_is_retried_like_a_disk_error_and_loses_nothing(
        tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Not an OSError (a bug, say): it used to kill the writer task silently with records buffered."""
    writer = make_writer(tmp_path, crypto, batch_size=4)
    writer.open()
    failures = {"left": 2}

    class FlakyFramer:
        def __init__(self, real: Any) -> None:
            self.real = real

        def frame_many(self, seq: int, created_ms: int, batches: list[list[bytes]]) -> bytes:
            if failures["left"]:
                failures["left"] -= 1
                raise ValueError("a bug in framing")
            return bytes(self.real.frame_many(seq, created_ms, batches))

    monkeypatch.setattr(writer, "_framer", FlakyFramer(writer._framer))
    records = [b"rec%d" % i for i in range(8)]
    with caplog.at_level(logging.ERROR, "telemetry_sink.writer"):
        await write_records(writer, records, per_put=4)
    writer.close()
    assert writer.stats.write_errors == 2 and writer.stats.last_error is None
    assert read_all(tmp_path, crypto) == list(enumerate(records))
    assert sum("Traceback" in (r.exc_text or "") or r.exc_info is not None for r in caplog.records) == 1


# -- the keyed extension (idempotency keys) --


def _key(i: int) -> segment_format.KeyEntry:
    return segment_format.KeyEntry(bytes([i]) * 32, b"b" * 32, 1)


async def _write_keyed(writer: SegmentWriter, n: int) -> None:
    """n one-record requests, each with its key."""
    buf = BufferManager(100_000, 1 << 30)
    task = asyncio.create_task(writer.run(buf))
    for i in range(n):
        buf.put([b"r%d" % i], 2, key=_key(i))
    buf.close()
    await asyncio.wait_for(task, 30)


def _keys_on_disk(directory: Path) -> list[tuple[int, list[int]]]:
    out = []
    for path in segment_format.list_segments(directory):
        with segment_format.SegmentImage(path) as seg:
            for item in seg.batches():
                assert isinstance(item, segment_format.Batch)
                out.append((seg.flags, [k.key[0] for k in item.keys]))
    return out


async def test_keys_go_with_the_batch_of_their_records(tmp_path: Path, crypto: CryptoService) -> None:
    writer = make_writer(tmp_path, crypto, keyed=True, batch_size=4)
    writer.open()
    await _write_keyed(writer, 10)
    writer.close()
    keyed = segment_format.FLAG_KEYED
    assert _keys_on_disk(tmp_path) == [(keyed, [0, 1, 2, 3]), (keyed, [4, 5, 6, 7]), (keyed, [8, 9])]
    assert [r for _, r in read_all(tmp_path, crypto)] == [b"r%d" % i for i in range(10)]


async def test_a_keyed_writer_never_appends_to_an_unflagged_segment(tmp_path: Path, crypto: CryptoService) -> None:
    plain = make_writer(tmp_path, crypto)
    plain.open()
    await write_records(plain, [b"old"])
    plain.close()
    keyed = make_writer(tmp_path, crypto, keyed=True)
    keyed.open()
    await _write_keyed(keyed, 1)
    keyed.close()
    assert _keys_on_disk(tmp_path) == [(0, []), (segment_format.FLAG_KEYED, [0])]
    assert [r for _, r in read_all(tmp_path, crypto)] == [b"old", b"r0"]


@pytest.mark.parametrize("torn", [0, 12, 15], ids=lambda n: f"header-{n}-bytes")
async def test_a_torn_or_empty_unflagged_tail_is_started_over_keyed(tmp_path: Path, crypto: CryptoService,
                                                                     torn: int) -> None:
    """A header-only (or torn keyed header) newest segment holds no batch: the keyed writer replaces it."""
    header = segment_format.file_header_bytes(segment_format.FLAG_KEYED)[:torn] if torn else \
        segment_format.FILE_HEADER_BYTES
    (tmp_path / segment_format.segment_name("w0", 0)).write_bytes(header)
    writer = make_writer(tmp_path, crypto, keyed=True)
    writer.open()
    await _write_keyed(writer, 2)
    writer.close()
    assert _keys_on_disk(tmp_path) == [(segment_format.FLAG_KEYED, [0, 1])]


async def test_a_failed_write_retries_the_hand_off_queued_behind_it_in_order(
        tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog makes two hand-offs in flight; the first write fails (half of it on disk): the thread
    skips the second, and both are retried in order: every record once, in sequence, nothing lost."""
    attempts = fail_batch_writes(monkeypatch, 1, partial=True)
    writer = make_writer(tmp_path, crypto, batch_size=10)
    writer.open()
    records = [b"r%d" % i for i in range(120)]
    buf = BufferManager(1000, 1 << 20)
    buf.put(records, sum(map(len, records)))  # 12 full batches: a hand-off of 8, and one of 4 behind it
    buf.close()
    await writer.run(buf)
    writer.close()
    assert writer.stats.write_errors == 1 and buf.records == 0
    assert len(attempts) >= 3  # the failed one, then the retried ones: the skipped one never reached the disk first
    assert read_all(tmp_path, crypto) == list(enumerate(records))


async def test_a_durable_writer_fails_only_the_failed_hand_off_and_stores_the_one_behind(
        tmp_path: Path, crypto: CryptoService, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_batch_writes(monkeypatch, 1, partial=False)
    writer = make_writer(tmp_path, crypto, fsync="never", durable=True, batch_size=2)
    writer.open()
    buf = BufferManager(1000, 1 << 20, whole_requests=True)
    acks = [buf.put([b"x%d" % i, b"y%d" % i], 4, want_ack=True) for i in range(10)]  # 10 batches: 8 + 2
    task = asyncio.create_task(writer.run(buf))
    outcomes = await asyncio.gather(*[asyncio.wait_for(ack, 10) for ack in acks if ack is not None],
                                    return_exceptions=True)
    buf.close()
    await task
    writer.close()
    failed = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, OSError)]
    assert failed == list(range(8))  # the first hand-off's requests: 503 for their clients
    assert outcomes[8:] == [None, None]  # skipped, then stored
    assert [record for _, record in read_all(tmp_path, crypto)] == [b"x8", b"y8", b"x9", b"y9"]
