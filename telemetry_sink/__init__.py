"""telemetry-sink: HTTP telemetry ingest with a global rate limit, batching and a Fernet-encrypted log."""

from __future__ import annotations

__version__ = "0.1.0"
