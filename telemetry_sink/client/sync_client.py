"""`Client`: the blocking front end. Callers' threads batch; one background thread delivers, oldest first."""

from __future__ import annotations

import itertools
import threading
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


class Client(FrontEnd):
    """Send records to a telemetry-sink server; thread-safe. Keyword arguments: see `ClientOptions`.

    `send` returns once the record is batched (in memory, or written to the spool); delivery happens in the
    background. A batch the server refuses for good is raised as `RejectedError` from the next `send`,
    `send_many`, `flush` or `close`. Use as a context manager, or call `close()`.
    """

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, options)
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._http = httpx.Client(verify=self._verify, timeout=self.options.timeout_s)
        self._thread = threading.Thread(target=self._run, name="telemetry-sink-client", daemon=True)
        self._thread.start()

    def pending_records(self) -> int:
        """Records handed over and not yet delivered (including the batch on the wire)."""
        with self._cond:
            return self._pipe.pending_records()

    def send(self, record: Record) -> None:
        """Queue one record: a mapping, or one encoded JSON object as bytes."""
        self.send_many((record,))

    def send_many(self, records: Iterable[Record]) -> None:
        """Queue several records (cheaper than one `send` each: one lock round trip per 1000).

        Not atomic: when a record cannot be encoded or `PendingFullError` is raised, the records before it
        were taken. A refusal of an earlier batch is raised before any record is taken.
        """
        deadline = deadline_after(self.options.block_timeout_s)
        it = iter(records)
        first = True
        while chunk := [encode_record(r, self.options.max_batch_bytes) for r in itertools.islice(it, CHUNK)]:
            self._take(chunk, deadline, report=first)
            first = False

    def _take(self, lines: list[bytes], deadline: float | None, report: bool) -> None:
        with self._cond:
            self._check_open(report)
            pipe = self._pipe
            for line in lines:
                if pipe.must_seal_before(line):
                    pipe.store.seal()
                    self._cond.notify_all()
                while not pipe.room_for(line):
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or self._closed:
                        raise PendingFullError(pipe.store.total_bytes, self.options.max_pending_bytes)
                    self._cond.wait(left)
                first, full = pipe.append(line)
                if full:
                    pipe.store.seal()
                if first or full:
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Send the open batch now and wait until everything handed over so far is delivered.

        Raises `DeliveryTimeout` after `timeout` seconds (nothing is lost by that: delivery goes on), and the
        `RejectedError` of any batch refused meanwhile.
        """
        deadline = deadline_after(timeout)
        with self._cond:
            self._check_open()
            self._pipe.store.seal()
            self._cond.notify_all()
            self._wait_idle(deadline)
            self._pipe.raise_error()

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush (up to `timeout` seconds), then stop the sender and release the connection and the spool.

        Raises `DeliveryTimeout` if records were left undelivered (with a spool they stay on disk), else the
        first refusal not yet raised; calling it again raises the next one, until none is left.
        """
        timed_out: ClientError | None = None
        with self._cond:
            if self._closed:
                self._pipe.raise_error()  # the next refusal not yet raised, if any
                return
            self._mark_closed()
            self._pipe.store.seal()
            self._cond.notify_all()
            try:
                self._wait_idle(deadline_after(timeout))
            except (DeliveryTimeout, SenderFailedError) as exc:
                timed_out = exc
            self._stopping = True
            self._abort.set()
            self._cond.notify_all()
        # An attempt on the wire is allowed to finish (it is bounded by timeout_s) so its answer is recorded.
        self._thread.join()
        self._http.close()
        with self._cond:
            self._pipe.store.close()
        if timed_out is not None:
            raise timed_out
        self._pipe.raise_error()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # the caller's exception is the one to see; what close() has to say is logged
            self.close()
        except ClientError as close_exc:
            log.error("closing the client after %s: %s", type(exc).__name__, close_exc)

    # -- internals --

    def _wait_idle(self, deadline: float | None) -> None:
        while not self._pipe.idle():
            self._check_sender()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._timeout_error()
            self._cond.wait(left)

    def _run(self) -> None:
        try:
            self._send_loop()
        except BaseException as exc:  # a bug or a spool I/O error: say so, and fail the callers' next calls
            log.exception("the client's sender stopped")
            with self._cond:
                self._fatal = exc
                self._cond.notify_all()

    def _send_loop(self) -> None:
        """The sender thread: seal batches that are due by age, deliver the oldest sealed one, repeat."""
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._pipe.seal_due():
                        self._pipe.store.seal()
                    batch = self._pipe.next_batch()
                    if batch is not None:
                        break
                    self._cond.wait(self._pipe.due_in(time.monotonic()))
                ndjson = self._pipe.store.ndjson(batch)
            verdict = self._deliver(batch, ndjson)
            with self._cond:
                self._pipe.finished(batch, verdict)
                self._cond.notify_all()

    def _deliver(self, batch: Batch, ndjson: bytes) -> Verdict | None:
        """Attempts at one batch, same body and key each time, until a final verdict (None: aborted)."""
        body, headers = build_request(batch, ndjson, self.options)
        attempt = 0
        while True:
            try:
                resp = self._http.post(self.options.endpoint, content=body, headers=headers)
                verdict = judge(resp.status_code, resp.headers.get("retry-after"), resp.content, batch, ndjson)
            except httpx.RequestError as exc:  # connection, timeout, protocol, decoding
                verdict = Verdict(Outcome.RETRY, None, reason=f"{type(exc).__name__}: {exc}")
            if verdict.outcome is not Outcome.RETRY:
                return verdict
            delay = self.options.retry.delay(attempt, verdict.retry_after)
            with self._cond:
                self._pipe.retry_note(batch, attempt, verdict, delay)
            attempt += 1
            if self._abort.wait(delay):
                return None
