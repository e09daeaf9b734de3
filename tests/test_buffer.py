"""BufferManager: bounds, all-or-nothing puts, size/linger batching, requeue, acks, close."""

from __future__ import annotations

import asyncio

import pytest

from telemetry_sink.buffer import BufferClosed, BufferFull, BufferManager


def recs(n: int, size: int = 10) -> list[bytes]:
    return [bytes([65 + i % 26]) * size for i in range(n)]


async def one_batch(buf: BufferManager, batch_size: int, linger_s: float) -> list[bytes]:
    """One batch, as the writer takes it when no backlog waits (max_batches = 1)."""
    batches = await buf.next_batches(batch_size, linger_s, 1)
    return batches[0] if batches else []


def test_bounded_by_records_all_or_nothing() -> None:
    buf = BufferManager(max_records=5, max_bytes=10**6)
    buf.put(recs(3), 30)
    with pytest.raises(BufferFull):
        buf.put(recs(3), 30)
    assert (buf.records, buf.bytes, buf.queued) == (3, 30, 3)
    buf.put(recs(2), 20)
    assert buf.records == 5


def test_bounded_by_bytes() -> None:
    buf = BufferManager(max_records=100, max_bytes=100)
    buf.put(recs(9), 90)
    with pytest.raises(BufferFull):
        buf.put(recs(2), 20)
    buf.put(recs(1), 10)
    assert buf.bytes == 100


class FrozenClock:
    """The buffer's clock, moved only by the test: linger windows without wall-clock asserts."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_full_batch_is_taken_at_once() -> None:
    buf = BufferManager(100, 10**6, clock=FrozenClock())  # linger never runs out: only a full batch is taken
    buf.put(recs(7), 70)
    batch = await asyncio.wait_for(one_batch(buf, 5, 60), 5)
    assert batch == recs(7)[:5]
    assert buf.queued == 2 and buf.records == 7  # taken but not yet stored still counts


async def test_partial_batch_waits_for_linger() -> None:
    clock = FrozenClock()
    buf = BufferManager(100, 10**6, clock=clock)
    buf.put(recs(2), 20)
    task = asyncio.create_task(one_batch(buf, 10, 0.2))
    await asyncio.sleep(0.5)  # longer than the linger in real time: the buffer's clock decides, not the timer
    assert not task.done()
    clock.now = 0.2
    assert await asyncio.wait_for(task, 5) == recs(2)


async def test_waiting_writer_wakes_when_batch_fills() -> None:
    buf = BufferManager(100, 10**6)
    buf.put(recs(1), 10)
    task = asyncio.create_task(one_batch(buf, 3, 60))
    await asyncio.sleep(0.05)
    assert not task.done()
    buf.put(recs(2), 20)
    assert len(await asyncio.wait_for(task, 5)) == 3


async def test_idle_writer_wakes_on_first_put() -> None:
    buf = BufferManager(100, 10**6)
    task = asyncio.create_task(one_batch(buf, 1, 60))
    await asyncio.sleep(0.05)
    assert not task.done()
    buf.put(recs(1), 10)
    assert await asyncio.wait_for(task, 5) == recs(1)


async def test_stored_frees_room_and_resolves_acks_in_order() -> None:
    buf = BufferManager(10, 10**6)
    first = buf.put(recs(3), 30, want_ack=True)
    second = buf.put(recs(3), 30, want_ack=True)
    assert first is not None and second is not None
    batch = await one_batch(buf, 4, 0)
    buf.stored(batch)
    assert first.done() and not second.done()  # the second request is only half stored
    assert (buf.records, buf.bytes) == (2, 20)
    buf.stored(await one_batch(buf, 4, 0))
    assert second.done() and buf.records == 0


async def test_requeue_puts_batch_back_in_front_and_flushes_without_linger() -> None:
    buf = BufferManager(10, 10**6, clock=FrozenClock())
    buf.put([b"a", b"b", b"c"], 3)
    batch = await one_batch(buf, 2, 0)
    buf.requeue(batch)
    assert buf.records == 3
    assert await asyncio.wait_for(one_batch(buf, 5, 60), 5) == [b"a", b"b", b"c"]  # the clock never reaches 60


async def test_fail_acks_fails_every_waiter() -> None:
    buf = BufferManager(10, 10**6)
    ack = buf.put(recs(1), 10, want_ack=True)
    assert ack is not None
    buf.fail_acks(RuntimeError("writer died"))
    with pytest.raises(RuntimeError, match="writer died"):
        await ack


async def test_close_refuses_puts_and_drains_then_returns_empty() -> None:
    buf = BufferManager(10, 10**6)
    buf.put(recs(2), 20)
    buf.close()
    with pytest.raises(BufferClosed):
        buf.put(recs(1), 10)
    assert await asyncio.wait_for(one_batch(buf, 10, 60), 5) == recs(2)  # no linger once closed
    assert await asyncio.wait_for(one_batch(buf, 10, 60), 5) == []


async def test_whole_requests_mode_never_splits_a_request() -> None:
    buf = BufferManager(100, 10**6, whole_requests=True)
    buf.put(recs(3), 30)
    buf.put(recs(4), 40)
    buf.put(recs(2), 20)
    assert len(await one_batch(buf, 5, 0)) == 7  # 3 + all 4 of the second request
    assert len(await one_batch(buf, 5, 0)) == 2


async def test_discard_fails_exactly_the_batch_requests() -> None:
    buf = BufferManager(100, 10**6, whole_requests=True)
    first = buf.put(recs(2), 20, want_ack=True)
    second = buf.put(recs(2), 20, want_ack=True)
    assert first is not None and second is not None
    buf.discard(await one_batch(buf, 2, 0), OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        await first
    assert not second.done() and buf.records == 2
    buf.stored(await one_batch(buf, 2, 0))
    await second


async def test_a_backlog_is_handed_over_as_several_full_batches() -> None:
    buf = BufferManager(100, 10**6)
    buf.put(recs(25), 250)
    batches = await buf.next_batches(10, linger_s=60, max_batches=8)
    assert [len(b) for b in batches] == [10, 10]  # the 5 left over wait for more or for the linger
    assert buf.queued == 5


def test_above_measures_records_and_bytes_against_their_bounds() -> None:
    buf = BufferManager(max_records=10, max_bytes=1000)
    buf.put(recs(8), 80)
    assert buf.above(80) and not buf.above(81) and not buf.above(100)
    buf.put(recs(1, size=920), 920)
    assert buf.above(100)  # by bytes: 1000 of 1000, with 9 of 10 records


async def test_keys_travel_with_the_batch_holding_their_requests_last_record() -> None:
    from telemetry_sink.segment_format import KeyEntry

    def key(i: int) -> KeyEntry:
        return KeyEntry(bytes([i]) * 32, b"b" * 32, 3)

    buf = BufferManager(max_records=100, max_bytes=10**6)
    for i in range(3):  # three requests of three records: a batch of 4 splits the second
        buf.put(recs(3), 30, key=key(i))
    batches = await buf.next_batches(4, 0.0, 3)
    assert [len(b) for b in batches] == [4, 4]
    assert buf.keys_of(batches) == [[key(0)], [key(1)]]  # key 1 rides with its last record, in batch 2
    buf.requeue([r for b in batches for r in b])  # a failed write: the same records come again
    again = await buf.next_batches(9, 0.0, 1)
    assert buf.keys_of(again) == [[key(0), key(1), key(2)]]
    buf.stored(again[0])
    assert buf.keys_of([]) == [] and not buf._keys  # stored: nothing left to carry


async def test_batches_cut_across_puts_and_requeues_keep_record_order() -> None:
    """Records are queued as the lists they were put in; batches cut through and across them, and a
    requeue while the first list is partly taken goes back in front of its rest."""
    buf = BufferManager(100, 10**6, clock=FrozenClock())
    records = [b"%02d" % i for i in range(12)]
    for piece in (records[0:3], records[3:8], records[8:10]):
        buf.put(piece, 2 * len(piece))
    first = await one_batch(buf, 4, 60)  # 3 + 1 of the second put
    assert first == records[0:4]
    buf.requeue(first)
    assert buf.queued == 10
    assert await buf.next_batches(3, 60, 3) == [records[0:3], records[3:6], records[6:9]]
    buf.put(records[10:12], 4)
    assert await one_batch(buf, 3, 60) == records[9:12]
    assert buf.queued == 0 and buf.records == 12
