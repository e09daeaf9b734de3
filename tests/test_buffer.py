"""BufferManager: bounds, all-or-nothing puts, size/linger batching, requeue, acks, close."""

from __future__ import annotations

import asyncio
import time

import pytest

from telemetry_sink.buffer import BufferClosed, BufferFull, BufferManager


def recs(n: int, size: int = 10) -> list[bytes]:
    return [bytes([65 + i % 26]) * size for i in range(n)]


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


async def test_full_batch_is_taken_at_once() -> None:
    buf = BufferManager(100, 10**6)
    buf.put(recs(7), 70)
    started = time.monotonic()
    batch = await asyncio.wait_for(buf.next_batch(5, linger_s=60), 5)
    assert batch == recs(7)[:5]
    assert time.monotonic() - started < 1
    assert buf.queued == 2 and buf.records == 7  # taken but not yet stored still counts


async def test_partial_batch_waits_for_linger() -> None:
    buf = BufferManager(100, 10**6)
    buf.put(recs(2), 20)
    started = time.monotonic()
    batch = await asyncio.wait_for(buf.next_batch(10, linger_s=0.2), 5)
    elapsed = time.monotonic() - started
    assert batch == recs(2)
    assert 0.15 <= elapsed < 2


async def test_waiting_writer_wakes_when_batch_fills() -> None:
    buf = BufferManager(100, 10**6)
    buf.put(recs(1), 10)
    task = asyncio.create_task(buf.next_batch(3, linger_s=60))
    await asyncio.sleep(0.05)
    assert not task.done()
    buf.put(recs(2), 20)
    assert len(await asyncio.wait_for(task, 5)) == 3


async def test_idle_writer_wakes_on_first_put() -> None:
    buf = BufferManager(100, 10**6)
    task = asyncio.create_task(buf.next_batch(1, linger_s=60))
    await asyncio.sleep(0.05)
    assert not task.done()
    buf.put(recs(1), 10)
    assert await asyncio.wait_for(task, 5) == recs(1)


async def test_stored_frees_room_and_resolves_acks_in_order() -> None:
    buf = BufferManager(10, 10**6)
    first = buf.put(recs(3), 30, want_ack=True)
    second = buf.put(recs(3), 30, want_ack=True)
    assert first is not None and second is not None
    batch = await buf.next_batch(4, linger_s=0)
    buf.stored(batch)
    assert first.done() and not second.done()  # the second request is only half stored
    assert (buf.records, buf.bytes) == (2, 20)
    buf.stored(await buf.next_batch(4, linger_s=0))
    assert second.done() and buf.records == 0


async def test_requeue_puts_batch_back_in_front_and_flushes_without_linger() -> None:
    buf = BufferManager(10, 10**6)
    buf.put([b"a", b"b", b"c"], 3)
    batch = await buf.next_batch(2, linger_s=0)
    buf.requeue(batch)
    assert buf.records == 3
    started = time.monotonic()
    assert await buf.next_batch(5, linger_s=60) == [b"a", b"b", b"c"]
    assert time.monotonic() - started < 1


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
    assert await asyncio.wait_for(buf.next_batch(10, linger_s=60), 5) == recs(2)  # no linger once closed
    assert await asyncio.wait_for(buf.next_batch(10, linger_s=60), 5) == []


async def test_whole_requests_mode_never_splits_a_request() -> None:
    buf = BufferManager(100, 10**6, whole_requests=True)
    buf.put(recs(3), 30)
    buf.put(recs(4), 40)
    buf.put(recs(2), 20)
    assert len(await buf.next_batch(5, linger_s=0)) == 7  # 3 + all 4 of the second request
    assert len(await buf.next_batch(5, linger_s=0)) == 2


async def test_discard_fails_exactly_the_batch_requests() -> None:
    buf = BufferManager(100, 10**6, whole_requests=True)
    first = buf.put(recs(2), 20, want_ack=True)
    second = buf.put(recs(2), 20, want_ack=True)
    assert first is not None and second is not None
    buf.discard(await buf.next_batch(2, linger_s=0), OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        await first
    assert not second.done() and buf.records == 2
    buf.stored(await buf.next_batch(2, linger_s=0))
    await second
