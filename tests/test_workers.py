"""[server] workers = N: N processes, each with its own writer and segment series, sharing
the global rate limit evenly; a graceful stop drains every one of them."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import orjson
from conftest import StartServer, run_cli, wait_for

from telemetry_sink import segment_format
from telemetry_sink.testing import StalledPost


def records_by_series(data: Path) -> dict[str, int]:
    """Records in the whole batches of each segment series in `data` (a batch being written is left out)."""
    counts: dict[str, int] = {}
    for path in segment_format.list_segments(data):
        with segment_format.SegmentImage(path) as image:
            n = sum(item.count for item in image.batches() if isinstance(item, segment_format.Batch))
        series = segment_format.parse_segment_name(path)[0]
        counts[series] = counts.get(series, 0) + n
    return counts


def test_two_workers_write_separate_series_and_lose_nothing(start_server: StartServer,
                                                           tmp_path: Path, key_file: Path) -> None:
    server = start_server({"server": {"workers": 2}, "rate_limit": {"bytes_per_second": 0}})
    data = tmp_path / "data"
    sent = []
    # A new connection per request (320 of them): whichever worker accepts first takes it, so both get some.
    with httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0),
                      headers={"content-type": "application/json"}) as client:
        for n in range(40):
            for c in range(8):
                record = {"node_id": f"n{c}", "i": n}
                assert client.post("/telemetry", content=orjson.dumps(record)).status_code == 202
                sent.append(record)
    # Each worker wrote records of its own series, while both run.
    wait_for(lambda: sum(records_by_series(data).values()) == len(sent), what="every record on disk")
    written = {series for series, n in records_by_series(data).items() if n}
    assert len(written) == 2 and written <= {"w0", "w1", "w2", "w3"}, records_by_series(data)
    server.signal(signal.SIGTERM)
    assert server.wait() in (0, -signal.SIGTERM)
    assert server.log().count("shutdown complete:") == 2  # each worker drained its own writer
    read = run_cli("read", "--key-file", str(key_file), str(data))
    stored = [orjson.loads(line) for line in read.stdout.splitlines()]
    assert sorted((r["node_id"], r["i"]) for r in stored) == sorted((r["node_id"], r["i"]) for r in sent)
    assert run_cli("verify", str(data)).returncode == 0


def test_global_rate_limit_is_split_evenly_between_workers(start_server: StartServer) -> None:
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


def test_burst_share_smaller_than_max_body_is_refused_at_start_up(start_server: StartServer) -> None:
    server = start_server({"server": {"workers": 4}, "ingest": {"max_body_bytes": 10000},
                           "rate_limit": {"burst_bytes": 20000}}, wait=False)
    assert server.wait() == 2
    assert "[ingest] max_body_bytes: 10000 exceeds [rate_limit] burst_bytes 20000 / 4 workers = 5000" in server.log()


def test_sigterm_with_two_workers_refuses_new_records_and_finishes_in_flight_ones(
        start_server: StartServer, tmp_path: Path, key_file: Path) -> None:
    # The early 503 on SIGTERM is the app's lifespan, in each worker: a request whose body is
    # still arriving when the signal comes is refused (503 shutting_down) instead of being
    # acknowledged after the drain began; what was accepted before is on disk.
    server = start_server({"server": {"workers": 2}, "rate_limit": {"bytes_per_second": 0}})
    assert server.post(b'{"node_id": "early"}').status_code == 202
    in_flight = StalledPost(server.port, b'{"node_id": "late",', b' "i": 1}')
    in_flight.wait_read()  # a worker holds the request, its body half read
    server.signal(signal.SIGTERM)
    wait_for(lambda: server.log().count("Shutting down") >= 2, what="both workers to begin their shutdown")
    status, body = in_flight.finish()
    assert status == 503 and orjson.loads(body)["error"] == "shutting_down", body
    assert server.wait() in (0, -signal.SIGTERM)
    assert server.log().count("shutdown complete:") == 2
    read = run_cli("read", "--key-file", str(key_file), str(tmp_path / "data"))
    assert [orjson.loads(line)["node_id"] for line in read.stdout.splitlines()] == ["early"]
