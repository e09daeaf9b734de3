"""The shipper: uploads sealed segments to object storage on its own threads, off the event loop.

Only sealed segments are shipped (the writer reports each seal; a restart finds the rest), each as one
object under an idempotent key, create-only. A confirmed upload is recorded (ship_state: a marker file
per segment, written atomically), so the shipped state survives crashes: whatever was sealed but not
confirmed is uploaded again after a restart, which is harmless because the key is the same and an equal
object already there counts as success. Until it is confirmed a segment may not be deleted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import segment_format
from .config import ShipConfig
from .objstore import Bucket, Destination, ObjectStoreError, StoreSettings, object_key, parse_url
from .segment_format import fsync_dir
from .segment_index import remove_index
from .ship_metrics import ShipMetrics
from .ship_state import ShippedState

log = logging.getLogger("telemetry_sink.shipper")

AFTER_UPLOAD = ("keep", "delete")


@dataclass(frozen=True, slots=True)
class ShipSettings:
    destination: Destination
    instance_id: str
    concurrency: int = 2
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    after_upload: str = "keep"
    unhealthy_after_s: float = 300.0


@dataclass(slots=True)
class _Pending:
    path: Path
    size: int
    sealed_at: float  # wall time
    key: str | None = None
    attempts: int = 0
    next_try: float = 0.0  # time.monotonic()
    in_flight: bool = False


@dataclass(slots=True)
class ShipStatus:
    """What /healthz, /readyz and the metrics show about shipping."""

    waiting_segments: int = 0
    waiting_bytes: int = 0
    oldest_unshipped_age_s: float = 0.0
    failing_for_s: float = 0.0  # 0 while the last upload attempt succeeded
    last_error: str | None = None
    conflicts: list[str] = field(default_factory=list)  # object keys holding different content


def _identity(path: Path) -> tuple[int, int, int]:
    """Inode, size and mtime: they change if the file is replaced or written to."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _ends_cleanly(path: Path) -> bool:
    """True unless the segment ends in a torn batch (what recovery would cut off)."""
    try:
        with segment_format.SegmentImage(path) as image:
            return not any(isinstance(item, segment_format.Damage) and item.kind == "torn"
                           for item in image.batches())
    except (OSError, segment_format.SegmentFormatError):
        return False


def first_created_ms(path: Path) -> int:
    """Creation time of the segment's first intact batch (its key's date), else the file's mtime."""
    with segment_format.SegmentImage(path) as image:
        for item in image.batches():
            if isinstance(item, segment_format.Batch):
                return item.created_ms
    return int(path.stat().st_mtime * 1000)


class Shipper:
    """Ships one series' sealed segments from `directory` to `bucket` with bounded concurrency."""

    def __init__(self, directory: Path, settings: ShipSettings, bucket: Bucket,
                 metrics: ShipMetrics | None = None) -> None:
        self.directory = directory
        self.settings = settings
        self.bucket = bucket
        self.metrics = metrics
        self.failures: Counter[str] = Counter()
        self.uploaded = 0
        self.state = ShippedState(directory)
        self._cond = threading.Condition()
        self._pending: dict[Path, _Pending] = {}
        self._conflicts: dict[Path, str] = {}
        self._failing_since: float | None = None  # monotonic
        self._last_error: str | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        if metrics is not None:
            metrics.bind(self.status)

    @classmethod
    def from_config(cls, ship: ShipConfig, directory: Path, metrics: ShipMetrics | None = None) -> Shipper:
        """The shipper `[ship]` describes (destination set), with this instance's id resolved."""
        from .instance import resolve_instance_id

        settings = ShipSettings(parse_url(ship.destination), resolve_instance_id(ship.instance_id, directory),
                                ship.concurrency, ship.retry_initial_ms / 1000, ship.retry_max_ms / 1000,
                                ship.after_upload, ship.unhealthy_after_s)
        store = StoreSettings(ship.endpoint_url, ship.region, ship.allow_http, ship.request_timeout_s)
        return cls(directory, settings, Bucket(settings.destination, store), metrics)

    # -- the writer's side --

    def start(self, series: str) -> None:
        """Queue every sealed, unconfirmed segment of `series` (and of series no running writer holds, e.g.
        left by a run with more workers) found on disk, then start the upload threads.

        Call after the writer opened (it never re-opens an old segment while shipping is on, so all
        segments of its series on disk now are sealed).
        """
        from .rotate import series_is_idle

        self.state.prepare()
        by_series: dict[str, list[Path]] = {}
        for path in segment_format.list_segments(self.directory):
            try:
                by_series.setdefault(segment_format.parse_segment_name(path)[0], []).append(path)
            except ValueError:  # not named as a writer names segments: not ours to ship
                continue
        found: list[Path] = []
        for owner, paths in by_series.items():
            if owner != series:
                if not series_is_idle(self.directory, owner):
                    continue  # another running writer's series: it ships its own
                # Its newest segment may end in a torn batch that whoever claims the series next cuts
                # off: then leave that one to them (their start ships it).
                if not _ends_cleanly(paths[-1]):
                    paths = paths[:-1]
            found.extend(p for p in paths if not self.is_shipped(p))
        for path in found:
            self._add(path, path.stat().st_mtime)
        if found:
            log.info("shipping: %d sealed segment(s) from before this start not yet confirmed; uploading",
                     len(found), extra={"event": "ship_backlog", "segments": len(found)})
        for i in range(self.settings.concurrency):
            thread = threading.Thread(target=self._worker, name=f"telemetry-ship-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def sealed(self, path: Path) -> None:
        """The writer sealed `path` (thread-safe, returns at once)."""
        self._add(path, time.time())

    def _add(self, path: Path, sealed_at: float) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size <= segment_format.FILE_HEADER_SIZE:
            # No record in it (a crash between creating a segment and its first batch, or a failed
            # first write): nothing to ship, and the writer may yet replace it under the same name.
            return
        with self._cond:
            if path not in self._pending:
                self._pending[path] = _Pending(path, size, sealed_at)
                self._cond.notify()

    def is_shipped(self, path: Path) -> bool:
        """True once the segment's upload is confirmed (retention may delete it)."""
        return self.state.is_shipped(path)

    def stop(self, drain_s: float = 0.0) -> None:
        """Give due uploads up to `drain_s` to finish, then stop the threads (the rest ship after a restart).

        The drain ends early at the first failure: a store that is down now will not be up in seconds.
        """
        deadline = time.monotonic() + drain_s
        with self._cond:
            failures = sum(self.failures.values())
            while self._pending and time.monotonic() < deadline and sum(self.failures.values()) == failures and any(
                    p.next_try <= time.monotonic() or p.in_flight for p in self._pending.values()):
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # -- status --

    def status(self) -> ShipStatus:
        now = time.time()
        with self._cond:
            pending = list(self._pending.values())
            failing = time.monotonic() - self._failing_since if self._failing_since is not None else 0.0
            return ShipStatus(
                waiting_segments=len(pending),
                waiting_bytes=sum(p.size for p in pending),
                oldest_unshipped_age_s=max((now - p.sealed_at for p in pending), default=0.0),
                failing_for_s=failing,
                last_error=self._last_error,
                conflicts=sorted(self._conflicts.values()),
            )

    def problem(self) -> str | None:
        """A one-line reason for /healthz and /readyz, or None while shipping is fine."""
        s = self.status()
        if s.conflicts:
            return f"shipping: {len(s.conflicts)} object(s) in the bucket differ from the local segment " \
                   f"(not overwritten): {s.conflicts[0]}"
        if s.failing_for_s >= self.settings.unhealthy_after_s:
            return f"shipping has failed for {s.failing_for_s:.0f}s ({s.waiting_segments} segment(s) waiting): " \
                   f"{s.last_error}"
        return None

    # -- the upload threads --

    def _next(self) -> _Pending | None:
        """The oldest due segment, marked in flight; None when stopping. Waits while nothing is due."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                due = [p for p in self._pending.values() if not p.in_flight and p.next_try <= now]
                if due:
                    item = min(due, key=lambda p: p.path.name)
                    item.in_flight = True
                    return item
                waits = [p.next_try - now for p in self._pending.values() if not p.in_flight]
                self._cond.wait(min(waits, default=1.0))
            return None

    def _worker(self) -> None:
        while (item := self._next()) is not None:
            try:
                self._ship(item)
            except Exception:  # a bug must not kill the thread and silently stop shipping
                log.exception("shipping %s failed unexpectedly", item.path.name)
                self._failed(item, "internal", "internal error (see the traceback above)")

    def _ship(self, item: _Pending) -> None:
        dest = self.settings.destination
        try:
            if item.key is None:
                series, first_seq = segment_format.parse_segment_name(item.path)
                item.key = object_key(self.settings.instance_id, series, first_seq, first_created_ms(item.path))
            log.debug("uploading segment %s to %s (%d bytes)", item.path.name, item.key, item.size,
                      extra={"event": "segment_upload_started", "segment": item.path.name, "key": item.key})
            started = time.monotonic()
            before = _identity(item.path)
            result = self.bucket.upload_create_only(item.key, item.path)
            if _identity(item.path) != before:
                # Replaced or changed while it was read (it must not be, once sealed): what was uploaded
                # is not what is on disk, so it is not confirmed. Uploading again raises the conflict alarm.
                log.error("shipping: %s changed while it was uploaded; not confirmed, uploading again",
                          item.path.name, extra={"event": "ship_changed", "segment": item.path.name})
                with self._cond:
                    item.size, item.in_flight, item.next_try = item.path.stat().st_size, False, 0.0
                    self._cond.notify_all()
                return
        except FileNotFoundError:
            log.warning("shipping: %s vanished before it was uploaded", item.path.name)
            self._done(item)
            return
        except OSError as exc:
            self._failed(item, "local_io", f"cannot read {item.path.name}: {exc.strerror or exc}")
            return
        except segment_format.SegmentFormatError as exc:
            self._failed(item, "local_io", f"{item.path.name} is not a segment: {exc}")
            return
        except ObjectStoreError as exc:
            self._failed(item, exc.reason, str(exc))
            return
        elapsed = time.monotonic() - started
        url = f"s3://{dest.bucket}/{dest.full_key(item.key)}"
        self._confirm(item)
        log.info("shipped segment %s to %s (%d bytes in %.2fs%s)", item.path.name, url, item.size, elapsed,
                 ", identical object already there" if result == "already_there" else "",
                 extra={"event": "segment_shipped", "segment": item.path.name, "key": url, "bytes": item.size,
                        "seconds": round(elapsed, 3), "result": result})
        if self.metrics is not None:
            self.metrics.shipped(item.size, elapsed, time.time() - item.sealed_at)

    def _confirm(self, item: _Pending) -> None:
        """Record the confirmed upload durably, then apply the after-upload policy."""
        if self.settings.after_upload == "delete":
            item.path.unlink(missing_ok=True)
            remove_index(item.path)
            fsync_dir(self.directory)
        else:
            assert item.key is not None
            self.state.record(item.path, item.key, item.size)
        self.uploaded += 1
        self._done(item)

    def _done(self, item: _Pending) -> None:
        with self._cond:
            self._pending.pop(item.path, None)
            if self._conflicts.pop(item.path, None) is not None:
                log.warning("shipping: %s uploaded after its conflict was resolved", item.path.name)
            self._failing_since, self._last_error = None, None
            self._cond.notify_all()

    def _failed(self, item: _Pending, reason: str, message: str) -> None:
        item.attempts += 1
        # Exponential backoff with full jitter, capped: a store that is down is not hammered.
        cap = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** min(item.attempts - 1, 30))
        delay = cap / 2 + random.uniform(0, cap / 2)
        if self.metrics is not None:
            self.metrics.failed(reason)
        key = item.key or item.path.name
        url = f"s3://{self.settings.destination.bucket}/{self.settings.destination.full_key(key)}"
        if reason == "conflict":
            log.error("shipping ALARM: %s; the local segment %s is kept; retrying in %.0fs", message,
                      item.path.name, delay, extra={"event": "ship_conflict", "key": url, "segment": item.path.name})
        else:
            log.warning("upload of %s to %s failed (%s): %s; retry %d in %.1fs", item.path.name, url, reason,
                        message, item.attempts, delay,
                        extra={"event": "ship_failed", "key": url, "segment": item.path.name, "reason": reason})
        with self._cond:
            self.failures[reason] += 1
            item.in_flight = False
            item.next_try = time.monotonic() + delay
            if reason == "conflict":
                self._conflicts[item.path] = url
            elif self._failing_since is None:
                self._failing_since = time.monotonic()
            if reason != "conflict":
                self._last_error = f"{reason}: {message}"
            self._cond.notify_all()
