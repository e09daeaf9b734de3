"""Prometheus metrics of the shipper: backlog gauges read at scrape time, upload histograms and counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .metrics import PREFIX

if TYPE_CHECKING:
    from .shipper import ShipStatus

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class ShipMetrics:
    """`telemetry_sink_ship_*`: what waits, how long uploads take, and why they fail."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.upload_seconds = Histogram(f"{PREFIX}_ship_upload_seconds", "Duration of one segment upload",
                                        registry=registry, buckets=_SECONDS)
        self.seal_to_confirmed_seconds = Histogram(
            f"{PREFIX}_ship_seal_to_confirmed_seconds", "From a segment's seal to its confirmed object",
            registry=registry, buckets=_SECONDS)
        self.uploaded_segments = Counter(f"{PREFIX}_ship_uploaded_segments", "Segments confirmed in the store",
                                         registry=registry)
        self.uploaded_bytes = Counter(f"{PREFIX}_ship_uploaded_bytes", "Bytes of segments confirmed in the store",
                                      registry=registry)
        self.failures = Counter(f"{PREFIX}_ship_failures", "Failed upload attempts by reason", ["reason"],
                                registry=registry)
        self._waiting_segments = Gauge(f"{PREFIX}_ship_waiting_segments", "Sealed segments not yet confirmed",
                                       registry=registry)
        self._waiting_bytes = Gauge(f"{PREFIX}_ship_waiting_bytes", "Bytes of sealed segments not yet confirmed",
                                    registry=registry)
        self._oldest = Gauge(f"{PREFIX}_ship_oldest_unshipped_age_seconds",
                             "Age of the oldest sealed segment not yet confirmed (0: none)", registry=registry)
        self._failing = Gauge(f"{PREFIX}_ship_failing_seconds", "How long uploads have been failing (0: they are not)",
                              registry=registry)
        self._conflicts = Gauge(f"{PREFIX}_ship_conflicts", "Objects in the store that differ from the local segment",
                                registry=registry)

    def bind(self, status: Callable[[], ShipStatus]) -> None:
        """Read the gauges from the shipper's status at scrape time."""
        self._waiting_segments.set_function(lambda: status().waiting_segments)
        self._waiting_bytes.set_function(lambda: status().waiting_bytes)
        self._oldest.set_function(lambda: status().oldest_unshipped_age_s)
        self._failing.set_function(lambda: status().failing_for_s)
        self._conflicts.set_function(lambda: len(status().conflicts))

    def shipped(self, size: int, upload_s: float, since_seal_s: float) -> None:
        self.uploaded_segments.inc()
        self.uploaded_bytes.inc(size)
        self.upload_seconds.observe(upload_s)
        self.seal_to_confirmed_seconds.observe(since_seal_s)

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()
