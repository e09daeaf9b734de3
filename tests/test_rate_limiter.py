"""RateLimiter: exact token-bucket behaviour with an injected clock, both modes."""

from __future__ import annotations

import pytest

from telemetry_sink.ingest_http import retry_after_header
from telemetry_sink.rate_limiter import RateLimited, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_disabled_admits_everything() -> None:
    limiter = RateLimiter(0, 10)
    assert not limiter.enabled
    assert all(limiter.admit(10**9) == 0.0 for _ in range(100))


def test_reject_mode_burst_then_429_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, 4000, "reject", clock=clock)
    for _ in range(4):
        assert limiter.admit(1000) == 0.0
    with pytest.raises(RateLimited) as info:
        limiter.admit(1000)
    assert info.value.retry_after == pytest.approx(1.0)
    assert retry_after_header(info.value.retry_after) == b"1"
    clock.now += 0.5  # 500 tokens back: not enough for 1000
    with pytest.raises(RateLimited) as info:
        limiter.admit(1000)
    assert info.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.admit(1000) == 0.0


def test_rejection_charges_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, 1000, "reject", clock=clock)
    assert limiter.admit(900) == 0.0
    for _ in range(10):
        with pytest.raises(RateLimited):
            limiter.admit(500)
    assert limiter.admit(100) == 0.0  # the 100 left were never taken by the rejections


def test_retry_after_header_rounds_up_whole_seconds() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, 1000, "reject", clock=clock)
    limiter.admit(1000)
    with pytest.raises(RateLimited) as info:
        limiter.admit(250)
    assert info.value.retry_after == pytest.approx(2.5)
    assert retry_after_header(info.value.retry_after) == b"3"


def test_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, 2000, "reject", clock=clock)
    limiter.admit(2000)
    clock.now += 3600
    assert limiter.admit(2000) == 0.0
    with pytest.raises(RateLimited):
        limiter.admit(1)


def test_delay_mode_queues_requests_fifo_within_max_delay() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, 1000, "delay", max_delay_s=2.0, clock=clock)
    assert limiter.admit(1000) == 0.0
    assert limiter.admit(500) == pytest.approx(0.5)  # waits for its own tokens
    assert limiter.admit(500) == pytest.approx(1.0)  # and queues behind the previous one
    assert limiter.admit(1000) == pytest.approx(2.0)
    with pytest.raises(RateLimited) as info:  # would wait 3 s > max_delay 2 s
        limiter.admit(1000)
    assert info.value.retry_after == pytest.approx(3.0)
    clock.now += 2.0  # the debt is paid off
    assert limiter.admit(1000) == pytest.approx(1.0)


def test_delay_mode_zero_max_delay_behaves_like_reject() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 10, "delay", max_delay_s=0.0, clock=clock)
    assert limiter.admit(10) == 0.0
    with pytest.raises(RateLimited):
        limiter.admit(1)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        RateLimiter(1, 1, "drop")
