"""telemetry-sink's sensor-side client: batching, retries with one Idempotency-Key per batch, an optional
on-disk spool; `Client` (blocking, thread-safe) and `AsyncClient` (asyncio) share one API. See docs/client.md.

It imports none of the server's dependencies (FastAPI, uvicorn, prometheus_client, the compiled extension):
only httpx (the `[client]` extra) and orjson. Names are loaded on first use, so the `telemetry-sink` command
can register `send` without importing httpx for its other subcommands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ClientClosedError,
    ClientError,
    DeliveryTimeout,
    PendingFullError,
    RejectedError,
    SenderFailedError,
)

if TYPE_CHECKING:
    from .async_client import AsyncClient
    from .batching import Record
    from .options import ClientOptions
    from .pipeline import Stats
    from .retry import RetryPolicy
    from .spool import SpoolLockedError
    from .sync_client import Client

_LAZY = {"AsyncClient": "async_client", "Client": "sync_client", "ClientOptions": "options", "Record": "batching",
         "RetryPolicy": "retry", "SpoolLockedError": "spool", "Stats": "pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosedError",
    "ClientError",
    "ClientOptions",
    "DeliveryTimeout",
    "PendingFullError",
    "Record",
    "RejectedError",
    "RetryPolicy",
    "SenderFailedError",
    "SpoolLockedError",
    "Stats",
]
