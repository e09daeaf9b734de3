"""[server] workers = N: N processes, each with its own writer and segment series, sharing
the global rate limit evenly; a graceful stop drains every one of them."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
from conftest import HeldBodyPost, ServerProcess, run_cli, wait_for

from telemetry_sink import segment_format


def test_two_workers_write_separate_series_and_lose_nothing(start_server: Callable[..., ServerProcess],
                                                           tmp_path: Path, key_file: Path) -> None:
    server = start_server({"server": {"workers": 2}, "rate_limit": {"bytes_per_second": 0}})
    sent = []
    clients = [httpx.Client(timeout=10) for _ in range(8)]  # several connections: the kernel spreads them
    try:
        for n in range(40):
            for c, client in enumerate(clients):
                record = {"node_id": f"n{c}", "i": n}
                r = client.post(server.url + "/telemetry", content=orjson.dumps(record),
                                headers={"content-type": "application/json"})
                assert r.status_code == 202
                sent.append(record)
    finally:
        for client in clients:
            client.close()
    server.signal(signal.SIGTERM)
    assert server.wait() in (0, -signal.SIGTERM)
    assert server.log().count("shutdown complete:") == 2  # each worker drained its own writer
    data = tmp_path / "data"
    series = {p.name.split("-")[0] for p in segment_format.list_segments(data)}
    assert series <= {"w0", "w1", "w2", "w3"} and len(series) >= 1
    read = run_cli("read", "--key-file", str(key_file), str(data))
    stored = [orjson.loads(line) for line in read.stdout.splitlines()]
    assert sorted((r["node_id"], r["i"]) for r in stored) == sorted((r["node_id"], r["i"]) for r in sent)
    assert run_cli("verify", str(data)).returncode == 0


def test_global_rate_limit_is_split_evenly_between_workers(start_server: Callable[..., ServerProcess]) -> None:
    # 20000 bytes of burst over 2 workers: 10000 each. One keep-alive connection stays on one
    # worker, so a second 8000-byte body must wait although a single process would let it pass.
    server = start_server({"server": {"workers": 2}, "ingest": {"max_body_bytes": 10000},
                           "rate_limit": {"bytes_per_second": 100, "burst_bytes": 20000}})
    body = orjson.dumps({"node_id": "n", "pad": "x" * 7970})
    assert 7990 < len(body) <= 8000
    with httpx.Client(timeout=10) as client:
        first = client.post(server.url + "/telemetry", content=body, headers={"content-type": "application/json"})
        second = client.post(server.url + "/telemetry", content=body, headers={"content-type": "application/json"})
    assert first.status_code == 202
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    server.stop()


def test_burst_share_smaller_than_max_body_is_refused_at_start_up(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server({"server": {"workers": 4}, "ingest": {"max_body_bytes": 10000},
                           "rate_limit": {"burst_bytes": 20000}}, wait=False)
    assert server.wait() == 2
    assert "[ingest] max_body_bytes: 10000 exceeds [rate_limit] burst_bytes 20000 / 4 workers = 5000" in server.log()


def test_sigterm_with_two_workers_refuses_new_records_and_finishes_in_flight_ones(
        start_server: Callable[..., ServerProcess], tmp_path: Path, key_file: Path) -> None:
    # The early 503 on SIGTERM is the app's lifespan, in each worker: a request whose body is
    # still arriving when the signal comes is refused (503 shutting_down) instead of being
    # acknowledged after the drain began; what was accepted before is on disk.
    server = start_server({"server": {"workers": 2}, "rate_limit": {"bytes_per_second": 0}})
    assert server.post(b'{"node_id": "early"}').status_code == 202
    with HeldBodyPost(server.url, b'{"node_id": "late",', b' "i": 1}') as in_flight:
        server.signal(signal.SIGTERM)
        wait_for(lambda: server.log().count("Shutting down") >= 2, what="both workers to begin their shutdown")
        response = in_flight.finish()
    assert response.status_code == 503 and response.json()["error"] == "shutting_down", response.text
    assert server.wait() in (0, -signal.SIGTERM)
    assert server.log().count("shutdown complete:") == 2
    read = run_cli("read", "--key-file", str(key_file), str(tmp_path / "data"))
    assert [orjson.loads(line)["node_id"] for line in read.stdout.splitlines()] == ["early"]
