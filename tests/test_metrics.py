"""End to end: /metrics (Prometheus text format) and /readyz vs /healthz against a real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
from conftest import ServerProcess, StartServer, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from telemetry_sink import segment_format, speedups

P = "telemetry_sink"


class Scrape:
    """One parsed /metrics scrape: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        for sample in self.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        return None

    def get(self, name: str, **labels: str) -> float:
        value = self.value(name, **labels)
        assert value is not None, f"no sample {name}{labels or ''} in {sorted({s.name for s in self.samples})}"
        return value


def scrape(server: ServerProcess) -> Scrape:
    response = httpx.get(server.url + "/metrics", timeout=5.0)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return Scrape(response.text)


def record(node: str, i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"node_id": node, "ts": 1.0, "i": i, "pad": "x" * pad})


def segments_on_disk(directory: Path) -> tuple[int, int]:
    paths = segment_format.list_segments(directory)
    return len(paths), sum(p.stat().st_size for p in paths)


def test_metrics_count_every_outcome(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server({
        "ingest": {"max_body_bytes": 4096},
        "rate_limit": {"bytes_per_second": 1, "burst_bytes": 4096, "mode": "reject"},
        "writer": {"fsync": "batch", "flush_interval_ms": 20, "max_segment_bytes": 700},
    })
    before = scrape(server)
    assert before.value(f"{P}_requests_total", status="202") is None
    assert before.get(f"{P}_records_accepted_total") == 0
    assert before.get(f"{P}_segments") == segments_on_disk(tmp_path / "data")[0]

    received = 0
    accepted = 0
    for i in range(5):  # 202: one record each
        body = record("metrics-node", i)
        assert server.post(body).status_code == 202
        received += len(body)
        accepted += 1
    body = orjson.dumps([{"node_id": "metrics-node", "ts": 2.0, "i": i} for i in range(3)])
    assert server.post(body).status_code == 202  # 202: three records
    received += len(body)
    accepted += 3
    for _ in range(2):  # 415: refused on the headers, the body is never read
        assert server.post(b'{"node_id":"n"}', content_type="text/plain").status_code == 415
    for bad in (b'{"ts":1}', b'[{"node_id":""}]', b'{"node_id":7}'):  # 422
        assert server.post(bad).status_code == 422
        received += len(bad)
    assert server.post(b"{not json").status_code == 400
    received += len(b"{not json")
    big = record("too-much", 0, pad=3900)
    for _ in range(2):  # 429: the 4096-byte burst is mostly spent and refills at 1 B/s
        response = server.post(big)
        assert response.status_code == 429, response.text
        received += len(big)

    def written() -> Scrape | None:
        s = scrape(server)
        return s if s.get(f"{P}_records_written_total") == accepted and s.get(f"{P}_buffer_records") == 0 else None

    s = wait_for(written, what=f"{accepted} records written")
    assert s.get(f"{P}_requests_total", status="202") == 6
    assert s.get(f"{P}_requests_total", status="400") == 1
    assert s.get(f"{P}_requests_total", status="415") == 2
    assert s.get(f"{P}_requests_total", status="422") == 3
    assert s.get(f"{P}_requests_total", status="429") == 2
    assert s.value(f"{P}_requests_total", status="500") is None
    assert s.get(f"{P}_rejected_requests_total", reason="unsupported_media_type") == 2
    assert s.get(f"{P}_rejected_requests_total", reason="invalid_record") == 3
    assert s.get(f"{P}_rejected_requests_total", reason="invalid_json") == 1
    assert s.get(f"{P}_rejected_requests_total", reason="rate_limited") == 2
    rejected_reasons = {x.labels["reason"] for x in s.families[f"{P}_rejected_requests"].samples}
    assert rejected_reasons == {"unsupported_media_type", "invalid_record", "invalid_json", "rate_limited"}
    assert s.get(f"{P}_records_accepted_total") == accepted
    # Wire bytes of every body that was read: 202s, 400, 422s and 429s (not the 415s, refused on headers).
    assert s.get(f"{P}_received_bytes_total") == received
    assert s.get(f"{P}_write_errors_total") == 0
    assert s.get(f"{P}_buffer_records") == 0
    assert s.get(f"{P}_buffer_bytes") == 0

    # Histograms: the writer observed every batch; fsync = batch fsyncs each one.
    batches = s.get(f"{P}_batch_records_count")
    assert batches >= 1
    assert s.get(f"{P}_batch_records_sum") == accepted
    assert s.get(f"{P}_flush_seconds_count") == batches
    assert s.get(f"{P}_flush_seconds_sum") > 0
    assert s.get(f"{P}_fsync_seconds_count") >= batches
    assert s.get(f"{P}_fsync_seconds_bucket", le="+Inf") == s.get(f"{P}_fsync_seconds_count")
    assert s.families[f"{P}_batch_records"].type == "histogram"

    # Segment gauges match the files on disk (700-byte segments: the writes rolled over).
    count, size = segments_on_disk(tmp_path / "data")
    assert count >= 2
    assert s.get(f"{P}_segments") == count
    assert s.get(f"{P}_segment_bytes") == size
    # Bytes appended by the writer: the batches, without each file's header (nothing deleted here).
    assert s.get(f"{P}_written_bytes_total") == size - count * segment_format.FILE_HEADER_SIZE

    # The implementation in use, as an info metric and as /healthz reports it.
    implementation = httpx.get(server.url + "/healthz", timeout=5.0).json()["implementation"]
    assert implementation == speedups.IMPLEMENTATION
    assert s.get(f"{P}_build_info", implementation=implementation) == 1
    assert s.families[f"{P}_requests"].type == "counter"
    assert s.families[f"{P}_buffer_records"].type == "gauge"
    # /metrics and the other GETs are not counted as ingest requests.
    assert scrape(server).get(f"{P}_requests_total", status="202") == 6
    assert server.stop() in (0, -15)


def test_buffer_gauges_and_readyz_above_high_water(start_server: StartServer) -> None:
    server = start_server({
        "buffer": {"max_records": 10, "high_water_percent": 50},
        "writer": {"batch_size": 10, "flush_interval_ms": 60000},
    })
    ready = httpx.get(server.url + "/readyz", timeout=5.0)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}

    bodies = [record("rz", i) for i in range(5)]
    for body in bodies[:4]:  # 40%: still ready
        assert server.post(body).status_code == 202
    assert httpx.get(server.url + "/readyz", timeout=5.0).status_code == 200
    assert server.post(bodies[4]).status_code == 202  # 50%: at the high-water mark

    s = scrape(server)
    assert s.get(f"{P}_buffer_records") == 5
    assert s.get(f"{P}_buffer_bytes") == sum(map(len, bodies))  # plaintext = the compact body (ts given)
    assert s.get(f"{P}_records_written_total") == 0

    not_ready = httpx.get(server.url + "/readyz", timeout=5.0)
    assert not_ready.status_code == 503
    assert not_ready.headers["content-type"] == "application/json"
    body = not_ready.json()
    assert body["status"] == "not_ready"
    assert isinstance(body["reasons"], list) and len(body["reasons"]) == 1
    assert "buffer" in body["reasons"][0] and "50%" in body["reasons"][0]

    # Liveness is unaffected: the writer is alive.
    health = httpx.get(server.url + "/healthz", timeout=5.0)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["buffer_records"] == 5
    # Ingest still works until the buffer is really full.
    assert server.post(record("rz", 5)).status_code == 202
    assert server.stop() in (0, -15)
