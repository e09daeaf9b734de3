"""TelemetryService: transport-agnostic ingest (parse, validate, rate limit, buffer) and the
writer task's lifecycle. The HTTP adapter maps its results and IngestError to responses.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .auth import Principal
from .buffer import BufferClosed, BufferFull, BufferManager
from .config import Config
from .crypto import CryptoService
from .metrics import WriterMetrics
from .rate_limiter import RateLimited, RateLimiter
from .segment_writer import SegmentWriter

log = logging.getLogger("telemetry_sink.service")

MAX_NODE_ID_CHARS = 128
_MISSING = object()
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITE_FAILED_RETRY_AFTER = "2"


class IngestError(Exception):
    """A request that stores nothing: HTTP-ish status, error code, detail, extra headers."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        index: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.index = index
        self.retry_after = retry_after
        self.headers: list[tuple[bytes, bytes]] = []  # extra response headers (e.g. WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.index is not None:
            out["index"] = self.index
        out["detail"] = self.detail
        return out


def _invalid(index: int, detail: str) -> IngestError:
    return IngestError(422, "invalid_record", detail, index=index)


def shutting_down() -> IngestError:
    return IngestError(503, "shutting_down", "the server is shutting down")


def _buffer_full() -> IngestError:
    return IngestError(503, "buffer_full", "the write buffer is full; retry later",
                       retry_after=BufferFull.retry_after_header)


def _storage_error(err: int | None, what: str) -> IngestError:
    """507 when the disk is full, else 503: the log cannot be written right now."""
    if err in _DISK_FULL:
        return IngestError(507, "insufficient_storage", f"the log disk is full ({what})",
                           retry_after=WRITE_FAILED_RETRY_AFTER)
    return IngestError(503, "write_failed", f"the log cannot be written ({what})",
                       retry_after=WRITE_FAILED_RETRY_AFTER)


def parse_body(body: bytes, fmt: str) -> list[Any]:
    """Decode a JSON (object or array of objects) or NDJSON body into a list of values."""
    if fmt == "ndjson":
        values: list[Any] = []
        for lineno, line in enumerate(body.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                values.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise IngestError(400, "invalid_json", f"line {lineno}: {exc}") from None
        if not values:
            raise _invalid(0, "the body holds no records")
        return values
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, "invalid_json", str(exc)) from None
    if type(doc) is dict:
        return [doc]
    if type(doc) is list:
        if not doc:
            raise _invalid(0, "the array holds no records")
        return doc
    raise _invalid(0, f"the body must be a JSON object or an array of objects, not {_json_type(doc)}")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def encode_records(values: list[Any], received_at: float) -> tuple[list[bytes], int]:
    """Validate every record (all or nothing), add missing `ts`, return plaintexts and their size."""
    for index, record in enumerate(values):
        if type(record) is not dict:
            raise _invalid(index, f"a record must be a JSON object, not {_json_type(record)}")
        node_id = record.get("node_id")
        if type(node_id) is not str:
            if node_id is None and "node_id" not in record:
                raise _invalid(index, "node_id is missing")
            raise _invalid(index, f"node_id must be a string, not {_json_type(node_id)}")
        if not 0 < len(node_id) <= MAX_NODE_ID_CHARS:
            raise _invalid(index, f"node_id must be 1 to {MAX_NODE_ID_CHARS} characters, not {len(node_id)}")
        ts = record.get("ts", _MISSING)
        if ts is _MISSING:
            record["ts"] = received_at
        elif type(ts) is not float and type(ts) is not int:
            raise _invalid(index, f"ts must be a number (Unix seconds), not {_json_type(ts)}")
    dumps = orjson.dumps
    try:
        # orjson returns each result in an oversized allocation (about 4 KiB for a 150-byte
        # record) that it never shrinks: copying to an exact-size bytes keeps a full buffer at
        # ~20 MiB instead of ~400 MiB, and is faster too (the big block is reused at once).
        plaintexts = [bytes(memoryview(dumps(r))) for r in values]
    except orjson.JSONEncodeError:
        # orjson parses deeper nesting than it will serialise: name the record, no 500.
        for index, record in enumerate(values):
            try:
                dumps(record)
            except orjson.JSONEncodeError as exc:
                raise _invalid(index, f"the record cannot be stored: {exc}") from None
        raise
    return plaintexts, sum(map(len, plaintexts))


@dataclass
class IngestStats:
    """Plain counters, bumped on the ingest path and read by /metrics at scrape time."""

    requests_by_status: dict[int, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    records_accepted: int = 0
    bytes_received: int = 0


def check_permissions(values: list[Any], principal: Principal) -> None:
    """403 naming the first record whose node_id the token may not write."""
    for index, record in enumerate(values):
        if not principal.may_write(record["node_id"]):
            raise IngestError(403, "forbidden", f"this token may not write node_id {record['node_id']!r}",
                              index=index)


class TelemetryService:
    """Admits requests (rate limit), stores their records in the buffer, runs the writer."""

    def __init__(
        self,
        rate_limiter: RateLimiter,
        buffer: BufferManager,
        writer: SegmentWriter,
        wall_clock: Callable[[], float] = time.time,
        durable: bool = False,
    ) -> None:
        self.rate_limiter = rate_limiter
        self.buffer = buffer
        self.writer = writer
        self.durable = durable
        self.closing = False
        self.stats = IngestStats()
        self._wall_clock = wall_clock
        self._writer_task: asyncio.Task[None] | None = None

    async def ingest(
        self,
        body: bytes,
        fmt: str,
        wire_bytes: int | None = None,
        principal: Principal | None = None,
        client_key: str | None = None,
    ) -> int:
        """Store every record of one request, or none; return how many. Raises IngestError.

        `principal` (when auth is on) limits which node_ids may be written; per-node rate
        limits are keyed by the principal, else by `client_key` (the client address).
        """
        if self.closing:
            raise shutting_down()
        if self.buffer.above(100):
            # Full already: answer before spending CPU on parsing (the writer needs it).
            raise _buffer_full()
        stats = self.writer.stats
        if stats.last_error is not None and (not self.durable or time.monotonic() < stats.retry_at):
            # Refuse new records while the disk refuses ours. Buffered: the writer keeps
            # retrying what it holds. Durable: it holds nothing, so after the back-off the
            # next request is let through to probe the disk.
            raise _storage_error(stats.last_errno, stats.last_error)
        received_at = self._wall_clock()
        node_key = principal.key if principal is not None else client_key
        try:
            wait = self.rate_limiter.admit(len(body) if wire_bytes is None else wire_bytes, node_key)
        except RateLimited as exc:
            which = "per-node" if exc.per_node else "global"
            raise IngestError(429, "rate_limited", f"the {which} rate limit is exceeded",
                              retry_after=exc.retry_after_header) from None
        if wait > 0.0:
            await asyncio.sleep(wait)
        values = parse_body(body, fmt)
        plaintexts, nbytes = encode_records(values, received_at)
        if principal is not None:
            check_permissions(values, principal)
        try:
            ack = self.buffer.put(plaintexts, nbytes, want_ack=self.durable)
        except BufferFull:
            raise _buffer_full() from None
        except BufferClosed:
            raise shutting_down() from None
        if ack is not None:
            try:
                await ack
            except OSError as exc:
                raise _storage_error(exc.errno, f"{exc.__class__.__name__}: {exc.strerror or exc}") from None
            except Exception as exc:  # the writer died: nothing of this request is stored
                raise IngestError(503, "write_failed", f"the writer stopped ({exc})",
                                  retry_after=WRITE_FAILED_RETRY_AFTER) from None
        return len(plaintexts)

    @classmethod
    def from_config(cls, config: Config, crypto: CryptoService, workers: int = 1,
                    metrics: WriterMetrics | None = None) -> TelemetryService:
        """Wire the components as `serve` runs them; the writer still has to be open()ed."""
        w, rl = config.writer, config.rate_limit
        durable = config.ingest.ack == "durable"
        writer = SegmentWriter(
            w.directory, crypto, batch_size=w.batch_size, flush_interval_ms=w.flush_interval_ms, fsync=w.fsync,
            fsync_interval_ms=w.fsync_interval_ms, max_segment_bytes=w.max_segment_bytes,
            max_segment_age_s=w.max_segment_age_s, retention_bytes=w.retention_bytes,
            retention_days=w.retention_days, durable=durable, workers=workers, metrics=metrics,
        )
        return cls(
            RateLimiter(rl.bytes_per_second / workers, rl.burst_bytes / workers, rl.mode, rl.max_delay_ms / 1000,
                        per_node_bytes_per_second=rl.per_node_bytes_per_second,
                        per_node_burst_bytes=rl.per_node_burst_bytes, max_node_buckets=rl.per_node_max_buckets),
            BufferManager(config.buffer.max_records, config.buffer.max_bytes, whole_requests=durable),
            writer,
            durable=durable,
        )

    @property
    def writer_alive(self) -> bool:
        return self._writer_task is not None and not self._writer_task.done()

    async def start(self) -> None:
        """Start the writer task (the writer must already be open)."""
        self._writer_task = asyncio.create_task(self.writer.run(self.buffer), name="telemetry-writer")
        self._writer_task.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            exc: BaseException = RuntimeError("the writer was cancelled")
        elif task.exception() is not None:
            exc = task.exception()  # type: ignore[assignment]
            log.error("the writer task died: %r", exc)
        else:
            exc = RuntimeError("the writer stopped")
        self.closing = True
        self.buffer.fail_acks(exc)

    def begin_shutdown(self) -> None:
        """Stop accepting requests (they get 503); in-flight ones finish."""
        self.closing = True

    async def stop(self, timeout_s: float) -> None:
        """Drain the buffer to disk, fsync and close; log what could not be written in time."""
        self.closing = True
        self.buffer.close()
        task = self._writer_task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except TimeoutError:
                log.error("shutdown: %d buffered records were not written within %ss", self.buffer.records,
                          timeout_s, extra={"event": "shutdown_records_lost", "records": self.buffer.records})
                task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
        stats = self.writer.stats
        log.info("shutdown complete: %d records in %d batches written this run; next sequence number %d",
                 stats.records, stats.batches, self.writer.next_seq,
                 extra={"event": "shutdown", "records_written": stats.records, "batches": stats.batches,
                        "write_errors": stats.write_errors, "records_accepted": self.stats.records_accepted,
                        "requests_by_status": {str(k): v for k, v in self.stats.requests_by_status.items()}})
