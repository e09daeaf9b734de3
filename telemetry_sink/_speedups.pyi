"""Type stub for the compiled `telemetry_sink._speedups` (see _speedups.pyx); the interface and its
documentation are in `_protocols.py`, which the pure-Python twin satisfies too."""

from collections.abc import Sequence

from _typeshed import ReadableBuffer

IMPLEMENTATION: str
OPENSSL_VERSION: str

class OpenSSLError(RuntimeError): ...

class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    updated: float

    def __init__(self, rate: float, capacity: float, now: float) -> None: ...
    def refill(self, now: float) -> None: ...
    def try_acquire(self, n: float, now: float) -> bool: ...
    def time_until_available(self, n: float, now: float) -> float: ...
    def reserve(self, n: float, now: float, max_wait: float) -> float: ...

class BatchFramer:
    def __init__(self, signing_key: ReadableBuffer, encryption_key: ReadableBuffer) -> None: ...
    def frame(self, first_seq: int, created_ms: int, records: Sequence[bytes]) -> bytes: ...
