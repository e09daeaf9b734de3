"""Idempotency-Key: the key table, and a real server answering repeats, conflicts and in-flight
duplicates, and remembering answered keys across SIGKILL with durable acks."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, run_cli, wait_for
from test_http_server import cli_read

from telemetry_sink import segment_format
from telemetry_sink.auth import hash_token
from telemetry_sink.errors import IngestError
from telemetry_sink.idempotency import IdempotencyTable, Replayed, parse_key
from telemetry_sink.segment_format import KeyEntry
from telemetry_sink.segment_keys import recent_keys

StartServer = Callable[..., ServerProcess]
DURABLE = {"ingest": {"ack": "durable"}, "writer": {"fsync": "batch"}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(n: int, tag: str = "n") -> bytes:
    return orjson.dumps([{"node_id": tag, "i": i} for i in range(n)])


def keyed(server: ServerProcess, data: bytes, key: str, **kw: object) -> httpx.Response:
    headers = {"idempotency-key": f'"{key}"', **kw.pop("headers", {})}  # type: ignore[dict-item]
    return server.post(data, headers=headers, **kw)  # type: ignore[arg-type]


def segment_flags(directory: Path) -> list[int]:
    out = []
    for path in segment_format.list_segments(directory):
        with segment_format.SegmentImage(path) as image:
            out.append(image.flags)
    return out


# -- the header --


@pytest.mark.parametrize(("raw", "key"), [(b'"abc-1"', b"abc-1"), (b"abc-1", b"abc-1"), (b' "x" ', b"x"),
                                          (b'"' + b"k" * 255 + b'"', b"k" * 255)])
def test_parse_key_takes_an_sf_string_or_a_bare_value(raw: bytes, key: bytes) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize("raw", [b"", b'""', b"k" * 256, b'"a\x01b"', "é".encode()])
def test_parse_key_refuses_empty_long_or_unprintable_keys(raw: bytes) -> None:
    with pytest.raises(IngestError) as info:
        parse_key(raw)
    assert info.value.status == 400 and "Idempotency-Key" in info.value.detail


# -- the table --


def test_table_replays_refuses_other_bodies_and_in_flight_duplicates() -> None:
    table = IdempotencyTable(60, 10, clock=Clock())
    assert table.begin(b"k", b"body") is None
    with pytest.raises(IngestError) as busy:
        table.begin(b"k", b"body")
    assert busy.value.status == 409 and busy.value.retry_after_s
    table.finish(b"k", 3)
    replay = table.begin(b"k", b"body")
    assert replay == 3 and isinstance(replay, Replayed)
    with pytest.raises(IngestError) as other:
        table.begin(b"k", b"other body")
    assert other.value.status == 422 and other.value.error == "idempotency_key_reused"
    assert table.replays == 1


def test_abandoned_key_is_new_again() -> None:
    table = IdempotencyTable(60, 10, clock=Clock())
    assert table.begin(b"k", b"body") is None
    table.abandon(b"k")
    assert table.begin(b"k", b"another body") is None


def test_keys_expire_after_the_window() -> None:
    clock = Clock()
    table = IdempotencyTable(60, 10, clock=clock)
    table.begin(b"k", b"body")
    table.finish(b"k", 1)
    clock.now += 59.9
    assert table.begin(b"k", b"body") == 1
    clock.now += 0.2
    assert table.begin(b"k", b"other body") is None  # forgotten: a new request
    assert len(table) == 1


def test_max_keys_evicts_the_oldest_answered_key_never_one_in_flight() -> None:
    table = IdempotencyTable(60, 2, clock=Clock())
    table.begin(b"busy", b"x")
    table.begin(b"a", b"x")
    table.finish(b"a", 1)
    table.begin(b"b", b"x")  # full: "a" (answered) goes, "busy" stays
    assert table.evicted == 1 and len(table) == 2
    with pytest.raises(IngestError):
        table.begin(b"busy", b"x")
    with pytest.raises(IngestError) as full:
        table.begin(b"c", b"x")  # both in flight: nothing may go
    assert full.value.status == 503


def test_load_keeps_recent_entries_and_skips_expired_ones() -> None:
    clock, wall = Clock(), Clock()
    wall.now = 10_000.0
    table = IdempotencyTable(60, 10, clock=clock, wall_clock=wall)
    entries = [(int((wall.now - age) * 1000), KeyEntry(bytes([i]) * 32, b"b" * 32, i))
               for i, age in enumerate((120, 30, 1))]
    assert table.load(entries) == 2
    assert table.begin(bytes([1]) * 32, b"b" * 32) == 1
    assert table.begin(bytes([0]) * 32, b"b" * 32) is None
    clock.now += 30.5  # entry 1 was 30 s old: its window has passed now
    assert table.begin(bytes([1]) * 32, b"other" * 6) is None


# -- a real server --


def test_repeat_gets_the_first_answer_and_stores_nothing(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    first = keyed(server, body(3), "batch-1")
    assert first.status_code == 202 and first.json() == {"accepted": 3}
    assert "idempotent-replayed" not in first.headers
    again = keyed(server, body(3), "batch-1")
    assert again.status_code == 202 and again.json() == {"accepted": 3}
    assert again.headers["idempotent-replayed"] == "true"
    other = keyed(server, body(2), "batch-1")
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    assert keyed(server, body(2), "batch-2").json() == {"accepted": 2}
    assert server.post(body(1)).status_code == 202  # no key: as before
    assert server.post(body(1)).status_code == 202
    bad = server.post(body(1), headers={"idempotency-key": ""})
    assert bad.status_code == 400
    metrics = httpx.get(server.url + "/metrics").text
    assert "telemetry_sink_idempotent_replays_total 1.0" in metrics
    assert "telemetry_sink_idempotency_keys 2.0" in metrics
    server.stop()
    assert len(cli_read(server.config_path)) == 3 + 2 + 1 + 1
    assert segment_flags(tmp_path / "data") == [segment_format.FLAG_KEYED]


def test_keys_are_scoped_by_token(start_server: StartServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"n {hash_token('token-one')}\nn {hash_token('token-two')}\n")
    server = start_server({"auth": {"tokens_file": str(tokens)}})
    for token in ("token-one", "token-two"):
        response = keyed(server, body(2), "same-key", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 202 and "idempotent-replayed" not in response.headers
    response = keyed(server, body(2), "same-key", headers={"authorization": "Bearer token-two"})
    assert response.headers["idempotent-replayed"] == "true"
    server.stop()
    assert len(cli_read(server.config_path)) == 4


def test_duplicate_while_the_first_is_in_flight_gets_409(start_server: StartServer) -> None:
    # Durable acks and a long linger: the first request waits in the buffer for its batch.
    server = start_server({**DURABLE, "writer": {"fsync": "batch", "flush_interval_ms": 3000}})
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(keyed(server, body(2), "slow")))
    first.start()

    def buffered() -> bool:
        return bool(httpx.get(server.url + "/healthz").json()["buffer_records"])

    wait_for(buffered, what="the first request in the buffer")
    busy = keyed(server, body(2), "slow")
    assert busy.status_code == 409 and busy.json()["error"] == "request_in_progress"
    assert busy.headers["retry-after"] == "1"
    first.join(30)
    assert results[0].status_code == 202
    assert keyed(server, body(2), "slow").headers["idempotent-replayed"] == "true"


def test_answered_keys_survive_sigkill_with_durable_acks(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(DURABLE)
    assert keyed(server, body(4, "a"), "k-a").json() == {"accepted": 4}
    assert keyed(server, body(1, "b"), "k-b").json() == {"accepted": 1}
    server.signal(signal.SIGKILL)
    server.wait()

    restarted = start_server(DURABLE)
    assert "idempotency: 2 keys" in restarted.log()
    again = keyed(restarted, body(4, "a"), "k-a")
    assert again.status_code == 202 and again.json() == {"accepted": 4}
    assert again.headers["idempotent-replayed"] == "true"
    assert keyed(restarted, body(2, "b"), "k-b").status_code == 422
    assert keyed(restarted, body(1, "c"), "k-c").headers.get("idempotent-replayed") is None
    restarted.stop()
    stored = cli_read(restarted.config_path)
    assert sorted(r["node_id"] for r in stored) == ["a"] * 4 + ["b", "c"]
    assert run_cli("verify", "--config", str(restarted.config_path)).returncode == 0


def test_a_request_lost_in_flight_by_a_crash_is_stored_by_its_retry(start_server: StartServer) -> None:
    server = start_server({**DURABLE, "writer": {"fsync": "batch", "flush_interval_ms": 5000}})
    failed: list[BaseException] = []

    def send() -> None:
        try:
            keyed(server, body(3), "lost")
        except httpx.TransportError as exc:
            failed.append(exc)

    first = threading.Thread(target=send)
    first.start()
    wait_for(lambda: httpx.get(server.url + "/healthz").json()["buffer_records"], what="the request buffered")
    server.signal(signal.SIGKILL)
    server.wait()
    first.join(30)
    assert failed, "the first attempt should have lost its connection"

    restarted = start_server(DURABLE)
    retry = keyed(restarted, body(3), "lost")
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers
    restarted.stop()
    assert len(cli_read(restarted.config_path)) == 3


def test_older_unflagged_segments_stay_readable_and_a_keyed_writer_starts_a_new_one(
        start_server: StartServer, tmp_path: Path) -> None:
    old = start_server({"ingest": {"idempotency_window_s": 0}})
    assert keyed(old, body(2, "old"), "ignored").status_code == 202
    assert keyed(old, body(2, "old"), "ignored").headers.get("idempotent-replayed") is None  # off: stored twice
    old.stop()
    assert segment_flags(tmp_path / "data") == [0]

    new = start_server()
    assert keyed(new, body(1, "new"), "k").status_code == 202
    new.stop()
    assert segment_flags(tmp_path / "data") == [0, segment_format.FLAG_KEYED]
    assert [r["node_id"] for r in cli_read(new.config_path)] == ["old"] * 4 + ["new"]
    assert run_cli("verify", "--config", str(new.config_path)).returncode == 0
    ((created_ms, entry),) = recent_keys(tmp_path / "data", 0, 10)
    assert entry.accepted == 1 and created_ms > 0
