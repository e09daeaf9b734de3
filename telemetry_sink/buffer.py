"""BufferManager: the bounded in-memory queue between request handlers and the writer."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections import deque
from collections.abc import Callable

from .segment_format import KeyEntry
from .segment_index import Span

# (lowest ts, highest ts, node ids) of one request's records (speedups.record_span)
RequestSpan = tuple[float, float, set[str]]


class BufferFull(Exception):
    """The records would push the buffer past `max_records` or `max_bytes`."""


class BufferClosed(Exception):
    """The buffer no longer accepts records (the server is shutting down)."""


class BufferManager:
    """Holds accepted plaintext records until the writer has stored them.

    Bounded by `max_records` and `max_bytes`, counting records queued and records the
    writer has taken but not yet stored, so memory stays bounded even while the disk is
    slow. A put is all or nothing. Callers may ask for an ack future that resolves once
    the writer reports every one of their records stored.
    """

    def __init__(
        self,
        max_records: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        whole_requests: bool = False,
    ) -> None:
        self.max_records = max_records
        # Durable acks: a batch never splits a request, so a failed batch fails whole requests.
        self.whole_requests = whole_requests
        self.max_bytes = max_bytes
        self.records = 0  # queued + in flight
        self.bytes = 0
        self.closed = False
        self._clock = clock
        # The records waiting, as the lists they were put (or requeued) in, oldest first: the
        # writer's batches are cut from them with a list copy per list rather than a Python step
        # per record. `_head` records of the first one are taken already.
        self._queue: deque[list[bytes]] = deque()
        self._head = 0
        self._queued = 0
        # (position after the request's last record, arrival time), oldest first, for the
        # records still queued: the head's time is when the oldest waiting record arrived.
        self._arrivals: deque[tuple[int, float]] = deque()
        self._acks: deque[tuple[int, asyncio.Future[None]]] = deque()
        # (position after the request's last record, its idempotency key) until that record is stored
        self._keys: deque[tuple[int, KeyEntry]] = deque()
        # (first position, position after the last record, span) of each request with a span, until
        # its records are stored: what the writer folds into the segment index.
        self._spans: deque[tuple[int, int, RequestSpan]] = deque()
        self._enqueued = 0  # records ever put: positions run from 0
        self._taken = 0  # records ever handed to the writer
        self._stored = 0  # records ever reported stored
        self._wakeup = asyncio.Event()
        self._batch_size = 1

    @property
    def queued(self) -> int:
        """Records waiting for the writer (not yet taken)."""
        return self._queued

    def above(self, percent: int) -> bool:
        """Whether records or bytes held reach `percent` of their bound (100: full)."""
        return self.records * 100 >= self.max_records * percent or self.bytes * 100 >= self.max_bytes * percent

    def put(self, records: list[bytes], nbytes: int, want_ack: bool = False,
            key: KeyEntry | None = None, span: RequestSpan | None = None) -> asyncio.Future[None] | None:
        """Queue `records` (whose lengths sum to `nbytes`; the list is kept, not copied: do not change
        it) or raise BufferFull/BufferClosed. `key` travels to the writer with the batch that holds
        the request's last record; `span` (lowest ts, highest ts, node ids) with every batch that
        holds any of its records."""
        if self.closed:
            raise BufferClosed
        if self.records + len(records) > self.max_records or self.bytes + nbytes > self.max_bytes:
            raise BufferFull
        was_empty = not self._queued
        if records:
            self._queue.append(records)
            self._queued += len(records)
        self.records += len(records)
        self.bytes += nbytes
        if span is not None:
            self._spans.append((self._enqueued, self._enqueued + len(records), span))
        self._enqueued += len(records)
        self._arrivals.append((self._enqueued, self._clock()))
        if key is not None:
            self._keys.append((self._enqueued, key))
        ack: asyncio.Future[None] | None = None
        if want_ack:
            ack = asyncio.get_running_loop().create_future()
            self._acks.append((self._enqueued, ack))
        if was_empty or self._queued >= self._batch_size:
            self._wakeup.set()
        return ack

    async def next_batches(self, batch_size: int, linger_s: float, max_batches: int) -> list[list[bytes]]:
        """Wait until `batch_size` records are queued, or the oldest has waited `linger_s`, or
        the buffer is closed; then take a batch of up to `batch_size` records, plus up to
        `max_batches` - 1 further full batches already waiting. [] means closed and empty."""
        self._batch_size = batch_size
        while True:
            if not self._queued:
                if self.closed:
                    return []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued < batch_size and not self.closed:
                remaining = self._arrivals[0][1] + linger_s - self._clock()
                if remaining > 0:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    continue
            batches = [self._take(batch_size)]
            # A backlog: hand over further full batches in the same call, so the writer's
            # per-call costs (thread hand-off, write, fsync) are shared by more records.
            while len(batches) < max_batches and self._queued >= batch_size:
                batches.append(self._take(batch_size))
            return batches

    def _take(self, batch_size: int) -> list[bytes]:
        n = min(batch_size, self._queued)
        if self.whole_requests:
            target = self._taken + n
            for end, _ in self._arrivals:
                if end >= target:
                    n = end - self._taken
                    break
        queue = self._queue
        if self._head == 0 and len(queue[0]) == n:
            batch = queue.popleft()  # one whole put: no copy (nothing changes a list once queued)
        else:
            batch = []
            need = n
            while need:
                chunk, start = queue[0], self._head
                if len(chunk) - start > need:
                    batch += chunk[start:start + need]
                    self._head += need
                    break
                batch += chunk[start:] if start else chunk
                need -= len(chunk) - start
                queue.popleft()
                self._head = 0
        self._queued -= n
        self._taken += n
        arrivals = self._arrivals
        # A request split across batches keeps its entry: its rest still counts from its arrival.
        while arrivals and arrivals[0][0] <= self._taken:
            arrivals.popleft()
        return batch

    def keys_of(self, batches: list[list[bytes]]) -> list[list[KeyEntry]]:
        """The idempotency keys of each of `batches` (the batches just taken, in order)."""
        out: list[list[KeyEntry]] = []
        start = self._taken - sum(map(len, batches))
        keys = iter(self._keys)
        pending = next(keys, None)
        for batch in batches:
            start += len(batch)
            mine: list[KeyEntry] = []
            while pending is not None and pending[0] <= start:
                mine.append(pending[1])
                pending = next(keys, None)
            out.append(mine)
        return out

    def span_of(self, batches: list[list[bytes]]) -> Span | None:
        """What the records of `batches` (the batches just taken) can hold, or None if some of them
        came without a span (the index of their segment then cannot be trusted)."""
        stop = self._taken
        start = stop - sum(map(len, batches))
        out = Span.empty()
        covered = start
        for first, end, (ts_min, ts_max, nodes) in self._spans:
            if end <= start:
                continue
            if first >= stop:
                break
            if first > covered:
                return None  # a gap: records without a span
            out.add(ts_min, ts_max, nodes, min(end, stop) - max(first, start))
            covered = end
        return out if covered >= stop else None

    def requeue(self, batch: list[bytes]) -> None:
        """Give back a batch the writer could not store, at the front, to be retried."""
        queue = self._queue
        if self._head:  # the first list is partly taken: keep only its rest before the batch
            queue[0] = queue[0][self._head:]
            self._head = 0
        queue.appendleft(batch)
        self._queued += len(batch)
        self._taken -= len(batch)
        # These records have waited long enough already: flush them again without lingering.
        self._arrivals.appendleft((self._taken + len(batch), float("-inf")))
        self._wakeup.set()

    def stored(self, batch: list[bytes]) -> None:
        """The writer stored `batch` (the oldest taken records): free its room, resolve acks."""
        self._finish(batch, None)

    def discard(self, batch: list[bytes], exc: BaseException) -> None:
        """The writer gave up on `batch`: free its room and fail the acks of its requests."""
        self._finish(batch, exc)

    def _finish(self, batch: list[bytes], exc: BaseException | None) -> None:
        self.records -= len(batch)
        self.bytes -= sum(map(len, batch))
        self._stored += len(batch)
        keys = self._keys
        while keys and keys[0][0] <= self._stored:
            keys.popleft()
        spans = self._spans
        while spans and spans[0][1] <= self._stored:
            spans.popleft()
        acks = self._acks
        while acks and acks[0][0] <= self._stored:
            future = acks.popleft()[1]
            if future.done():
                continue
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(_own_copy(exc))

    def fail_acks(self, exc: BaseException) -> None:
        """Fail every pending ack (the writer died), so no caller waits forever."""
        while self._acks:
            future = self._acks.popleft()[1]
            if not future.done():
                future.set_exception(_own_copy(exc))

    def close(self) -> None:
        """Refuse further puts; the writer drains what is queued, then sees []."""
        self.closed = True
        self._wakeup.set()


def _own_copy(exc: BaseException) -> BaseException:
    """A copy of `exc` for one waiter: each raises its own, so tracebacks do not pile up on a
    shared exception object (as aiokafka does for its batch futures)."""
    return copy.copy(exc)
