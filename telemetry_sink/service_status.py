"""The questions an adapter asks the service (one door, instead of reaching into its parts): count
an answer, health, readiness with reasons (the metrics snapshot is metrics.snapshot_of). A base
class of TelemetryService, kept apart so that service.py holds the ingest path and the lifecycle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .speedups import IMPLEMENTATION

if TYPE_CHECKING:
    from .buffer import BufferManager
    from .segment_writer import SegmentWriter
    from .service import IngestStats
    from .shipper import Shipper


class ServiceStatus:
    """Answers about a TelemetryService's state; the attributes are the service's own."""

    stats: IngestStats
    buffer: BufferManager
    writer: SegmentWriter
    shipper: Shipper | None
    closing: bool
    high_water_percent: int

    @property
    def writer_alive(self) -> bool:
        raise NotImplementedError

    def count_response(self, status: int, error: str | None = None) -> None:
        """Count one answered request (and, for a refusal, its reason) for /metrics."""
        stats = self.stats
        stats.requests_by_status[status] = stats.requests_by_status.get(status, 0) + 1
        if error is not None:
            stats.rejected_by_reason[error] = stats.rejected_by_reason.get(error, 0) + 1

    def count_timeout(self) -> None:
        """A request whose body did not arrive in time was answered 408 by the transport."""
        self.count_response(408, "request_timeout")

    def health(self) -> dict[str, Any]:
        """Liveness: `status` is "ok" while the writer task runs."""
        wstats = self.writer.stats
        return {
            "status": "ok" if self.writer_alive else "writer_stopped",
            "implementation": IMPLEMENTATION,
            "buffer_records": self.buffer.records,
            "records_written": wstats.records,
            "last_write_error": wstats.last_error,
            **({"shipping": self.shipper.problem() or "ok"} if self.shipper is not None else {}),
        }

    def readiness(self) -> list[str]:
        """Why the server should not get traffic now; [] means ready."""
        reasons = []
        if not self.writer_alive:
            reasons.append("the writer is not running")
        if self.closing:
            reasons.append("shutting down")
        if self.writer.stats.last_error is not None:
            reasons.append(f"the last write failed: {self.writer.stats.last_error}")
        if self.buffer.above(self.high_water_percent):
            reasons.append(f"the buffer is above {self.high_water_percent}% of its bounds")
        if self.shipper is not None and (problem := self.shipper.problem()) is not None:
            reasons.append(problem)
        return reasons
