"""Per-node rate limits: RateLimiter's per-key buckets with an injected clock, and end to end
(keyed by the client address with auth off, by the bearer token with auth on)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer

from telemetry_sink.auth import hash_token
from telemetry_sink.ingest_http import retry_after_header
from telemetry_sink.rate_limiter import RateLimited, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, *, rate: float = 0, burst: float = 1, node_rate: float = 100,
            node_burst: float = 1000, max_buckets: int = 100, mode: str = "reject",
            max_delay_s: float = 0.0) -> RateLimiter:
    return RateLimiter(rate, burst, mode, max_delay_s, clock=clock, per_node_bytes_per_second=node_rate,
                       per_node_burst_bytes=node_burst, max_node_buckets=max_buckets)


# -- unit --


def test_per_node_bucket_limits_one_key_while_another_passes() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    assert rl.admit(600, "a") == 0.0
    assert rl.admit(400, "a") == 0.0
    with pytest.raises(RateLimited) as info:
        rl.admit(100, "a")
    assert info.value.per_node is True
    assert info.value.retry_after == pytest.approx(1.0)  # 100 bytes at 100 B/s
    assert retry_after_header(info.value.retry_after) == b"1"
    assert rl.admit(1000, "b") == 0.0  # b has its own full bucket
    clock.now += 1.0
    assert rl.admit(100, "a") == 0.0
    assert rl.node_buckets == 2


def test_per_node_off_or_no_key_means_no_per_node_limit() -> None:
    clock = FakeClock()
    off = RateLimiter(0, 1, clock=clock)
    assert all(off.admit(10**6, "a") == 0.0 for _ in range(10))
    assert off.node_buckets == 0
    rl = limiter(clock)
    assert all(rl.admit(1000, None) == 0.0 for _ in range(10))
    assert rl.node_buckets == 0


def test_global_limit_still_applies_across_keys() -> None:
    clock = FakeClock()
    rl = limiter(clock, rate=100, burst=1500, node_burst=1000)
    assert rl.admit(1000, "a") == 0.0
    with pytest.raises(RateLimited) as info:
        rl.admit(1000, "b")  # b's own bucket is full, the global one has 500 left
    assert info.value.per_node is False
    assert info.value.retry_after == pytest.approx(5.0)
    assert rl.admit(500, "b") == 0.0


def test_per_node_rejection_charges_nothing() -> None:
    clock = FakeClock()
    rl = limiter(clock, rate=1000, burst=2000, node_burst=1000)
    assert rl.admit(900, "a") == 0.0  # global 1100 left, a 100 left
    for _ in range(5):
        with pytest.raises(RateLimited) as info:
            rl.admit(200, "a")
        assert info.value.per_node
    # Had the refused requests been charged to the global bucket, b and c could not take 1100 now.
    assert rl.admit(1000, "b") == 0.0
    assert rl.admit(100, "c") == 0.0
    with pytest.raises(RateLimited) as info:
        rl.admit(1, "c")
    assert not info.value.per_node
    # Nor to a's own bucket: 100 left plus 1 s at 100 B/s is exactly 200.
    clock.now += 1.0
    assert rl.admit(200, "a") == 0.0
    with pytest.raises(RateLimited) as info:
        rl.admit(1, "a")
    assert info.value.per_node


def test_global_rejection_charges_nothing_to_the_node_bucket() -> None:
    clock = FakeClock()
    rl = limiter(clock, rate=1, burst=1000, node_burst=1000)
    assert rl.admit(1000, "x") == 0.0  # the global bucket is empty now
    for _ in range(5):
        with pytest.raises(RateLimited) as info:
            rl.admit(1000, "a")
        assert not info.value.per_node
    clock.now += 1000.0  # the global bucket refills; a's must still be full
    assert rl.admit(1000, "a") == 0.0


def test_delay_mode_waits_for_the_node_bucket() -> None:
    clock = FakeClock()
    rl = limiter(clock, mode="delay", max_delay_s=2.0)
    assert rl.admit(1000, "a") == 0.0
    assert rl.admit(100, "a") == pytest.approx(1.0)
    assert rl.admit(100, "a") == pytest.approx(2.0)  # queued behind the first wait
    with pytest.raises(RateLimited) as info:
        rl.admit(100, "a")
    assert info.value.per_node
    assert rl.admit(1000, "b") == 0.0


def test_node_table_is_bounded_under_a_flood_of_distinct_keys() -> None:
    clock = FakeClock()
    rl = limiter(clock, max_buckets=50)
    peak = 0
    for i in range(5000):
        assert rl.admit(10, f"client-{i}") == 0.0
        peak = max(peak, rl.node_buckets)
    assert peak == 50
    assert rl.node_buckets == 50


def test_node_table_evicts_the_least_recently_used_bucket() -> None:
    clock = FakeClock()
    rl = limiter(clock, max_buckets=3)
    for key in ("a", "b", "c"):
        assert rl.admit(1000, key) == 0.0  # every bucket empty
    with pytest.raises(RateLimited):
        rl.admit(1000, "a")  # a used again (even though refused): b is now the idlest
    assert rl.admit(1000, "d") == 0.0  # evicts b
    assert rl.node_buckets == 3
    # a and c were kept, still empty; b comes back with a fresh bucket.
    with pytest.raises(RateLimited):
        rl.admit(1000, "a")
    assert rl.admit(1000, "b") == 0.0  # evicts c
    assert rl.admit(1000, "c") == 0.0
    assert rl.node_buckets == 3


# -- end to end --

MAX_BODY = 1024
PER_NODE_BURST = 2048


def body_of(node_id: str, size: int) -> bytes:
    base = orjson.dumps({"node_id": node_id, "ts": 1.0, "pad": ""})
    body = orjson.dumps({"node_id": node_id, "ts": 1.0, "pad": "x" * (size - len(base))})
    assert len(body) == size
    return body


def per_node_config(**extra: dict[str, object]) -> dict[str, dict[str, object]]:
    return {
        "ingest": {"max_body_bytes": MAX_BODY},
        "rate_limit": {"bytes_per_second": 0, "per_node_bytes_per_second": 1,
                       "per_node_burst_bytes": PER_NODE_BURST},
        **extra,
    }


def assert_per_node_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "rate_limited"
    assert "per-node" in body["detail"]
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= MAX_BODY  # at 1 B/s: at most a body's worth of seconds


def node_buckets_metric(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5.0).text
    match = re.search(r"^\w*rate_limit_node_buckets\w* ([0-9.e+]+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_e2e_auth_off_the_client_address_gets_429_after_its_burst(start_server: StartServer) -> None:
    server = start_server(per_node_config())
    body = body_of("addr-node", 1000)
    assert server.post(body).status_code == 202
    assert server.post(body).status_code == 202
    response = server.post(body)
    assert_per_node_429(response)
    # Another node id from the same address shares the bucket: the key is the address.
    assert_per_node_429(server.post(body_of("another-node", 1000)))
    assert node_buckets_metric(server) == 1


def test_e2e_auth_on_each_token_has_its_own_bucket(start_server: StartServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"node-a {hash_token('token-a' * 5)}\nnode-b {hash_token('token-b' * 5)}\n")
    server = start_server(per_node_config(auth={"tokens_file": str(tokens)}))
    auth_a = {"authorization": "Bearer " + "token-a" * 5}
    auth_b = {"authorization": "Bearer " + "token-b" * 5}
    body_a, body_b = body_of("node-a", 1000), body_of("node-b", 1000)
    assert server.post(body_a, headers=auth_a).status_code == 202
    assert server.post(body_a, headers=auth_a).status_code == 202
    assert_per_node_429(server.post(body_a, headers=auth_a))
    # Same client address, other token: its own full bucket.
    assert server.post(body_b, headers=auth_b).status_code == 202
    assert server.post(body_b, headers=auth_b).status_code == 202
    assert_per_node_429(server.post(body_b, headers=auth_b))
    assert_per_node_429(server.post(body_a, headers=auth_a))
    assert node_buckets_metric(server) == 2
