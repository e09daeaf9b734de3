"""Fluent Bit 5.1.1 (../shared/peers/fluent-bit/) as a client: in_dummy -> record_modifier (node_id) -> out_http
posting to a real telemetry-sink server; the configurations docs/client.md documents. Skipped, with the
reason, when the binary is not there or cannot run (it needs libyaml-0-2)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, StartServer, free_port, read_records, wait_for

FLUENT_BIT = Path(os.environ.get("FLUENT_BIT_BIN", Path(__file__).resolve().parents[2] / "shared" / "peers"
                                 / "fluent-bit" / "fluent-bit"))


def _why_not_runnable() -> str | None:
    if not FLUENT_BIT.is_file():
        return f"Fluent Bit binary not found at {FLUENT_BIT} (set FLUENT_BIT_BIN)"
    try:
        proc = subprocess.run([str(FLUENT_BIT), "--version"], capture_output=True, timeout=30)
    except OSError as exc:
        return f"{FLUENT_BIT} does not run: {exc}"
    if proc.returncode != 0:
        return f"{FLUENT_BIT} --version failed (needs libyaml-0-2?): {proc.stderr.decode(errors='replace')[:200]}"
    return None


pytestmark = pytest.mark.skipif(bool(_why_not_runnable()), reason=_why_not_runnable() or "")


def fluent_bit_config(port: int, metrics_port: int, *, fmt: str, rate: int, samples: int, record: str,
                      flush_s: float, retry_limit: str = "5", node_header: str | None = None) -> str:
    """The documented out_http set-up (docs/client.md), fed by in_dummy; its own metrics on `metrics_port`.
    With `node_header`, the node id travels in that request header instead of a record_modifier filter."""
    node = f"    Header           {node_header} fluent-bit-node\n" if node_header else ""
    modifier = "" if node_header else (
        "[FILTER]\n    Name   record_modifier\n    Match  *\n    Record node_id fluent-bit-node\n")
    return f"""
[SERVICE]
    Flush        {flush_s}
    Grace        5
    Log_Level    info
    HTTP_Server  On
    HTTP_Listen  127.0.0.1
    HTTP_Port    {metrics_port}
[INPUT]
    Name    dummy
    Dummy   {record}
    Rate    {rate}
    Samples {samples}
{modifier}[OUTPUT]
    Name             http
    Match            *
    Host             127.0.0.1
    Port             {port}
    URI              /telemetry
    Format           {fmt}
    json_date_key    ts
    json_date_format double
    Retry_Limit      {retry_limit}
{node}"""


@pytest.fixture
def run_fluent_bit(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> subprocess.Popen[bytes]:
        path = tmp_path / f"fluent-bit-{len(procs)}.conf"
        path.write_text(config)
        log = open(tmp_path / f"fluent-bit-{len(procs)}.log", "wb")  # noqa: SIM115 - the child holds it
        procs.append(subprocess.Popen([str(FLUENT_BIT), "-c", str(path)], stdout=log, stderr=subprocess.STDOUT))
        log.close()
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_records(server: ServerProcess, expect: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    def probe() -> tuple[list[dict[str, Any]]] | None:  # a tuple: truthy even when no record is expected
        found = read_records(server.config_path)
        return (found,) if len(found) >= expect else None

    return wait_for(probe, timeout=timeout, what=f"{expect} records from Fluent Bit")[0]


def output_done(metrics_port: int, samples: int) -> dict[str, int]:
    """Fluent Bit's out_http counters once every generated record was either delivered or dropped."""
    def probe() -> dict[str, int] | None:
        try:
            out: dict[str, int] = httpx.get(f"http://127.0.0.1:{metrics_port}/api/v1/metrics",
                                            timeout=2).json()["output"]["http.0"]
        except (httpx.TransportError, ValueError, KeyError):
            return None
        return out if out["proc_records"] + out["dropped_records"] >= samples else None

    return wait_for(probe, timeout=60, what="Fluent Bit to deliver or drop every record")


@pytest.mark.parametrize("fmt", ["json", "json_lines"])
def test_fluent_bit_out_http_delivers_every_record(start_server: StartServer, run_fluent_bit: Any,
                                                   fmt: str) -> None:
    server = start_server()
    run_fluent_bit(fluent_bit_config(server.port, free_port(), fmt=fmt, rate=500, samples=1500,
                                     record='{"v": 1, "msg": "hello"}', flush_s=0.5))
    stored = wait_records(server, 1500)
    assert len(stored) == 1500
    assert all(r["node_id"] == "fluent-bit-node" and r["v"] == 1 for r in stored)
    assert all(isinstance(r["ts"], float) for r in stored), "json_date_key ts, json_date_format double"


BIG_RECORDS = {"fmt": "json_lines", "rate": 2000, "samples": 6000, "flush_s": 1,
               "record": '{"v": 2, "pad": "' + "x" * 1000 + '"}'}


def test_fluent_bit_big_chunks_all_arrive_with_the_default_body_limit(start_server: StartServer,
                                                                      run_fluent_bit: Any) -> None:
    # ~1 KB records at 2000/s with a 1 s flush: Fluent Bit posts ~1.8 MB bodies (its chunks reach ~2 MB of
    # msgpack, ~2.3 MB as JSON); the default max_body_bytes (4 MiB) takes them (docs/client.md).
    server = start_server()
    metrics = free_port()
    run_fluent_bit(fluent_bit_config(server.port, metrics, **BIG_RECORDS))
    assert output_done(metrics, 6000)["dropped_records"] == 0
    assert len(wait_records(server, 6000)) == 6000


def test_fluent_bit_loses_chunks_over_a_body_limit_below_its_chunk_size(start_server: StartServer,
                                                                        run_fluent_bit: Any) -> None:
    # Why the default is 4 MiB: against 1 MiB the server answers 413 (from Content-Length, closing the
    # connection unread, so Fluent Bit sees a 413 or a reset connection) and Fluent Bit drops the whole chunk
    # once its retries are spent (none here; each retry would be refused the same way).
    server = start_server({"ingest": {"max_body_bytes": 1024 * 1024}, "rate_limit": {"burst_bytes": 8 << 20}})
    metrics = free_port()
    run_fluent_bit(fluent_bit_config(server.port, metrics, retry_limit="no_retries", **BIG_RECORDS))
    done = output_done(metrics, 6000)
    assert done["dropped_records"] > 0
    assert len(wait_records(server, done["proc_records"])) == done["proc_records"] < 6000


def test_fluent_bit_without_a_node_field_sends_it_in_a_header(start_server: StartServer, run_fluent_bit: Any) -> None:
    # No record_modifier filter: out_http's `Header X-Node-Id ...` and [ingest] node_id_header fill node_id in.
    server = start_server({"ingest": {"node_id_header": "X-Node-Id"}})
    run_fluent_bit(fluent_bit_config(server.port, free_port(), fmt="json", rate=200, samples=400,
                                     record='{"v": 3}', flush_s=0.5, node_header="X-Node-Id"))
    stored = wait_records(server, 400)
    assert len(stored) == 400 and all(r["node_id"] == "fluent-bit-node" and r["v"] == 3 for r in stored)
