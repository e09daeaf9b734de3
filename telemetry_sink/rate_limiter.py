"""Global rate limit over request body bytes: a token bucket in `reject` or `delay` mode."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ._protocols import TokenBucketProtocol
from .config import RATE_LIMIT_MODES
from .speedups import TokenBucket

DEFAULT_MAX_NODE_BUCKETS = 10_000


class RateLimited(Exception):
    """The request may not pass now; `retry_after` is the seconds until it could."""

    def __init__(self, retry_after: float, per_node: bool = False) -> None:
        super().__init__(f"rate limit exceeded, retry after {retry_after:.3f}s")
        self.retry_after = retry_after
        self.per_node = per_node


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
        per_node_bytes_per_second: float = 0,
        per_node_burst_bytes: float = 0,
        max_node_buckets: int = DEFAULT_MAX_NODE_BUCKETS,
    ) -> None:
        if mode not in RATE_LIMIT_MODES:
            raise ValueError(f"mode must be {' or '.join(RATE_LIMIT_MODES)}, not {mode!r}")
        self.enabled = bytes_per_second > 0
        self.mode = mode
        self._max_wait = max_delay_s if mode == "delay" else 0.0
        self._clock = clock
        self._bucket = TokenBucket(bytes_per_second, burst_bytes, clock()) if self.enabled else None
        self.per_node_enabled = per_node_bytes_per_second > 0
        self._node_rate = per_node_bytes_per_second
        self._node_burst = per_node_burst_bytes
        self._max_node_buckets = max_node_buckets
        # Least recently used first: a flood of distinct clients evicts the idlest buckets
        # instead of growing the table without bound.
        self._nodes: OrderedDict[str, TokenBucketProtocol] = OrderedDict()

    @property
    def node_buckets(self) -> int:
        return len(self._nodes)

    def _node_bucket(self, key: str, now: float) -> TokenBucketProtocol:
        bucket = self._nodes.get(key)
        if bucket is None:
            bucket = TokenBucket(self._node_rate, self._node_burst, now)
            self._nodes[key] = bucket
            if len(self._nodes) > self._max_node_buckets:
                self._nodes.popitem(last=False)
        else:
            self._nodes.move_to_end(key)
        return bucket

    def admit(self, nbytes: int, node_key: str | None = None) -> float:
        """Charge `nbytes` to the global bucket (and to `node_key`'s, when per-node limits
        are on); return the seconds the caller must wait first (0.0: go now).

        Raises RateLimited, charging nothing, when the budget is not there within the
        allowed delay. A positive wait is only returned in `delay` mode.
        """
        bucket = self._bucket
        node = None
        now = 0.0
        if self.per_node_enabled and node_key is not None:
            now = self._clock()
            node = self._node_bucket(node_key, now)
            node_wait = node.time_until_available(nbytes, now)
            if node_wait > self._max_wait:
                raise RateLimited(node_wait, per_node=True)
        if bucket is None:
            return node.reserve(nbytes, now, self._max_wait) if node is not None else 0.0
        if node is None:
            now = self._clock()
        wait = bucket.reserve(nbytes, now, self._max_wait)
        if wait < 0.0:
            raise RateLimited(bucket.time_until_available(nbytes, now))
        if node is not None:
            wait = max(wait, node.reserve(nbytes, now, self._max_wait))
        return wait
