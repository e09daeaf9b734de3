"""Pure-Python twin of the compiled `_speedups` module: same classes, same output format.

Used when the extension is not built or TELEMETRY_SINK_NO_EXTENSIONS=1 is set.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography.fernet import Fernet

from .segment_format import frame_batch

IMPLEMENTATION = "pure-python"


class TokenBucket:
    """The token bucket (see _protocols.TokenBucketProtocol)."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.updated = float(now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def try_acquire(self, n: float, now: float) -> bool:
        self.refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def time_until_available(self, n: float, now: float) -> float:
        self.refill(now)
        if n > self.capacity:
            return float("inf")
        if self.tokens >= n:
            return 0.0
        return (n - self.tokens) / self.rate

    def reserve(self, n: float, now: float, max_wait: float) -> float:
        wait = self.time_until_available(n, now)
        if wait > max_wait:
            return -1.0
        self.tokens -= n
        return wait


class BatchFramer:
    """The batch framer on `cryptography`'s Fernet (see _protocols.BatchFramerProtocol)."""

    __slots__ = ("_fernet",)

    def __init__(self, signing_key: bytes, encryption_key: bytes) -> None:
        if len(signing_key) != 16 or len(encryption_key) != 16:
            raise ValueError("signing and encryption keys must be 16 bytes each")
        self._fernet = Fernet(base64.urlsafe_b64encode(signing_key + encryption_key))

    def frame(self, first_seq: int, created_ms: int, records: Sequence[bytes]) -> bytes:
        at = created_ms // 1000
        encrypt = self._fernet.encrypt_at_time
        return frame_batch(first_seq, created_ms, [encrypt(r, at) for r in records])
