"""What the sync and async front ends share: the pending store, the batching rules, the bound and its policy,
the counters, and how one HTTP answer is judged. No I/O of its own and no locking: the front ends do both."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson

from .batching import Batch, split_lines
from .errors import RejectedError
from .options import ClientOptions
from .pending import MemoryPending, PendingStore
from .retry import Outcome, classify, parse_retry_after
from .spool import DiskSpool

log = logging.getLogger("telemetry_sink.client")


@dataclass
class Stats:
    """Counters since the client was created (`client.stats`)."""

    records_sent: int = 0
    batches_sent: int = 0
    retries: int = 0
    records_rejected: int = 0
    records_dropped: int = 0  # full_policy = "drop_oldest" only; each drop is also logged as a warning


@dataclass(frozen=True)
class Verdict:
    """One attempt's result: delivered, retry (after `retry_after` if the server said), or rejected."""

    outcome: Outcome
    status: int | None
    retry_after: float | None = None
    error: RejectedError | None = None
    reason: str = ""


def judge(status: int, retry_after: str | None, body: bytes, batch: Batch, ndjson: bytes) -> Verdict:
    """Turn an HTTP answer into a Verdict; a refusal carries the server's error, detail and index."""
    outcome = classify(status)
    if outcome is Outcome.RETRY:
        return Verdict(outcome, status, parse_retry_after(retry_after), reason=f"HTTP {status}")
    if outcome is Outcome.DELIVERED:
        return Verdict(outcome, status)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    info = parsed if isinstance(parsed, dict) else {}
    index = info.get("index")
    detail = info.get("detail") if info else body[:200].decode(errors="replace")
    error = RejectedError(status, str(info["error"]) if "error" in info else None, str(detail) if detail else None,
                          index if type(index) is int else None, split_lines(ndjson), batch.key)
    return Verdict(outcome, status, error=error)


def open_store(options: ClientOptions) -> PendingStore:
    if options.spool_dir is None:
        return MemoryPending()
    return DiskSpool(Path(options.spool_dir), fsync=options.spool_fsync == "batch")


class Pipeline:
    """Batching and bookkeeping over a PendingStore; one batch in flight at a time, oldest first."""

    def __init__(self, options: ClientOptions, store: PendingStore) -> None:
        self.options = options
        self.store = store
        self.stats = Stats()
        self.errors: deque[RejectedError] = deque()
        self.in_flight: Batch | None = None

    def raise_error(self) -> None:
        """Raise the oldest refusal not yet reported to the caller (each is raised once)."""
        if self.errors:
            raise self.errors.popleft()

    def must_seal_before(self, line: bytes) -> bool:
        """True when `line` would take the open batch's body past max_batch_bytes."""
        return self.store.open_records > 0 and self.store.open_bytes + len(line) + 2 > self.options.max_batch_bytes

    def append(self, line: bytes) -> tuple[bool, bool]:
        """Add one record to the open batch; returns (it was the first, the batch is now full by count)."""
        self.store.append(line)
        return self.store.open_records == 1, self.store.open_records >= self.options.max_batch_records

    def room_for(self, line: bytes) -> bool:
        """Whether `line` fits under max_pending_bytes; with drop_oldest, makes room by dropping old batches."""
        need = self.store.total_bytes + len(line) + 1 - self.options.max_pending_bytes
        while need > 0 and self.options.full_policy == "drop_oldest":
            victim = self.store.oldest(skip=self.in_flight)
            if victim is None:
                return False  # only the batch on the wire is left: wait for it, as "block" would
            self.store.remove(victim)
            self.stats.records_dropped += victim.records
            need -= victim.nbytes
            log.warning("client buffer full (max_pending_bytes %d): dropped the oldest batch of %d records "
                        "(%d dropped so far)", self.options.max_pending_bytes, victim.records,
                        self.stats.records_dropped)
        return need <= 0

    def due_in(self, now: float) -> float | None:
        """Seconds until the open batch must be sealed by age (None: no open batch)."""
        if not self.store.open_records:
            return None
        return max(0.0, self.store.open_since + self.options.max_batch_age_s - now)

    def seal_due(self) -> bool:
        due = self.due_in(time.monotonic())
        return due is not None and due <= 0

    def next_batch(self) -> Batch | None:
        """The oldest sealed batch, now in flight."""
        self.in_flight = self.store.oldest()
        return self.in_flight

    def finished(self, batch: Batch, verdict: Verdict | None) -> None:
        """Record the last attempt's verdict (None: aborted by close, the batch stays pending)."""
        self.in_flight = None
        if verdict is None:
            return
        if verdict.outcome is Outcome.DELIVERED:
            self.store.remove(batch)
            self.stats.records_sent += batch.records
            self.stats.batches_sent += 1
        elif verdict.error is not None:
            self.store.reject(batch, verdict.error)
            self.stats.records_rejected += batch.records
            self.errors.append(verdict.error)
            log.error("%s", verdict.error)

    def pending_records(self) -> int:
        return self.store.open_records + self.store.sealed_records()

    def idle(self) -> bool:
        """Nothing left to deliver."""
        return self.in_flight is None and self.store.oldest() is None and not self.store.open_records

    def retry_note(self, batch: Batch, attempt: int, verdict: Verdict, delay: float) -> None:
        """Count a retry; log the first and every tenth, so an outage is visible without flooding the log."""
        self.stats.retries += 1
        if attempt == 0 or attempt % 10 == 9:
            log.warning("batch of %d records not delivered (%s, attempt %d); retrying in %.1f s with the same "
                        "Idempotency-Key", batch.records, verdict.reason, attempt + 1, delay)
