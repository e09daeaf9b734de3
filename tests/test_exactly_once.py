"""End to end, exactly once: numbered records sent in keyed batches through a TCP proxy that drops
responses after the request reached the server and cuts connections mid-request, while the server
(durable acks) is SIGKILLed and restarted several times; afterwards every record is in the log once."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, wait_for
from test_http_server import cli_read

StartServer = Callable[..., ServerProcess]
DURABLE = {"ingest": {"ack": "durable"}, "writer": {"fsync": "batch", "flush_interval_ms": 10},
           "rate_limit": {"bytes_per_second": 0}}


class FaultyProxy:
    """A loopback TCP proxy to the current server. Each connection, by a seeded draw: passes through,
    or forwards the request and then drops the server's response (`drop_response`), or forwards only
    half of the first bytes the client sent and closes both sides (`cut_request`)."""

    FAULTS = ("pass", "drop_response", "cut_request")

    def __init__(self, seed: int, weights: tuple[int, int, int] = (6, 2, 2)) -> None:
        self.upstream_port = 0
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._weights = weights
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                fault = self._rng.choices(self.FAULTS, self._weights)[0]
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _serve(self, client: socket.socket, fault: str) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                upstream = stack.enter_context(socket.create_connection(("127.0.0.1", self.upstream_port), 5))
            except OSError:
                self._count("server_down")
                return
            client.settimeout(10)
            upstream.settimeout(10)
            try:
                if fault == "cut_request":
                    first = client.recv(65536)
                    upstream.sendall(first[: len(first) // 2])
                    self._count(fault)
                    return
                threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
                if fault == "drop_response":
                    if upstream.recv(65536):  # the server answered: the request reached it whole
                        self._count(fault)
                    return
                _pump(upstream, client)
                self._count(fault)
            except OSError:
                self._count("broken")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class KeyedSender:
    """Delivers numbered records in batches, each with one Idempotency-Key reused on every retry,
    retrying connection errors, 409, 429 and 503 until the batch gets its 202."""

    def __init__(self, url: str, first: int, count: int, batch: int) -> None:
        self.url = url
        self.batches = [list(range(i, min(i + batch, first + count))) for i in range(first, first + count, batch)]
        self.counts: Counter[str] = Counter()
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=5.0) as client:
                for numbers in self.batches:
                    self._deliver(client, numbers)
                    self.acked += 1
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _deliver(self, client: httpx.Client, numbers: list[int]) -> None:
        body = b"\n".join(orjson.dumps({"node_id": "exactly-once", "n": n}) for n in numbers)
        headers = {"content-type": "application/x-ndjson", "idempotency-key": f'"{uuid.uuid4()}"'}
        for _attempt in range(2000):
            try:
                response = client.post(self.url + "/telemetry", content=body, headers=headers)
            except httpx.TransportError:
                self.counts["transport_error"] += 1
                time.sleep(0.02)  # back-off before the retry, not a synchronisation
                continue
            if response.status_code == 202:
                assert response.json() == {"accepted": len(numbers)}
                self.counts["replayed" if response.headers.get("idempotent-replayed") else "stored"] += 1
                return
            assert response.status_code in (409, 429, 503), response.text
            self.counts[str(response.status_code)] += 1
            time.sleep(0.02)
        raise AssertionError(f"batch {numbers[0]}.. was never acknowledged")


@pytest.mark.slow
def test_every_record_is_stored_exactly_once_through_faults_and_crashes(start_server: StartServer) -> None:
    server = start_server(DURABLE)
    proxy = FaultyProxy(seed=13)
    proxy.upstream_port = server.port
    senders = [KeyedSender(f"http://127.0.0.1:{proxy.port}", i * 1000, 1000, 20) for i in range(3)]
    threads = [threading.Thread(target=s.run) for s in senders]
    for t in threads:
        t.start()
    total = sum(len(s.batches) for s in senders)
    kills = 0
    try:
        for threshold in (total // 5, 2 * total // 5, 3 * total // 5):
            wait_for(lambda t=threshold: sum(s.acked for s in senders) >= t or any(s.error for s in senders),
                     timeout=120, what=f"{threshold} acknowledged batches")
            server.signal(signal.SIGKILL)
            server.wait()
            kills += 1
            server = start_server(DURABLE)
            proxy.upstream_port = server.port
        for t in threads:
            t.join(180)
    finally:
        proxy.close()
    for s in senders:
        assert s.error is None, s.error
    server.stop()

    numbers = sorted(r["n"] for r in cli_read(Path(server.config_path)))
    assert numbers == list(range(3000)), "records lost or stored twice"
    counts = sum((s.counts for s in senders), Counter())
    # The run exercised what it claims: faults of each kind, crashes, and repeats answered from the keys.
    assert kills == 3
    assert proxy.counts["drop_response"] > 0 and proxy.counts["cut_request"] > 0, proxy.counts
    assert counts["replayed"] > 0 and counts["transport_error"] > 0, counts
