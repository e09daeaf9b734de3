"""Prometheus metrics (prometheus_client): writer histograms, and a collector that reads the
service's plain counters at scrape time so the ingest path only bumps integers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .segment_format import list_segments
from .speedups import IMPLEMENTATION

if TYPE_CHECKING:
    from .service import TelemetryService

PREFIX = "telemetry_sink"


class WriterMetrics:
    """Histograms the writer observes once per batch (on its thread: prometheus_client is thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_records = Histogram(
            f"{PREFIX}_batch_records", "Records per written batch", registry=registry,
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
        )
        self.flush_seconds = Histogram(
            f"{PREFIX}_flush_seconds", "Time to encrypt, frame and write one batch", registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.fsync_seconds = Histogram(
            f"{PREFIX}_fsync_seconds", "Time of one fsync of the active segment", registry=registry,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


@dataclass
class Snapshot:
    """The service's counters and gauges at one moment."""

    implementation: str
    requests_by_status: dict[int, int]
    rejected_by_reason: dict[str, int]
    records_accepted: int
    bytes_received: int
    buffer_records: int
    buffer_bytes: int
    records_written: int
    write_errors: int
    segments: int
    segment_bytes: int
    written_bytes: int
    segments_deleted: int = 0
    fast_lane_requests: int = 0
    gauges: dict[str, float] = field(default_factory=dict)  # further gauges, named as exported
    counters: dict[str, float] = field(default_factory=dict)  # further counters, named as exported (less _total)


class SinkCollector(Collector):
    """Turns a Snapshot into Prometheus metric families at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = InfoMetricFamily(f"{PREFIX}_build", "Version and the _speedups implementation in use")
        info.add_metric([], {"implementation": s.implementation})
        yield info
        requests = CounterMetricFamily(f"{PREFIX}_requests", "POST /telemetry requests by status", labels=["status"])
        for status, n in sorted(s.requests_by_status.items()):
            requests.add_metric([str(status)], n)
        yield requests
        rejected = CounterMetricFamily(f"{PREFIX}_rejected_requests", "Requests not accepted, by reason",
                                       labels=["reason"])
        for reason, n in sorted(s.rejected_by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(f"{PREFIX}_records_accepted", "Records accepted (202)", value=s.records_accepted)
        yield CounterMetricFamily(f"{PREFIX}_received_bytes", "Request body bytes received (wire size)",
                                  value=s.bytes_received)
        yield CounterMetricFamily(f"{PREFIX}_records_written", "Records written to segments", value=s.records_written)
        yield CounterMetricFamily(f"{PREFIX}_written_bytes", "Bytes appended to segment files (framed, encrypted)",
                                  value=s.written_bytes)
        yield CounterMetricFamily(f"{PREFIX}_write_errors", "Failed batch writes", value=s.write_errors)
        yield GaugeMetricFamily(f"{PREFIX}_buffer_records", "Records accepted and not yet written",
                                value=s.buffer_records)
        yield GaugeMetricFamily(f"{PREFIX}_buffer_bytes", "Plaintext bytes accepted and not yet written",
                                value=s.buffer_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_segments", "Segment files in the log directory", value=s.segments)
        yield GaugeMetricFamily(f"{PREFIX}_segment_bytes", "Bytes of segment files on disk", value=s.segment_bytes)
        yield CounterMetricFamily(f"{PREFIX}_segments_deleted", "Segments deleted by retention",
                                  value=s.segments_deleted)
        yield CounterMetricFamily(f"{PREFIX}_fast_lane_requests", "POST /telemetry requests answered by the "
                                  "protocol's fast lane, below ASGI", value=s.fast_lane_requests)
        for name, value in sorted(s.gauges.items()):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", name.replace("_", " "), value=value)
        for name, value in sorted(s.counters.items()):
            yield CounterMetricFamily(f"{PREFIX}_{name}", name.replace("_", " "), value=value)

def snapshot_of(service: TelemetryService) -> Snapshot:
    """The service's counters and gauges for one /metrics scrape."""
    segments = 0
    segment_bytes = 0
    for path in list_segments(service.writer.directory):
        try:
            segment_bytes += path.stat().st_size
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        segments += 1
    stats, wstats = service.stats, service.writer.stats
    return Snapshot(
        implementation=IMPLEMENTATION,
        requests_by_status=dict(stats.requests_by_status),
        rejected_by_reason=dict(stats.rejected_by_reason),
        records_accepted=stats.records_accepted,
        bytes_received=stats.bytes_received,
        buffer_records=service.buffer.records,
        buffer_bytes=service.buffer.bytes,
        records_written=wstats.records,
        written_bytes=wstats.bytes,
        write_errors=wstats.write_errors,
        segments=segments,
        segment_bytes=segment_bytes,
        segments_deleted=wstats.segments_deleted,
        fast_lane_requests=stats.fast_lane_requests,
        gauges={"rate_limit_node_buckets": service.rate_limiter.node_buckets,
                "buffer_max_records": service.buffer.max_records, "buffer_max_bytes": service.buffer.max_bytes,
                **_idempotency_gauges(service)},
        counters=_idempotency_counters(service),
    )


def _idempotency_gauges(service: TelemetryService) -> dict[str, float]:
    return {} if service.idempotency is None else {"idempotency_keys": len(service.idempotency)}

def _idempotency_counters(service: TelemetryService) -> dict[str, float]:
    table = service.idempotency
    return {} if table is None else {"idempotent_replays": table.replays,
                                      "idempotency_keys_evicted": table.evicted}
