"""telemetry_sink.client against a real server subprocess: batching, gzip, formats, retries with one key per
batch, refusals surfaced with the server's index, the async front end, and no server imports."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ServerProcess, StartServer, read_records, wait_for
from loopback_proxy import Exchange, RecordingProxy

from telemetry_sink.client import AsyncClient, Client, RejectedError

MakeProxy = Callable[..., RecordingProxy]


def records(n: int, start: int = 0, pad: int = 0) -> list[dict[str, Any]]:
    return [{"node_id": "client-test", "i": i, "pad": "x" * pad} for i in range(start, start + n)]


def body_records(ex: Exchange) -> list[dict[str, Any]]:
    raw = gzip.decompress(ex.body) if ex.headers.get("content-encoding") == "gzip" else ex.body
    if ex.headers["content-type"] == "application/x-ndjson":
        return [json.loads(line) for line in raw.splitlines()]
    parsed: list[dict[str, Any]] = json.loads(raw)
    return parsed


def stored_indexes(server: ServerProcess, expect: int) -> list[int]:
    """The `i` of every stored record, once `expect` of them are on disk."""
    def probe() -> list[dict[str, Any]] | None:
        found = read_records(server.config_path)
        return found if len(found) >= expect else None

    return sorted(int(r["i"]) for r in wait_for(probe, what=f"{expect} records on disk"))


def test_batches_by_count_then_flush_sends_the_rest(start_server: StartServer, recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port)
    with Client(proxy.url, max_batch_records=10, max_batch_age_s=60) as client:
        client.send_many(records(24))
        client.send(records(1, start=24)[0])
        client.flush()
        assert client.stats.records_sent == 25 and client.stats.batches_sent == 3
    assert [len(body_records(ex)) for ex in proxy.snapshot()] == [10, 10, 5]
    assert all(ex.status == 202 for ex in proxy.snapshot())
    assert stored_indexes(server, 25) == list(range(25))


def test_batches_by_bytes_keep_every_body_under_the_bound(start_server: StartServer,
                                                          recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port)
    with Client(proxy.url, max_batch_bytes=2000, max_batch_age_s=60) as client:
        client.send_many(records(40, pad=100))  # ~140 bytes each
        client.flush()
    bodies = proxy.snapshot()
    assert len(bodies) == 3
    assert all(2000 - 150 < len(ex.body) <= 2000 for ex in bodies[:-1]), "full, and never past the bound"
    assert sum(len(body_records(ex)) for ex in bodies) == 40
    assert stored_indexes(server, 40) == list(range(40))


def test_batches_by_age_without_flush(start_server: StartServer, recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port)
    with Client(proxy.url, max_batch_age_s=0.2) as client:
        client.send_many(records(3))
        wait_for(lambda: client.pending_records() == 0, what="the aged batch to be delivered")
        assert [len(body_records(ex)) for ex in proxy.snapshot()] == [3]
    assert stored_indexes(server, 3) == [0, 1, 2]


def test_gzip_above_the_threshold_only_and_ndjson(start_server: StartServer, recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port)
    with Client(proxy.url, gzip_min_bytes=3000, wire_format="ndjson") as client:
        client.send_many(records(50, pad=50))  # ~5 KB
        client.flush()
        client.send_many(records(2, start=50))
        client.flush()
    big, small = proxy.snapshot()
    assert big.headers["content-encoding"] == "gzip" and len(big.body) < 3000
    assert "content-encoding" not in small.headers
    assert big.headers["content-type"] == small.headers["content-type"] == "application/x-ndjson"
    assert [len(body_records(ex)) for ex in (big, small)] == [50, 2]
    assert stored_indexes(server, 52) == list(range(52))


def test_422_is_raised_with_the_servers_index_and_not_retried(start_server: StartServer,
                                                             recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port)
    client = Client(proxy.url)
    batch: list[dict[str, Any]] = [*records(3), {"i": 3}]  # the fourth has no node_id
    client.send_many(batch)
    with pytest.raises(RejectedError) as caught:
        client.flush()
    err = caught.value
    assert (err.status, err.error, err.index) == (422, "invalid_record", 3)
    assert "node_id" in (err.detail or "") and json.loads(err.records[3]) == {"i": 3}
    assert len(err.records) == 4 and client.stats.records_rejected == 4
    assert len(proxy.snapshot()) == 1, "a refusal is not retried"
    # The client goes on working; the refused batch stored nothing (all or nothing).
    client.send_many(records(1, start=10))
    client.close()
    assert stored_indexes(server, 1) == [10]


def test_a_refusal_is_raised_by_the_next_send(start_server: StartServer) -> None:
    server = start_server()
    client = Client(server.url, max_batch_records=1)
    client.send({"i": 0})
    wait_for(lambda: client.stats.records_rejected == 1, what="the refusal")
    with pytest.raises(RejectedError, match="invalid_record at index 0"):
        client.send(records(1)[0])
    client.send(records(1, start=1)[0])  # raised once; the record refused with the exception was not taken
    client.close()
    assert stored_indexes(server, 1) == [1]


def test_429_waits_for_retry_after_and_retries_with_the_same_key(start_server: StartServer,
                                                                 recording_proxy: MakeProxy) -> None:
    # A tiny rate limit: a batch of ~2.9 KB passes, the next does not fit for about a second.
    server = start_server({"rate_limit": {"bytes_per_second": 2000, "burst_bytes": 4000},
                           "ingest": {"max_body_bytes": 4000}})
    proxy = recording_proxy(server.port)
    with Client(proxy.url, max_batch_bytes=3000) as client:
        client.send_many(records(80, pad=30))  # two batches of ~2.9 KB
        client.flush(timeout=60)
        assert client.stats.retries >= 1
    exchanges = proxy.snapshot()
    refused = [ex for ex in exchanges if ex.status == 429]
    assert refused, [ex.status for ex in exchanges]
    for ex in refused:
        retry_after = float(ex.answer_headers["retry-after"])
        again = next(later for later in exchanges if later.sent_at > ex.sent_at
                     and later.headers["idempotency-key"] == ex.headers["idempotency-key"])
        assert again.body == ex.body
        assert ex.answered_at is not None and again.sent_at - ex.answered_at >= retry_after
    keys = {ex.headers["idempotency-key"] for ex in exchanges}
    assert len(keys) == 2, "one key per batch, the same on every retry"
    assert stored_indexes(server, 80) == list(range(80))


def test_503_buffer_full_is_retried_until_the_writer_drains(start_server: StartServer,
                                                             recording_proxy: MakeProxy) -> None:
    # The buffer holds one ~3 KB batch until the writer's 2 s flush: the second batch gets 503 buffer_full.
    server = start_server({"ingest": {"max_body_bytes": 4096}, "buffer": {"max_bytes": 4096},
                           "writer": {"flush_interval_ms": 2000}})
    proxy = recording_proxy(server.port)
    with Client(proxy.url, max_batch_bytes=3000) as client:
        client.send_many(records(80, pad=30))
        client.flush(timeout=60)
    statuses = [ex.status for ex in proxy.snapshot()]
    assert 503 in statuses and statuses[-1] == 202
    assert len({ex.headers["idempotency-key"] for ex in proxy.snapshot()}) == 2
    assert stored_indexes(server, 80) == list(range(80))


def test_a_lost_answer_and_a_cut_request_are_retried_with_the_batchs_key(start_server: StartServer,
                                                                         recording_proxy: MakeProxy) -> None:
    server = start_server()
    plan = {0: "drop_response", 1: "cut_request"}
    proxy = recording_proxy(server.port, faults=lambda n, ex: plan.get(n, ""))
    with Client(proxy.url, retry=_fast_retry()) as client:
        client.send_many(records(5))
        client.flush(timeout=30)
        client.send_many(records(5, start=5))
        client.flush(timeout=30)
    exchanges = proxy.snapshot()
    assert [ex.fault for ex in exchanges] == ["drop_response", "cut_request", "", ""]
    first_key = exchanges[0].headers["idempotency-key"]
    assert [ex.headers["idempotency-key"] == first_key for ex in exchanges] == [True, True, True, False]
    assert first_key.startswith('"') and first_key.endswith('"'), "a Structured Field string, as the draft says"
    # Without server-side Idempotency-Key support the lost 202 stored the batch once more; with it, once.
    assert set(stored_indexes(server, 10)) == set(range(10))


def test_bearer_token_is_sent_and_401_is_surfaced(start_server: StartServer, tmp_path: Any) -> None:
    from telemetry_sink.auth import hash_token

    tokens = tmp_path / "tokens"
    tokens.write_text(f"client-* {hash_token('sekrit-token-1234')}\n")
    server = start_server({"auth": {"tokens_file": str(tokens)}})
    with Client(server.url, token="sekrit-token-1234") as client:
        client.send_many(records(3))
        client.flush()
    client = Client(server.url, token="wrong-token-5678")
    client.send_many(records(1, start=3))
    with pytest.raises(RejectedError) as caught:
        client.close()
    assert (caught.value.status, caught.value.error) == (401, "unauthorized")
    assert "check the client's token" in str(caught.value)
    assert stored_indexes(server, 3) == [0, 1, 2]


def _fast_retry() -> Any:
    from telemetry_sink.client import RetryPolicy

    return RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5)


async def test_async_client_batches_retries_and_surfaces_refusals(start_server: StartServer,
                                                                  recording_proxy: MakeProxy) -> None:
    server = start_server()
    proxy = recording_proxy(server.port, faults=lambda n, ex: "cut_request" if n == 0 else "")
    async with AsyncClient(proxy.url, max_batch_records=10, retry=_fast_retry()) as client:
        await client.send_many(records(24))
        await client.send(records(1, start=24)[0])
        await client.flush(timeout=30)
        assert client.stats.records_sent == 25 and client.stats.retries == 1
        await client.send_many([{"i": 99}])
        with pytest.raises(RejectedError) as caught:
            await client.flush()
        assert (caught.value.status, caught.value.index) == (422, 0)
    exchanges = proxy.snapshot()
    assert exchanges[0].fault == "cut_request"
    assert [len(body_records(ex)) for ex in exchanges[1:]] == [10, 10, 5, 1]
    assert exchanges[0].headers["idempotency-key"] == exchanges[1].headers["idempotency-key"]
    assert await asyncio.to_thread(stored_indexes, server, 25) == list(range(25))


def test_the_client_imports_none_of_the_servers_dependencies(start_server: StartServer) -> None:
    server = start_server()
    code = f"""
import sys
from telemetry_sink.client import Client, AsyncClient
from telemetry_sink.client import send_cmd
with Client({server.url!r}) as c:
    c.send({{"node_id": "lean", "i": 0}})
    c.flush()
heavy = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "prometheus_client", "cryptography",
         "pydantic", "telemetry_sink._speedups", "telemetry_sink.service", "telemetry_sink.http_server")
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported: {proc.stdout}"


def test_413_says_which_setting_to_change(start_server: StartServer) -> None:
    server = start_server({"ingest": {"max_body_bytes": 2048}})
    with pytest.raises(RejectedError, match="max_batch_bytes below the server's") as caught, \
            Client(server.url, max_batch_bytes=8192) as client:
        client.send_many(records(40, pad=60))  # ~4 KB
    assert (caught.value.status, caught.value.error) == (413, "payload_too_large")
