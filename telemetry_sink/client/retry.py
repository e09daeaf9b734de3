"""Which answers are retried, and how long to wait: exponential backoff with jitter, `Retry-After` honoured."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# 408: the body did not reach the server in time; 409: an earlier attempt with the same Idempotency-Key is
# still being processed (its answer was lost or timed out; the retry gets that answer once it is given);
# 429: rate limited; 503: buffer full, shutting down or the disk failing; 507: disk full; 502/504: a proxy
# in between lost the server. Nothing was stored for any of them, and the batch's Idempotency-Key makes a
# retry safe even when an answer was lost after all.
RETRY_STATUSES = frozenset({408, 409, 429, 502, 503, 504, 507})


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify(status: int) -> Outcome:
    """2xx: delivered; a transient status: retry; anything else (other 4xx, 500): the caller must be told."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    return Outcome.RETRY if status in RETRY_STATUSES else Outcome.REJECTED


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Backoff between attempts at one batch. A batch is retried until it is delivered or refused for good
    (or until `flush`/`close` run out of time): giving up would drop records, and the buffer or spool bound
    already pushes back on the sender."""

    initial_backoff_s: float = 0.1
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    # A server asking for more than this is waited for this long instead, then asked again.
    max_retry_after_s: float = 300.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_backoff_s <= self.max_backoff_s) or self.multiplier < 1 or self.max_retry_after_s <= 0:
            raise ValueError("retry policy: need 0 < initial_backoff_s <= max_backoff_s, multiplier >= 1 "
                             "and max_retry_after_s > 0")

    def delay(self, attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based).

        Without `Retry-After`: "equal jitter", a uniform draw from [b/2, b] with b = initial * multiplier**attempt
        capped at max_backoff_s, so a fleet cut off together does not come back in step. With it: never sooner
        than the server asked, plus up to 10 % so the clients it refused together do not return together.
        """
        if retry_after is not None:
            wait = min(retry_after, self.max_retry_after_s)
            return wait * (1.0 + 0.1 * rng())
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** min(attempt, 64))
        return backoff / 2 + rng() * backoff / 2
