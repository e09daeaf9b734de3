"""Type stub for the compiled `telemetry_sink._speedups` extension (see _speedups.pyx)."""

from collections.abc import Sequence

from _typeshed import ReadableBuffer

IMPLEMENTATION: str
OPENSSL_VERSION: str

class OpenSSLError(RuntimeError):
    """An OpenSSL call failed; no output was produced."""

class TokenBucket:
    """Token bucket: `rate` tokens a second refill up to `capacity`; time is passed in."""

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
    """Fernet-encrypts records and frames them as one TSB1 batch; one thread at a time."""

    def __init__(self, signing_key: ReadableBuffer, encryption_key: ReadableBuffer) -> None: ...
    def frame(self, first_seq: int, created_ms: int, records: Sequence[bytes]) -> bytes: ...
