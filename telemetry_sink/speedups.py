"""Pick the compiled `_speedups` extension when importable, else its pure-Python twin.

Set TELEMETRY_SINK_NO_EXTENSIONS=1 to force the twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ._protocols import BatchFramerProtocol, TokenBucketProtocol

NO_EXTENSIONS = bool(os.environ.get("TELEMETRY_SINK_NO_EXTENSIONS"))


def _load() -> ModuleType:
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module("telemetry_sink._speedups")
        except ImportError:  # not compiled: the twin behaves the same, only slower
            pass
    return importlib.import_module("telemetry_sink._speedups_py")


_impl = _load()
IMPLEMENTATION: str = _impl.IMPLEMENTATION
TokenBucket: type[TokenBucketProtocol] = _impl.TokenBucket
BatchFramer: type[BatchFramerProtocol] = _impl.BatchFramer

__all__ = ["IMPLEMENTATION", "NO_EXTENSIONS", "BatchFramer", "TokenBucket"]
