"""The client's retry rules and settings checks: which statuses are retried, Retry-After in both forms,
backoff bounds with jitter, and settings refused with a clear message."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from telemetry_sink.client import ClientOptions, RetryPolicy
from telemetry_sink.client.retry import Outcome, classify, parse_retry_after


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.DELIVERED), (202, Outcome.DELIVERED),
    (408, Outcome.RETRY), (429, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (504, Outcome.RETRY),
    (507, Outcome.RETRY),
    (400, Outcome.REJECTED), (401, Outcome.REJECTED), (403, Outcome.REJECTED), (413, Outcome.REJECTED),
    (415, Outcome.REJECTED), (422, Outcome.REJECTED), (500, Outcome.REJECTED), (404, Outcome.REJECTED),
])
def test_which_statuses_are_retried(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_retry_after_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    now = 1_800_000_000.0
    assert parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now=now) == 0.0
    for junk in (None, "", "soon", "-1", "1.5e3"):
        assert parse_retry_after(junk) is None


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0)
    lows = [policy.delay(n, None, rng=lambda: 0.0) for n in range(8)]
    highs = [policy.delay(n, None, rng=lambda: 1.0) for n in range(8)]
    assert lows[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4]) and highs[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert max(highs) == pytest.approx(2.0) and min(lows[5:]) == pytest.approx(1.0)
    assert policy.delay(10_000, None) <= 2.0, "no overflow however long the outage"


def test_retry_after_is_never_undercut() -> None:
    policy = RetryPolicy(max_retry_after_s=60)
    assert policy.delay(0, 5.0, rng=lambda: 0.0) == 5.0
    assert 5.0 <= policy.delay(9, 5.0) <= 5.5
    assert policy.delay(0, 3600.0, rng=lambda: 0.0) == 60.0


@pytest.mark.parametrize(("kw", "message"), [
    ({"url": "127.0.0.1:8080"}, "url must be"),
    ({"max_batch_records": 0}, "max_batch_records"),
    ({"max_batch_bytes": 1 << 20, "max_pending_bytes": 1 << 20}, "at least twice"),
    ({"wire_format": "xml"}, "wire_format"),
    ({"full_policy": "drop_newest"}, "full_policy"),
    ({"spool_fsync": "always"}, "spool_fsync"),
    ({"client_key": "k.pem"}, "client_key needs client_cert"),
])
def test_bad_settings_are_refused_with_what_to_fix(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"url": "http://127.0.0.1:8080", **kw}
    with pytest.raises(ValueError, match=message):
        ClientOptions(**args)  # type: ignore[arg-type]


def test_endpoint_defaults_to_telemetry() -> None:
    assert ClientOptions(url="http://h:1").endpoint == "http://h:1/telemetry"
    assert ClientOptions(url="https://h/").endpoint == "https://h/telemetry"
    assert ClientOptions(url="https://h/sink/telemetry").endpoint == "https://h/sink/telemetry"
