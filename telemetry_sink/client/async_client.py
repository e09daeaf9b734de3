"""`AsyncClient`: the asyncio front end, same API as `Client` with coroutines; a background task delivers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import httpx

from .batching import CHUNK, Batch, Record, build_request, encode_record
from .errors import ClientError, DeliveryTimeout, PendingFullError, SenderFailedError
from .front import FrontEnd, deadline_after
from .pipeline import Verdict, judge, log
from .retry import Outcome
from .spool import DiskSpool


class AsyncClient(FrontEnd):
    """Send records to a telemetry-sink server from asyncio code. Keyword arguments: see `ClientOptions`.

    Use it from one event loop. `await send(...)` returns once the record is batched; it waits only when the
    buffer or spool is full (`full_policy = "block"`). Refusals are raised as in `Client`. Sealing a spooled
    batch (its fsync) runs in a worker thread so the loop is not held by the disk.
    """

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, options)
        self._fsync_in_thread = isinstance(self._pipe.store, DiskSpool) and self.options.spool_fsync == "batch"
        self._cond = asyncio.Condition()
        self._abort = asyncio.Event()
        self._http = httpx.AsyncClient(verify=self._verify, timeout=self.options.timeout_s)
        self._task: asyncio.Task[None] | None = None

    def pending_records(self) -> int:
        """Records handed over and not yet delivered (including the batch on the wire)."""
        return self._pipe.pending_records()

    async def send(self, record: Record) -> None:
        """Queue one record: a mapping, or one encoded JSON object as bytes."""
        await self.send_many((record,))

    async def send_many(self, records: Iterable[Record]) -> None:
        """Queue several records (not atomic, as `Client.send_many`)."""
        deadline = deadline_after(self.options.block_timeout_s)
        it = iter(records)
        first = True
        while chunk := [encode_record(r, self.options.max_batch_bytes) for r in itertools.islice(it, CHUNK)]:
            await self._take(chunk, deadline, report=first)
            first = False

    async def _take(self, lines: list[bytes], deadline: float | None, report: bool) -> None:
        async with self._cond:
            self._check_open(report)
            pipe = self._pipe
            for line in lines:
                if pipe.must_seal_before(line):
                    await self._seal()
                while not pipe.room_for(line):
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or self._closed:
                        raise PendingFullError(pipe.store.total_bytes, self.options.max_pending_bytes)
                    await self._wait(left)
                first, full = pipe.append(line)
                if full:
                    await self._seal()
                elif first:
                    self._cond.notify_all()

    async def flush(self, timeout: float | None = None) -> None:
        """Send the open batch now and wait until everything handed over so far is delivered (see `Client.flush`)."""
        deadline = deadline_after(timeout)
        async with self._cond:
            self._check_open()
            await self._seal()
            await self._wait_idle(deadline)
            self._pipe.raise_error()

    async def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout` seconds), stop the sender, release the connection and the spool."""
        timed_out: ClientError | None = None
        async with self._cond:
            if self._closed:
                self._pipe.raise_error()  # the next refusal not yet raised, if any
                return
            self._mark_closed()
            self._start()
            await self._seal()
            try:
                await self._wait_idle(deadline_after(timeout))
            except (DeliveryTimeout, SenderFailedError) as exc:
                timed_out = exc
            self._stopping = True
            self._abort.set()
            self._cond.notify_all()
        if self._task is not None:
            await self._task
        await self._http.aclose()
        self._pipe.store.close()
        if timed_out is not None:
            raise timed_out
        self._pipe.raise_error()

    async def __aenter__(self) -> AsyncClient:
        self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except ClientError as close_exc:
            log.error("closing the client after %s: %s", type(exc).__name__, close_exc)

    # -- internals --

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-sink-client")

    def _check_open(self, report: bool = True) -> None:
        if not self._closed:
            self._start()
        super()._check_open(report)

    async def _seal(self) -> None:
        """Seal the open batch (the lock is held) and wake the sender."""
        if self._fsync_in_thread and self._pipe.store.open_records:
            await asyncio.to_thread(self._pipe.store.seal)
        else:
            self._pipe.store.seal()
        self._cond.notify_all()

    async def _wait(self, timeout: float | None) -> None:
        if timeout is None:
            await self._cond.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cond.wait(), timeout)

    async def _wait_idle(self, deadline: float | None) -> None:
        while not self._pipe.idle():
            self._check_sender()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._timeout_error()
            await self._wait(left)

    async def _run(self) -> None:
        try:
            await self._send_loop()
        except Exception as exc:  # a bug or a spool I/O error: say so, and fail the callers' next calls
            log.exception("the client's sender stopped")
            async with self._cond:
                self._fatal = exc
                self._cond.notify_all()

    async def _send_loop(self) -> None:
        """The sender task: seal batches due by age, deliver the oldest sealed one, repeat."""
        while True:
            async with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._pipe.seal_due():
                        await self._seal()
                    batch = self._pipe.next_batch()
                    if batch is not None:
                        break
                    await self._wait(self._pipe.due_in(time.monotonic()))
                ndjson = self._pipe.store.ndjson(batch)
            verdict = await self._deliver(batch, ndjson)
            async with self._cond:
                self._pipe.finished(batch, verdict)
                self._cond.notify_all()

    async def _deliver(self, batch: Batch, ndjson: bytes) -> Verdict | None:
        """Attempts at one batch, same body and key each time, until a final verdict (None: aborted)."""
        body, headers = build_request(batch, ndjson, self.options)
        attempt = 0
        while True:
            try:
                resp = await self._http.post(self.options.endpoint, content=body, headers=headers)
                verdict = judge(resp.status_code, resp.headers.get("retry-after"), resp.content, batch, ndjson)
            except httpx.RequestError as exc:  # connection, timeout, protocol, decoding
                verdict = Verdict(Outcome.RETRY, None, reason=f"{type(exc).__name__}: {exc}")
            if verdict.outcome is not Outcome.RETRY:
                return verdict
            delay = self.options.retry.delay(attempt, verdict.retry_after)
            self._pipe.retry_note(batch, attempt, verdict, delay)
            attempt += 1
            try:
                await asyncio.wait_for(self._abort.wait(), delay)
                return None
            except TimeoutError:
                pass
