"""The client's on-disk spool: records outlive a server outage and a SIGKILL of the client process and are then
delivered once each; a full spool blocks or drops the oldest with a counter; one process per spool."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import StartServer, free_port, read_records, wait_for

from telemetry_sink.client import (
    Client,
    DeliveryTimeout,
    PendingFullError,
    RetryPolicy,
    SenderFailedError,
    SpoolLockedError,
)

FAST_RETRY = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.3)

# A client process: delivers 0..199 while the server is up, then (after a line on stdin) hands over 200..474
# while it is down: five sealed batches of 50 and an open one of 25, all only in the spool. Then it is killed.
FIRST_CLIENT = """
import sys, time
from telemetry_sink.client import Client, RetryPolicy
client = Client(sys.argv[2], spool_dir=sys.argv[1], max_batch_records=50, max_batch_age_s=3600,
                retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.3))
client.send_many({"node_id": "spool", "i": i} for i in range(200))
client.flush(timeout=60)
print("flushed", flush=True)
sys.stdin.readline()
client.send_many({"node_id": "spool", "i": i} for i in range(200, 475))
print("spooled", flush=True)
time.sleep(600)
"""

# The restarted client (asyncio this time): opens the spool and delivers what it finds.
SECOND_CLIENT = """
import asyncio, sys
from telemetry_sink.client import AsyncClient
async def main():
    client = AsyncClient(sys.argv[2], spool_dir=sys.argv[1])
    print(client.pending_records(), flush=True)
    await client.close(timeout=60)
    print(client.stats.records_sent, flush=True)
asyncio.run(main())
"""


def spool_files(spool: Path) -> list[str]:
    return sorted(p.suffix for p in spool.iterdir() if p.suffix in (".batch", ".open"))


def test_spool_survives_an_outage_and_a_client_kill_then_delivers_each_record_once(
        start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    spool = tmp_path / "spool"
    with subprocess.Popen([sys.executable, "-c", FIRST_CLIENT, str(spool), server.url],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as first:
        try:
            assert first.stdout is not None and first.stdin is not None
            assert first.stdout.readline().strip() == "flushed"
            server.stop()  # the outage (a graceful stop: what got a 202 is written)
            first.stdin.write("go\n")
            first.stdin.flush()
            assert first.stdout.readline().strip() == "spooled"
            assert spool_files(spool) == [".batch"] * 5 + [".open"]
        finally:
            first.send_signal(signal.SIGKILL)
    assert sorted(r["i"] for r in read_records(server.config_path)) == list(range(200))

    restarted = start_server(port=server.port)
    second = subprocess.run([sys.executable, "-c", SECOND_CLIENT, str(spool), restarted.url],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["275", "275"]
    assert spool_files(spool) == []
    stored = wait_for(lambda: (r := read_records(restarted.config_path)) and len(r) >= 475 and r,
                      what="all 475 records on disk")
    assert sorted(r["i"] for r in stored) == list(range(475)), "every record exactly once"


def test_a_torn_last_line_of_the_open_batch_is_cut_on_recovery(start_server: StartServer, tmp_path: Path) -> None:
    # What a power cut can leave (the process being killed cannot: each record is one write()).
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000000007.open").write_bytes(b'{"node_id":"torn","i":0}\n{"node_id":"torn","i":1}\n{"node_id":"to')
    server = start_server()
    with Client(server.url, spool_dir=spool) as client:
        client.send({"node_id": "torn", "i": 2})  # numbered after the recovered batch: sent after it
    stored = wait_for(lambda: (r := read_records(server.config_path)) and len(r) >= 3 and r, what="3 records")
    assert [r["i"] for r in stored] == [0, 1, 2]


def test_a_full_spool_drops_the_oldest_batches_with_a_counter_and_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, retried
    client = Client(nobody, spool_dir=spool, max_batch_records=5, max_batch_bytes=1000, max_pending_bytes=2000,
                    full_policy="drop_oldest", retry=FAST_RETRY)
    with caplog.at_level(logging.WARNING, "telemetry_sink.client"):
        client.send_many({"node_id": "full", "i": i} for i in range(200))  # ~30 bytes each, 6 KB in all
    dropped = client.stats.records_dropped
    assert dropped > 0 and dropped % 5 == 0, "whole batches, oldest first"
    assert dropped + client.pending_records() == 200, "every record is pending or counted as dropped"
    assert sum(p.stat().st_size for p in spool.iterdir() if p.suffix in (".batch", ".open")) <= 2000
    assert any("dropped the oldest batch" in r.getMessage() for r in caplog.records)
    with pytest.raises(DeliveryTimeout, match="stay in the spool"):
        client.close(timeout=0.2)
    # The kept records are the newest, and the next client finds them.
    with pytest.raises(DeliveryTimeout), Client(nobody, spool_dir=spool, retry=FAST_RETRY) as again:
        assert again.pending_records() == 200 - dropped
        again.close(timeout=0.2)


def test_a_full_buffer_blocks_then_raises_and_keeps_what_it_took(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    client = Client(nobody, max_batch_bytes=1000, max_pending_bytes=2000, block_timeout_s=0.3, retry=FAST_RETRY)
    with pytest.raises(PendingFullError, match="client buffer full"):
        for i in range(200):
            client.send({"node_id": "block", "i": i})
    assert client.stats.records_dropped == 0
    taken = i  # the record that raised was not taken
    assert client.pending_records() == taken
    with pytest.raises(DeliveryTimeout, match="no spool"):
        client.close(timeout=0.2)


def test_one_client_process_per_spool(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, spool_dir=tmp_path / "spool"), pytest.raises(SpoolLockedError, match="in use by another"):
        Client(url, spool_dir=tmp_path / "spool")


def test_a_spool_fault_stops_the_sender_loudly(start_server: StartServer, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = start_server()
    spool = tmp_path / "spool"
    client = Client(server.url, spool_dir=spool)
    (spool / "rejected").rmdir()  # an operator tidying up: the refused batch cannot be kept
    client.send({"i": 0})  # no node_id: refused
    with pytest.raises(SenderFailedError, match=r"sender stopped .*FileNotFoundError.*1 records not delivered"):
        client.flush(timeout=30)
    with pytest.raises(SenderFailedError):
        client.send({"node_id": "after", "i": 1})
    with pytest.raises(SenderFailedError):
        client.close(timeout=5)
    assert any("sender stopped" in r.getMessage() and r.exc_info for r in caplog.records)
    assert list(spool.glob("*.batch")), "the batch stays in the spool"


# Hands over one batch and waits a minute between attempts: killed after its first answer was lost.
PATIENT_CLIENT = """
import sys
from telemetry_sink.client import Client, RetryPolicy
client = Client(sys.argv[2], spool_dir=sys.argv[1], retry=RetryPolicy(initial_backoff_s=60, max_backoff_s=60))
client.send_many({"node_id": "restart", "i": i} for i in range(20))
client.flush(timeout=600)
"""


def test_a_restarted_client_retries_a_spooled_batch_with_its_key(start_server: StartServer, tmp_path: Path,
                                                                 recording_proxy: Callable[..., Any]) -> None:
    server = start_server()
    proxy = recording_proxy(server.port, faults=lambda n, ex: "drop_response" if n == 0 else "")
    spool = tmp_path / "spool"
    with subprocess.Popen([sys.executable, "-c", PATIENT_CLIENT, str(spool), proxy.url]) as first:
        try:
            wait_for(lambda: proxy.snapshot() and proxy.snapshot()[0].server_status, what="the first attempt stored")
        finally:
            first.send_signal(signal.SIGKILL)
    second = subprocess.run([sys.executable, "-c", SECOND_CLIENT, str(spool), proxy.url], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    lost, again = proxy.snapshot()
    assert (lost.fault, lost.server_status, lost.status, again.status) == ("drop_response", 202, None, 202)
    assert again.headers["idempotency-key"] == lost.headers["idempotency-key"] and again.body == lost.body
