"""Global rate limit over request body bytes: a token bucket in `reject` or `delay` mode."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .speedups import TokenBucket


class RateLimited(Exception):
    """The request may not pass now; `retry_after` is the seconds until it could."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded, retry after {retry_after:.3f}s")
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, at least 1 (the HTTP Retry-After form)."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """Admits requests by wire size against one token bucket; `bytes_per_second = 0` disables it.

    `reject` answers at once; `delay` lets a request wait up to `max_delay_s` for budget.
    The clock is injected so tests can drive time exactly.
    """

    def __init__(
        self,
        bytes_per_second: float,
        burst_bytes: float,
        mode: str = "reject",
        max_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("reject", "delay"):
            raise ValueError(f"mode must be reject or delay, not {mode!r}")
        self.enabled = bytes_per_second > 0
        self.mode = mode
        self._max_wait = max_delay_s if mode == "delay" else 0.0
        self._clock = clock
        self._bucket = TokenBucket(bytes_per_second, burst_bytes, clock()) if self.enabled else None

    def admit(self, nbytes: int) -> float:
        """Charge `nbytes`; return the seconds the caller must wait first (0.0: go now).

        Raises RateLimited, charging nothing, when the budget is not there within the
        allowed delay. A positive wait is only returned in `delay` mode.
        """
        bucket = self._bucket
        if bucket is None:
            return 0.0
        now = self._clock()
        wait = bucket.reserve(nbytes, now, self._max_wait)
        if wait < 0.0:
            raise RateLimited(bucket.time_until_available(nbytes, now))
        return wait
