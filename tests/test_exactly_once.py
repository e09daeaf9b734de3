"""End to end, exactly once: telemetry_sink.client sends numbered records through a loopback proxy that loses
answers after the request reached the server and cuts connections mid-request, while the server (durable
acks) is SIGKILLed and restarted several times; afterwards every record is in the log exactly once."""

from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerProcess, wait_for
from loopback_proxy import Exchange, RecordingProxy
from test_http_server import cli_read

from telemetry_sink.client import Client
from telemetry_sink.client.retry import RetryPolicy

StartServer = Callable[..., ServerProcess]
DURABLE = {"ingest": {"ack": "durable"}, "writer": {"fsync": "batch", "flush_interval_ms": 10},
           "rate_limit": {"bytes_per_second": 0}}
SENDERS, RECORDS_EACH = 3, 1000


def seeded_faults(seed: int) -> Callable[[int, Exchange], str]:
    """Six in ten requests pass, two lose their answer after reaching the server, two are cut mid-body."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan(n: int, ex: Exchange) -> str:
        with lock:
            return rng.choices(("", "drop_response", "cut_request"), (6, 2, 2))[0]

    return plan


def send_numbered(url: str, first: int, errors: list[BaseException]) -> None:
    """One sensor: RECORDS_EACH numbered records in batches of 20, then flush and close."""
    try:
        client = Client(url, max_batch_records=20, max_batch_age_s=0.05, timeout_s=5.0,
                        retry=RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.5))
        try:
            for n in range(first, first + RECORDS_EACH):
                client.send({"node_id": "exactly-once", "n": n})
            client.flush(timeout=240)
        finally:
            client.close(timeout=30)
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


@pytest.mark.slow
def test_every_record_is_stored_exactly_once_through_faults_and_crashes(start_server: StartServer) -> None:
    server = start_server(DURABLE)
    proxy = RecordingProxy(server.port, faults=seeded_faults(13))
    errors: list[BaseException] = []
    threads = [threading.Thread(target=send_numbered, args=(proxy.url, i * RECORDS_EACH, errors))
               for i in range(SENDERS)]
    for t in threads:
        t.start()

    def acknowledged() -> int:
        return sum(ex.status == 202 for ex in proxy.snapshot())

    batches = SENDERS * RECORDS_EACH // 20
    kills = 0
    try:
        for threshold in (batches // 5, 2 * batches // 5, 3 * batches // 5):
            wait_for(lambda t=threshold: acknowledged() >= t or errors, timeout=120,
                     what=f"{threshold} acknowledged batches")
            server.signal(signal.SIGKILL)
            server.wait()
            kills += 1
            server = start_server(DURABLE)
            proxy.upstream_port = server.port
        for t in threads:
            t.join(300)
    finally:
        proxy.close()
    assert not errors, errors
    server.stop()

    numbers = sorted(r["n"] for r in cli_read(Path(str(server.config_path))))
    assert numbers == list(range(SENDERS * RECORDS_EACH)), "records lost or stored twice"
    # The run exercised what it claims: faults of each kind, crashes, and repeats answered from the keys.
    exchanges = proxy.snapshot()
    faults = Counter(ex.fault for ex in exchanges)
    assert kills == 3 and faults["drop_response"] > 0 and faults["cut_request"] > 0, faults
    assert any(ex.answer_headers.get("idempotent-replayed") == "true" for ex in exchanges)
    assert all("idempotency-key" in ex.headers for ex in exchanges)
