"""SegmentWriter: the one background task that frames, encrypts and appends batches to segments.

All file work (framing, write, fsync, truncate) runs on one dedicated thread so the event
loop never blocks on the disk, and batches stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import segment_format, segment_keys
from .buffer import BufferManager
from .config import FSYNC_POLICIES
from .crypto import CryptoService
from .metrics import WriterMetrics
from .segment_files import apply_retention, create_segment
from .segment_format import MAX_SEQ, write_all
from .segment_index import Span, write_index
from .segment_recovery import (
    Recovery,
    WriterLockedError,
    WriterStartError,
    check_directory,
    open_nofollow,
    recover_series,
)

__all__ = ["Recovery", "SegmentWriter", "SequenceExhausted", "WriterLockedError", "WriterStartError"]

log = logging.getLogger("telemetry_sink.writer")

_BACKOFF_MIN_S = 0.05
# With a backlog, up to this many full batches go to the writer thread in one hand-off.
MAX_BATCHES_PER_WRITE = 8
# With a backlog, a second hand-off waits in the writer thread's queue behind the one it writes, so
# the thread does not idle until the busy event loop comes round to hand it more (100-record arrays
# at saturation: the thread idled ~40 % of the time with one; with two, accepted records/s B/A median
# 1.11 over 7 rounds, docs/BENCHMARKS.md).
HAND_OFFS_IN_FLIGHT = 2
_BACKOFF_MAX_S = 2.0


class SequenceExhausted(RuntimeError):
    """The series has used every 64-bit sequence number: the writer cannot continue."""


class _Skipped(Exception):
    """A hand-off queued behind a write that failed: not attempted, retried after it, in order."""


@dataclass(slots=True)
class WriterStats:
    """Counters and the current write-failure state (shown on /healthz)."""

    batches: int = 0
    records: int = 0
    bytes: int = 0
    write_errors: int = 0
    segments_deleted: int = 0
    last_error: str | None = None  # set while writes are failing, cleared by the next success
    last_errno: int | None = None
    retry_at: float = 0.0  # time.monotonic() of the next write attempt after a failure


class SegmentWriter:
    """Appends encrypted batches to the segment series it claims in `directory`."""

    def __init__(
        self,
        directory: Path,
        crypto: CryptoService,
        *,
        batch_size: int,
        flush_interval_ms: int,
        fsync: str,
        fsync_interval_ms: int,
        max_segment_bytes: int,
        max_segment_age_s: int = 0,
        retention_bytes: int = 0,
        retention_days: int = 0,
        durable: bool = False,
        workers: int = 1,
        metrics: WriterMetrics | None = None,
        keyed: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, not {fsync!r}")
        self.directory = directory
        self.batch_size = batch_size
        self.linger_s = flush_interval_ms / 1000
        self.fsync_policy = fsync
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age_s = max_segment_age_s
        self.retention_bytes = retention_bytes
        self.retention_days = retention_days
        # Durable acks: fsync every batch (one fsync serves every request in it, a group
        # commit) and fail a batch's requests instead of retrying it.
        self.durable = durable
        self.workers = workers
        self.metrics = metrics
        # Idempotency keys on: new segments are flagged FLAG_KEYED, and batches carry their keys.
        self.keyed = keyed
        self.stats = WriterStats()
        self.series: str | None = None
        self.next_seq = 0
        self._framer = crypto.new_framer()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry-writer")
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment: Path | None = None
        self._size = 0
        self._segment_born = 0.0  # wall time of the active segment's first batch
        self._dirty = False
        self._halted = False  # a write failed: the thread skips what is queued behind it (_write_queued)
        self._last_fsync = 0.0
        # What the active segment's records can hold (its index at seal); None: unknown (a segment
        # reopened after a restart, or records that came without a span), so it gets no index.
        self._span: Span | None = None
        # Shipping hooks (telemetry_sink.shipper): told of every seal; asked before retention deletes;
        # with shipping on, a segment once closed is never appended to again, even after a restart.
        self.on_sealed: Callable[[Path], None] | None = None
        self.may_delete: Callable[[Path], bool] | None = None
        self.reopen_tail = True

    # -- set-up and tear-down (blocking; call before the loop runs or via the executor) --

    def open(self) -> Recovery:
        """Claim a series (an flock'd lock file per slot), recover its tail, open for append."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Twice as many series as workers: a replacement worker started while its predecessor
        # still drains (uvicorn's restart on SIGHUP) takes a spare series instead of failing.
        for slot in range(self.workers if self.workers == 1 else 2 * self.workers):
            series = f"w{slot}"
            fd = open_nofollow(self.directory / f"{series}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.series = fd, series
            break
        else:
            raise WriterLockedError(
                f"{self.directory}: every segment series is locked by another running writer"
            )
        foreign = check_directory(self.directory)
        if foreign:
            log.warning("ignoring %d file(s) in %s not named as segments are (<series>-<20 digits>.tslog): %s",
                        len(foreign), self.directory, ", ".join(p.name for p in foreign[:5]),
                        extra={"event": "foreign_segment_names", "files": [p.name for p in foreign]})
        recovery = recover_series(self.directory, self.series)
        self.next_seq = recovery.next_seq
        if recovery.segment is not None and self.reopen_tail and \
                recovery.segment.stat().st_size < self.max_segment_bytes and \
                self._may_append_to(recovery.segment):
            self._open_segment(recovery.segment, create=False)
            if recovery.first_created_ms is not None:
                self._segment_born = recovery.first_created_ms / 1000
        return recovery

    def _may_append_to(self, segment: Path) -> bool:
        """A keyed writer appends only to a segment flagged keyed; else it starts a new one (which
        replaces the old one if that holds no batch: see _create_segment)."""
        if not self.keyed:
            return True
        with segment_format.SegmentImage(segment) as image:
            return bool(image.flags & segment_format.FLAG_KEYED)

    def _open_segment(self, path: Path, create: bool) -> None:
        if create:
            fd = create_segment(path, segment_format.file_header_bytes(segment_format.FLAG_KEYED if self.keyed else 0))
            log.info("opened segment %s", path.name, extra={"event": "segment_opened", "segment": path.name})
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._span = Span.empty() if create else None
        self._fd, self._segment = fd, path
        self._size = os.fstat(fd).st_size
        self._segment_born = time.time()

    def _seal(self) -> None:
        """Fsync and close the active segment; the fd is closed even when the fsync fails."""
        if self._fd is None:
            return
        fd, name, sealed = self._fd, self._segment.name if self._segment else "?", self._segment
        self._fd, self._segment, self._dirty = None, None, False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("sealed segment %s (%d bytes)", name, self._size,
                 extra={"event": "segment_sealed", "segment": name, "bytes": self._size})
        if sealed is not None and self._span is not None and self._span.records:
            try:
                write_index(sealed, self._size, segment_format.parse_segment_name(sealed)[1], self.next_seq, self._span)
            except (OSError, ValueError, TypeError) as exc:  # only a hint: readers then read it in full
                log.warning("could not write the index of %s: %s", name, exc)
        self._span = None
        if self.on_sealed is not None and sealed is not None:
            self.on_sealed(sealed)

    def close(self) -> None:
        """Fsync and close the active segment and release the series lock."""
        self._seal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._executor.shutdown(wait=True)

    # -- the writer thread --

    def _write_queued(self, batches: list[list[bytes]], keys: list[list[segment_format.KeyEntry]] | None,
                      span: Span | None) -> None:
        """One hand-off on the writer thread: `_write_batches`, unless a write before it failed (then
        _Skipped, until `run` has dealt with that failure), so that no batch is written out of order."""
        if self._halted:
            raise _Skipped
        try:
            self._write_batches(batches, keys, span)
        except BaseException:
            self._halted = True
            raise

    def _write_batches(self, batches: list[list[bytes]],
                       keys: list[list[segment_format.KeyEntry]] | None = None, span: Span | None = None) -> None:
        """Frame and encrypt each batch (with its requests' idempotency `keys`, if any), then append
        them all with one write (and one fsync); `span` is what their records can hold (None: unknown)."""
        assert self.series is not None, "open() first"
        started = time.perf_counter()
        now = time.time()
        created_ms = int(now * 1000)
        seq = self.next_seq
        if seq + sum(map(len, batches)) - 1 > MAX_SEQ:
            raise SequenceExhausted(f"series {self.series} has used every sequence number up to {MAX_SEQ}")
        if keys and any(keys):
            frames: list[bytes | memoryview] = []
            for i, records in enumerate(batches):
                frame = self._framer.frame(seq, created_ms, records)
                if keys[i]:
                    frames.extend(segment_keys.keyed_parts(frame, keys[i]))
                else:
                    frames.append(frame)
                seq += len(records)
            data = b"".join(frames)
        else:
            # One GIL release for every batch of the hand-off: under load the event loop holds the
            # GIL, and each re-take cost this thread up to a switch interval (py-spy, 100-record
            # arrays: ~35 % of the thread's time when each batch was framed by its own call).
            data = self._framer.frame_many(seq, created_ms, batches)
            seq += sum(map(len, batches))
        if self._fd is not None and self._too_old(now):
            self._seal()
        if self._fd is None:
            self._open_segment(self.directory / segment_format.segment_name(self.series, self.next_seq), create=True)
        assert self._fd is not None
        due = self.fsync_policy == "interval" and time.monotonic() - self._last_fsync >= self.fsync_interval_s
        try:
            write_all(self._fd, data)
            self._dirty = True
            if self.durable or self.fsync_policy == "batch" or due:
                self._fsync()
        except OSError:
            # Not stored (or not durably): cut it off, so the retry cannot store it twice.
            self._undo_partial_write()
            raise
        self._size += len(data)
        self.next_seq = seq
        if self._span is not None:
            if span is None:
                self._span = None
            else:
                self._span.merge(span)
        if self.metrics is not None:
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            for records in batches:
                self.metrics.batch_records.observe(len(records))
        if self._size >= self.max_segment_bytes:
            # The batch is stored: a failure from here on must not make it be written again.
            try:
                self._seal()
                self._apply_retention()
            except OSError as exc:
                log.error("after a write to %s: sealing or retention failed: %s", self.directory, exc)
        self.stats.batches += len(batches)
        self.stats.records += sum(map(len, batches))
        self.stats.bytes += len(data)

    def _undo_partial_write(self) -> None:
        """Cut whatever part of a failed batch reached the file, or abandon the segment."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            # The file now ends in a torn batch we cannot remove: leave it to readers'
            # resynchronisation and continue in a fresh segment.
            log.error("could not truncate %s after a failed write; starting a new segment", self._segment)
            os.close(self._fd)
            self._fd, self._segment = None, None

    def _too_old(self, now: float) -> bool:
        return self.max_segment_age_s > 0 and now - self._segment_born >= self.max_segment_age_s

    def _apply_retention(self) -> None:
        """Delete this series' oldest sealed segments beyond the size or age budget."""
        if not (self.retention_bytes or self.retention_days) or self.series is None:
            return
        # Workers share the size budget evenly; never the active segment (always the newest).
        self.stats.segments_deleted += apply_retention(self.directory, self.series, self._segment,
                                                       self.retention_bytes / self.workers, self.retention_days,
                                                       self.may_delete)

    def _housekeeping(self) -> None:
        """Periodic, on the writer thread: fsync an idle tail, seal an aged segment, retention."""
        if self.fsync_policy == "interval" and self._dirty and \
                time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            self._fsync()
        if self._fd is not None and self._too_old(time.time()):
            self._seal()
        self._apply_retention()

    def _fsync(self) -> None:
        if self._fd is not None and self._dirty:
            started = time.perf_counter()
            os.fsync(self._fd)
            self._dirty = False
            if self.metrics is not None:
                self.metrics.fsync_seconds.observe(time.perf_counter() - started)
        self._last_fsync = time.monotonic()

    # -- the event-loop side --

    async def run(self, buffer: BufferManager) -> None:
        """Write batches until the buffer is closed and drained; then fsync and close."""
        loop = asyncio.get_running_loop()
        ticker = asyncio.create_task(self._ticker())
        backoff = _BACKOFF_MIN_S
        # Hand-offs given to the writer thread, oldest first: their batches and the future of the write.
        in_flight: deque[tuple[list[list[bytes]], asyncio.Future[None]]] = deque()

        def hand_off(batches: list[list[bytes]]) -> None:
            keys = buffer.keys_of(batches) if self.keyed else None
            span = buffer.span_of(batches)
            in_flight.append((batches, loop.run_in_executor(self._executor, self._write_queued, batches, keys, span)))

        try:
            while True:
                if not in_flight:
                    batches = await buffer.next_batches(self.batch_size, self.linger_s, MAX_BATCHES_PER_WRITE)
                    if not batches:
                        return
                    hand_off(batches)
                if len(in_flight) < HAND_OFFS_IN_FLIGHT and buffer.queued >= self.batch_size:
                    # A full batch waits already: next_batches returns it at once.
                    hand_off(await buffer.next_batches(self.batch_size, self.linger_s, MAX_BATCHES_PER_WRITE))
                batches, written = in_flight[0]
                try:
                    await written
                except SequenceExhausted:
                    raise  # nothing can be written any more: the service stops taking requests
                except Exception as exc:
                    # The hand-offs behind it are skipped by the thread: retried after it, in order.
                    skipped: list[list[bytes]] = []
                    for later_batches, later in list(in_flight)[1:]:
                        with contextlib.suppress(_Skipped):  # anything else is a bug: the writer stops
                            await later
                        skipped += later_batches
                    in_flight.clear()
                    self._halted = False  # the thread has nothing queued now
                    self._failed(exc, batches, buffer, backoff, skipped)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                in_flight.popleft()
                if self.stats.last_error is not None:
                    log.warning("writes succeed again after %s", self.stats.last_error)
                    self.stats.last_error = self.stats.last_errno = None
                backoff = _BACKOFF_MIN_S
                for batch in batches:
                    buffer.stored(batch)
        finally:
            ticker.cancel()
            for _, written in in_flight:  # only after SequenceExhausted (or cancellation)
                written.cancel()
            await loop.run_in_executor(self._executor, self._seal_quietly)

    def _failed(self, exc: Exception, batches: list[list[bytes]], buffer: BufferManager, backoff: float,
                skipped: list[list[bytes]]) -> None:
        """A write failed: note it (ingest refuses while it stands), then fail or requeue its batches,
        and requeue the `skipped` ones taken after them (never attempted)."""
        stats = self.stats
        stats.write_errors += 1
        if isinstance(exc, OSError):
            stats.last_errno = exc.errno
            stats.last_error = f"{exc.__class__.__name__}: {exc.strerror or exc}"
        else:
            # Not the disk: a bug or an impossible state. Handled the same way (nothing acknowledged
            # is dropped), but with its traceback, since no operator action fixes it.
            if stats.last_error is None or stats.last_errno is not None:
                log.exception("unexpected error in the writer", exc_info=exc)
            stats.last_errno = None
            stats.last_error = f"{exc.__class__.__name__}: {exc}"
        stats.retry_at = time.monotonic() + backoff
        records = [r for batch in batches for r in batch]
        if self.durable:
            # Nobody got a 202 for these: fail their requests rather than retry.
            log.error("write of %d records failed (%s); failing their requests", len(records),
                      stats.last_error, extra={"event": "write_error"})
            for batch in batches:
                buffer.discard(batch, exc)
            if skipped:
                buffer.requeue([r for batch in skipped for r in batch])
        else:
            # These were acknowledged: keep them and retry until the disk recovers.
            log.error("write of %d records failed (%s); retrying in %.2fs", len(records),
                      stats.last_error, backoff, extra={"event": "write_error"})
            buffer.requeue(records + [r for batch in skipped for r in batch])

    def _seal_quietly(self) -> None:
        try:
            self._seal()
        except OSError as exc:
            log.error("final fsync/close of %s failed: %s", self._segment, exc)

    async def _ticker(self) -> None:
        """Run housekeeping on the writer thread at least once a second."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.fsync_interval_s)
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(self._executor, self._housekeeping)
            except OSError as exc:
                log.error("housekeeping in %s failed: %s", self.directory, exc)
            except Exception:
                log.exception("housekeeping in %s failed", self.directory)
