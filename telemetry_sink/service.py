"""TelemetryService: transport-agnostic ingest (rate limit, parse and validate, buffer) and the
writer task's lifecycle, plus the few questions an adapter asks it (health, readiness, metrics).
The HTTP adapter maps its results and IngestError to responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import Principal
from .buffer import BufferClosed, BufferFull, BufferManager
from .config import Config
from .crypto import CryptoService
from .errors import WRITE_FAILED_RETRY_S, IngestError, buffer_full, shutting_down, storage_error
from .idempotency import IdempotencyTable, Replayed, body_digest, key_digest
from .metrics import Snapshot, WriterMetrics, snapshot_of
from .otlp import FORMATS as OTLP_FORMATS
from .otlp import log_records
from .rate_limiter import RateLimited, RateLimiter
from .records import (
    DEFAULT_MAX_RECORDS,
    Encoded,
    check_permissions,
    encode_body,
    encode_records,
    fill_node_id,
    parse_body,
    parse_slices,
)
from .segment_format import KeyEntry
from .segment_writer import SegmentWriter
from .service_status import ServiceStatus

if TYPE_CHECKING:
    from .shipper import Shipper
from .speedups import record_span

log = logging.getLogger("telemetry_sink.service")
# Bodies larger than this are parsed and encoded in slices of SLICE_RECORDS records that yield to
# the event loop (~1-2 ms of work each), so no request holds it for long.
SLICE_BODY_BYTES = 65536
SLICE_RECORDS = 200
# ...unless the compiled one-pass reader takes them whole: ~5-7 ms/MiB (records.encode_body), so up
# to this size it holds the loop about as long as one slice, and costs ~0.4x the sliced path.
WHOLE_PASS_BODY_BYTES = 262144
Claim = tuple[bytes, bytes]  # (key digest, body digest) of a keyed request being stored


@dataclass
class IngestStats:
    """Plain counters, bumped on the ingest path and read by /metrics at scrape time."""

    requests_by_status: dict[int, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    records_accepted: int = 0
    bytes_received: int = 0
    fast_lane_requests: int = 0  # answered below ASGI (telemetry_sink.fast_lane)



class TelemetryService(ServiceStatus):
    """Admits requests (rate limit), stores their records in the buffer, runs the writer."""

    def __init__(
        self,
        rate_limiter: RateLimiter,
        buffer: BufferManager,
        writer: SegmentWriter,
        wall_clock: Callable[[], float] = time.time,
        durable: bool = False,
        high_water_percent: int = 90,
        idempotency: IdempotencyTable | None = None,
        otlp_node_attribute: str = "service.instance.id",
        max_records_per_request: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.rate_limiter = rate_limiter
        self.buffer = buffer
        self.writer = writer
        self.durable = durable
        self.high_water_percent = high_water_percent
        self.idempotency = idempotency  # None: Idempotency-Key headers are ignored
        self.otlp_node_attribute = otlp_node_attribute
        self.max_records_per_request = max_records_per_request
        self.closing = False
        self.writer_failure: str | None = None  # why the writer stopped for good, if it did
        self.stats = IngestStats()
        self._wall_clock = wall_clock
        self._writer_task: asyncio.Task[None] | None = None
        # Sliced bodies take turns: interleaved, every waiting connection's parsed records would be
        # held at once (tests/test_service.py measures it), and each could find the buffer full
        # only after its parse.
        self._slicing_turn = asyncio.Lock()
        self.shipper: Shipper | None = None  # set by serve when [ship] destination is set

    @property
    def can_decide_now(self) -> bool:
        """Whether every request can be answered without waiting (no durable acks, no delay-mode
        rate limit): then `ingest_now` may be used instead of `ingest`."""
        return not self.durable and not (self.rate_limiter.enabled and self.rate_limiter.mode == "delay")

    async def ingest(
        self,
        body: bytes,
        fmt: str,
        wire_bytes: int | None = None,
        principal: Principal | None = None,
        client_key: str | None = None,
        idempotency_key: bytes | None = None,
        default_node: str | None = None,
    ) -> int:
        """Store every record of one request, or none; return how many. Raises IngestError.

        `principal` (when auth is on) limits which node_ids may be written; per-node rate
        limits are keyed by the principal, else by `client_key` (the client address). A repeat
        of an answered request with the same `idempotency_key` returns a `Replayed` count and
        stores nothing. `default_node` becomes the node_id of records without one.
        """
        received_at, wait = self._admit(len(body), wire_bytes, principal, client_key)
        if wait > 0.0:
            await asyncio.sleep(wait)
        claim = self._claim(idempotency_key, principal, client_key, fmt, body)
        if isinstance(claim, Replayed):
            return claim
        try:
            if len(body) > SLICE_BODY_BYTES:
                accepted, ack = await self._store_large(body, fmt, principal, received_at, claim, default_node)
            else:
                accepted, ack = self._store(body, fmt, principal, received_at, claim, default_node)
            if ack is not None:
                try:
                    await ack
                except OSError as exc:
                    raise storage_error(exc.errno, f"{exc.__class__.__name__}: {exc.strerror or exc}") from None
                except Exception as exc:  # the writer died: nothing of this request is stored
                    raise IngestError(503, "write_failed", f"the writer stopped ({exc})",
                                      retry_after_s=WRITE_FAILED_RETRY_S) from None
        except BaseException:
            self._abandon(claim)
            raise
        return self._finish(claim, accepted)

    def ingest_now(self, body: bytes, fmt: str, wire_bytes: int | None = None, principal: Principal | None = None,
                   client_key: str | None = None, idempotency_key: bytes | None = None,
                   default_node: str | None = None) -> int:
        """`ingest` without awaiting, for when `can_decide_now`: the same rules in the same order."""
        if not self.can_decide_now:
            raise RuntimeError("ingest_now needs buffered acks and no delay-mode rate limit")
        received_at, _ = self._admit(len(body), wire_bytes, principal, client_key)
        claim = self._claim(idempotency_key, principal, client_key, fmt, body)
        if isinstance(claim, Replayed):
            return claim
        try:
            accepted = self._store(body, fmt, principal, received_at, claim, default_node)[0]
        except BaseException:
            self._abandon(claim)
            raise
        return self._finish(claim, accepted)

    def _claim(self, idempotency_key: bytes | None, principal: Principal | None, client_key: str | None,
               fmt: str, body: bytes) -> Claim | Replayed | None:
        """Begin a keyed request: None (no key, or keys off), the earlier answer of a repeat, or the
        (key, body) digests it is stored under. 409/422 (IngestError) for a key in flight or reused."""
        if idempotency_key is None or self.idempotency is None:
            return None
        scope = principal.key if principal is not None else f"addr:{client_key}"
        key, digest = key_digest(scope, idempotency_key), body_digest(fmt, body)
        replay = self.idempotency.begin(key, digest)
        return replay if replay is not None else (key, digest)

    def _abandon(self, claim: Claim | None) -> None:
        if claim is not None and self.idempotency is not None:
            self.idempotency.abandon(claim[0])  # nothing stored: a retry is a new request

    def _finish(self, claim: Claim | None, accepted: int) -> int:
        if claim is not None and self.idempotency is not None:
            self.idempotency.finish(claim[0], accepted)
        return accepted

    def _admit(self, body_bytes: int, wire_bytes: int | None, principal: Principal | None,
               client_key: str | None) -> tuple[float, float]:
        """The checks before any parsing, and the rate limit: return (receive time, delay)."""
        if self.closing:
            raise shutting_down()
        if self.writer_failure is not None:
            raise IngestError(503, "write_failed", f"the writer stopped ({self.writer_failure}); this server stores "
                              f"nothing until it is restarted", retry_after_s=WRITE_FAILED_RETRY_S)
        if self.buffer.above(100):
            # Full already: answer before spending CPU on parsing (the writer needs it).
            raise buffer_full()
        stats = self.writer.stats
        if stats.last_error is not None and (not self.durable or time.monotonic() < stats.retry_at):
            # Refuse new records while the disk refuses ours. Buffered: the writer keeps
            # retrying what it holds. Durable: it holds nothing, so after the back-off the
            # next request is let through to probe the disk.
            raise storage_error(stats.last_errno, stats.last_error)
        received_at = self._wall_clock()
        node_key = principal.key if principal is not None else client_key
        # Charge what is processed: the inflated body when it is larger than the wire bytes.
        cost = body_bytes if wire_bytes is None else max(body_bytes, wire_bytes)
        try:
            wait = self.rate_limiter.admit(cost, node_key)
        except RateLimited as exc:
            which = "per-node" if exc.per_node else "global"
            raise IngestError(429, "rate_limited", f"the {which} rate limit is exceeded",
                              retry_after_s=exc.retry_after) from None
        return received_at, wait

    def _values(self, body: bytes, fmt: str) -> list[Any]:
        if fmt in OTLP_FORMATS:
            return log_records(body, fmt, self.otlp_node_attribute)
        return parse_body(body, fmt, self.max_records_per_request)

    def _store(self, body: bytes, fmt: str, principal: Principal | None, received_at: float,
               claim: Claim | None = None, default_node: str | None = None) -> tuple[int, asyncio.Future[None] | None]:
        """Parse, validate and buffer the records (with their key, for the log): return their count
        and the durable ack (or None)."""
        encoded = self._encoded_whole(body, fmt, principal, received_at, default_node)
        if encoded is not None:
            return self._put(*encoded, claim)
        values = self._values(body, fmt)
        if default_node is not None:
            fill_node_id(values, default_node)
        plaintexts, nbytes = encode_records(values, received_at)
        return self._buffer(values, plaintexts, nbytes, principal, claim)

    def _encoded_whole(self, body: bytes, fmt: str, principal: Principal | None, received_at: float,
                       default_node: str | None) -> Encoded | None:
        """The body's plaintexts by the compiled one-pass reader, or None: the orjson path decides."""
        if default_node is not None or fmt in OTLP_FORMATS:
            return None
        encoded = encode_body(body, fmt, received_at, self.max_records_per_request)
        # A token that may not write one of the node ids: the full path names the record (403).
        if encoded is not None and principal is not None and not all(map(principal.may_write, encoded[2][2])):
            return None
        return encoded

    async def _store_large(self, body: bytes, fmt: str, principal: Principal | None, received_at: float,
                           claim: Claim | None, default_node: str | None) -> tuple[int, asyncio.Future[None] | None]:
        """`_store` for a body over SLICE_BODY_BYTES: whole in one compiled pass if it is small enough
        and canonical, else in slices, one such body at a time."""
        if len(body) <= WHOLE_PASS_BODY_BYTES:
            encoded = self._encoded_whole(body, fmt, principal, received_at, default_node)
            if encoded is not None:
                return self._put(*encoded, claim)
        async with self._slicing_turn:
            # What changed while this one waited: refuse before parsing.
            if self.closing:
                raise shutting_down()
            if self.buffer.above(100):
                raise buffer_full()
            return await self._store_yielding(body, fmt, principal, received_at, claim, default_node)

    async def _store_yielding(self, body: bytes, fmt: str, principal: Principal | None, received_at: float,
                              claim: Claim | None = None,
                              default_node: str | None = None) -> tuple[int, asyncio.Future[None] | None]:
        """`_store` for a large body: the same steps in slices of SLICE_RECORDS, yielding to the
        event loop between them (a few ms each, however large the body), all or nothing."""
        values: list[Any] = []
        if fmt in OTLP_FORMATS:  # decoded whole: OTLP's protobuf has no cheap record boundaries
            values = self._values(body, fmt)
        else:
            for piece in parse_slices(body, fmt, self.max_records_per_request, SLICE_RECORDS):
                values.extend(piece)
                await asyncio.sleep(0)
        if default_node is not None:
            fill_node_id(values, default_node)
        plaintexts: list[bytes] = []
        nbytes = 0
        for start in range(0, len(values), SLICE_RECORDS):
            piece_texts, piece_bytes = encode_records(values[start:start + SLICE_RECORDS], received_at, start)
            plaintexts += piece_texts
            nbytes += piece_bytes
            await asyncio.sleep(0)
        if self.closing:
            raise shutting_down()
        return self._buffer(values, plaintexts, nbytes, principal, claim)

    def _buffer(self, values: list[Any], plaintexts: list[bytes], nbytes: int, principal: Principal | None,
                claim: Claim | None) -> tuple[int, asyncio.Future[None] | None]:
        if principal is not None:
            check_permissions(values, principal)
        return self._put(plaintexts, nbytes, record_span(values), claim)

    def _put(self, plaintexts: list[bytes], nbytes: int, span: tuple[float, float, set[str]],
             claim: Claim | None) -> tuple[int, asyncio.Future[None] | None]:
        try:
            entry = KeyEntry(claim[0], claim[1], len(plaintexts)) if claim is not None else None
            ack = self.buffer.put(plaintexts, nbytes, want_ack=self.durable, key=entry, span=span)
        except BufferFull:
            raise buffer_full() from None
        except BufferClosed:
            raise shutting_down() from None
        return len(plaintexts), ack

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
            keyed=config.ingest.idempotency_window_s > 0,
        )
        window = config.ingest.idempotency_window_s
        return cls(
            RateLimiter(rl.bytes_per_second / workers, rl.burst_bytes / workers, rl.mode, rl.max_delay_ms / 1000,
                        per_node_bytes_per_second=rl.per_node_bytes_per_second,
                        per_node_burst_bytes=rl.per_node_burst_bytes, max_node_buckets=rl.per_node_max_buckets),
            BufferManager(config.buffer.max_records, config.buffer.max_bytes, whole_requests=durable),
            writer,
            durable=durable,
            high_water_percent=config.buffer.high_water_percent,
            idempotency=IdempotencyTable(window, config.ingest.idempotency_max_keys) if window > 0 else None,
            otlp_node_attribute=config.otlp.node_id_attribute,
            max_records_per_request=config.ingest.max_records_per_request,
        )

    def recover_keys(self) -> int:
        """Load the idempotency keys of recently logged requests (blocking; after the writer's open()).
        Returns how many."""
        if self.idempotency is None:
            return 0
        return self.idempotency.recover(self.writer.directory, self._wall_clock())

    # -- lifecycle --

    def metrics_snapshot(self) -> Snapshot:
        """Counters and gauges for one /metrics scrape."""
        return snapshot_of(self)

    @property
    def writer_alive(self) -> bool:
        return self._writer_task is not None and not self._writer_task.done()

    async def start(self) -> None:
        """Start the writer task (the writer must already be open)."""
        self._writer_task = asyncio.create_task(self.writer.run(self.buffer), name="telemetry-writer")
        self._writer_task.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if task.cancelled():
            exc: BaseException = RuntimeError("the writer was cancelled")
        else:
            exc = error if error is not None else RuntimeError("the writer stopped")
        if not self.buffer.closed:
            # Not the drain at shutdown: the writer cannot continue. Say so everywhere (log,
            # /healthz, /readyz) and refuse every request from now on rather than acknowledge
            # records nothing will store.
            self.writer_failure = f"{exc.__class__.__name__}: {exc}"
            self.writer.stats.last_error = f"the writer stopped: {self.writer_failure}"
            log.critical("the writer stopped and cannot continue (%s); every request is refused with 503 and %d "
                         "buffered records cannot be written; fix the cause and restart the server",
                         self.writer_failure, self.buffer.records, exc_info=error,
                         extra={"event": "writer_stopped", "records": self.buffer.records})
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
        if self.shipper is not None:  # upload what just sealed, briefly; the rest ships after a restart
            await asyncio.get_running_loop().run_in_executor(None, self.shipper.stop, timeout_s)
        stats = self.writer.stats
        # Buffered acks: what is still buffered was acknowledged and is lost. Durable: those
        # requests were answered 503 (their acks failed), so nothing acknowledged is lost.
        lost = 0 if self.durable else self.buffer.records
        if lost and self.writer_failure is not None:
            log.error("shutdown: %d acknowledged records were lost: the writer stopped (%s)", lost,
                      self.writer_failure, extra={"event": "shutdown_records_lost", "records": lost})
        log.info("shutdown complete: %d records in %d batches written this run, %d acknowledged records lost; "
                 "next sequence number %d", stats.records, stats.batches, lost, self.writer.next_seq,
                 extra={"event": "shutdown", "records_written": stats.records, "batches": stats.batches,
                        "records_lost": lost,
                        "write_errors": stats.write_errors, "records_accepted": self.stats.records_accepted,
                        "requests_by_status": {str(k): v for k, v in self.stats.requests_by_status.items()}})
