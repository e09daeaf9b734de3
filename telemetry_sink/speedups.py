"""The hot path's implementation: the compiled `_speedups` extension when it is importable, else
its pure-Python twin `_speedups_py` (same behaviour, slower). `TELEMETRY_SINK_NO_EXTENSIONS=1`
forces the twin. The interface both satisfy is described once, in `_protocols.py`.
"""

from __future__ import annotations

import os

from ._protocols import BatchFramerProtocol, TokenBucketProtocol

NO_EXTENSIONS = bool(os.environ.get("TELEMETRY_SINK_NO_EXTENSIONS"))

try:
    if NO_EXTENSIONS:
        raise ImportError("TELEMETRY_SINK_NO_EXTENSIONS is set")
    from ._speedups import IMPLEMENTATION, BatchFramer, TokenBucket
except ImportError:  # not compiled: the twin behaves the same, only slower
    from ._speedups_py import IMPLEMENTATION, BatchFramer, TokenBucket  # type: ignore[assignment]

# Both implementations must satisfy the one interface (checked by mypy, here and in the twin).
_framer: type[BatchFramerProtocol] = BatchFramer
_bucket: type[TokenBucketProtocol] = TokenBucket

__all__ = ["IMPLEMENTATION", "NO_EXTENSIONS", "BatchFramer", "TokenBucket"]
