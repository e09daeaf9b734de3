"""POST /telemetry is answered before FastAPI: no ingest request ever enters FastAPI's app.

The lean path (today `IngestFastPath` in front of FastAPI; later possibly the HTTP protocol itself)
is what makes single-record ingest ~8x cheaper than FastAPI's routing (docs/BENCHMARKS.md), and
nothing else in the suite notices if it is switched off: every answer stays the same. So the real
server runs with a probe on `FastAPI.__call__` (installed by a `sitecustomize` module on
PYTHONPATH, so `serve` itself is unchanged) that writes down every HTTP request FastAPI sees.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from conftest import StartServer

PROBE = '''\
"""Test probe: append "METHOD PATH" for every HTTP request that enters a FastAPI app."""
import os

from fastapi import FastAPI

_call = FastAPI.__call__


async def _recording_call(self, scope, receive, send):
    if scope["type"] == "http":
        with open(os.environ["FASTAPI_PROBE_OUT"], "a") as out:
            out.write(f"{scope['method']} {scope['path']}\\n")
    await _call(self, scope, receive, send)


FastAPI.__call__ = _recording_call
'''

RECORD = b'{"node_id": "probe-1", "temp_c": 21.5}'
REQUESTS: list[tuple[bytes, dict[str, str], int]] = [
    (RECORD, {"content-type": "application/json"}, 202),
    (b"[" + RECORD + b"," + RECORD + b"]", {"content-type": "application/json"}, 202),
    (RECORD + b"\n" + RECORD + b"\n", {"content-type": "application/x-ndjson"}, 202),
    (gzip.compress(RECORD), {"content-type": "application/json", "content-encoding": "gzip"}, 202),
    (b'{"temp_c": 1}', {"content-type": "application/json"}, 422),  # no node_id: refused, by the same path
]


def test_post_telemetry_never_enters_fastapi(tmp_path: Path, start_server: StartServer) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    seen = tmp_path / "fastapi-requests.txt"
    server = start_server(env={"PYTHONPATH": str(probe_dir), "FASTAPI_PROBE_OUT": str(seen)})
    for body, headers, status in REQUESTS:
        response = server.post(body, headers=headers)
        assert response.status_code == status, response.text
    server.stop()
    requests = seen.read_text().splitlines()
    # The probe is live: the readiness polls of start_server went through FastAPI.
    assert "GET /healthz" in requests, requests
    assert [r for r in requests if r.startswith("POST")] == [], "POST /telemetry entered FastAPI's app"
