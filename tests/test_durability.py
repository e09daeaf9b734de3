"""Durability under real faults: SIGKILL mid-load (durable acks), SIGTERM under load, a full
disk (a size-limited tmpfs), a stalled disk (injected), all against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, run_cli, wait_for, write_log

from telemetry_sink import segment_format, segment_writer
from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.http_server import create_app
from telemetry_sink.rate_limiter import RateLimiter
from telemetry_sink.segment_writer import SegmentWriter
from telemetry_sink.service import TelemetryService
from telemetry_sink.testing import skip_or_fail_in_ci


def read_log(directory: Path, key_file: Path) -> list[tuple[int, dict[str, object]]]:
    """Every (sequence number, record) in the log, asserting the log has no damage."""
    crypto = CryptoService.from_key_file(key_file)
    out: list[tuple[int, dict[str, object]]] = []
    for path in segment_format.list_segments(directory):
        with segment_format.SegmentImage(path) as seg:
            for item in seg.batches():
                assert isinstance(item, segment_format.Batch), f"{path}: {item}"
                out.extend((item.first_seq + i, orjson.loads(crypto.decrypt(t))) for i, t in enumerate(item.tokens))
    return out


class Load:
    """Client threads posting uniquely numbered records until stopped; remembers every 202."""

    def __init__(self, url: str, threads: int = 6, per_request: int = 3, prefix: str = "") -> None:
        self.url = url
        self.prefix = prefix
        self.acked: set[str] = set()
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, per_request), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, worker: int, per_request: int) -> None:
        with httpx.Client(timeout=10.0) as client:
            for n in range(100_000):  # bounded; normally stopped long before
                if self._stop.is_set():
                    return
                ids = [f"{self.prefix}{worker}-{n}-{k}" for k in range(per_request)]
                body = orjson.dumps([{"node_id": f"node-{worker}", "id": i} for i in ids])
                try:
                    r = client.post(self.url + "/telemetry", content=body,
                                    headers={"content-type": "application/json"})
                except httpx.TransportError:
                    time.sleep(0.01)  # refused or cut off: no 202, so nothing was promised
                    continue
                with self._lock:
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    if r.status_code == 202:
                        self.acked.update(ids)


def stored_ids(directory: Path, key_file: Path) -> list[str]:
    return [str(record["id"]) for _, record in read_log(directory, key_file)]


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_record(start_server: Callable[..., ServerProcess],
                                                         tmp_path: Path, key_file: Path) -> None:
    """Durable acks: 20 SIGKILLs at random moments; every 202 is in the log exactly once."""
    rng = random.Random(20261126)
    data = tmp_path / "data"
    acked: set[str] = set()
    overrides = {"ingest": {"ack": "durable"}, "writer": {"fsync": "never", "batch_size": 50}}
    for iteration in range(20):
        server = start_server(overrides)
        with Load(server.url, prefix=f"{iteration}/") as load:
            wait_for(lambda: load.acked, what="a first 202")
            time.sleep(rng.uniform(0.0, 0.5))  # the kill lands at a random point of the load (not synchronisation)
            server.signal(signal.SIGKILL)
            server.wait()
        acked |= load.acked
        assert set(load.statuses) <= {202, 503}, load.statuses
    server = start_server(overrides)
    server.stop()
    ids = stored_ids(data, key_file)
    assert len(acked) > 200
    assert acked <= set(ids), f"{len(acked - set(ids))} acknowledged records lost"
    assert len(ids) == len(set(ids)), "a record was stored twice"
    verify = run_cli("verify", str(data))
    assert verify.returncode == 0, verify.stdout.decode()
    seqs = [seq for seq, _ in read_log(data, key_file)]
    assert seqs == list(range(len(seqs)))  # continued across every restart, never reused


@pytest.mark.slow
def test_sigterm_under_load_keeps_every_acknowledged_record(start_server: Callable[..., ServerProcess],
                                                            tmp_path: Path, key_file: Path) -> None:
    server = start_server({"writer": {"flush_interval_ms": 500, "batch_size": 1000}})
    with Load(server.url, threads=8) as load:
        wait_for(lambda: len(load.acked) > 100, what="load under way")
        server.signal(signal.SIGTERM)
        assert server.wait() in (0, -signal.SIGTERM)
    assert "shutdown complete" in server.log()
    assert set(load.statuses) <= {202, 503}, load.statuses
    ids = stored_ids(tmp_path / "data", key_file)
    assert len(load.acked) > 100
    assert load.acked == set(ids)  # buffered acks: everything 202'd was drained; nothing else stored
    assert len(ids) == len(set(ids))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail_in_ci(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): run as root for the "
                           "only real disk-full test; the injected-failure tests in test_segment_writer.py cover "
                           "write errors")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem until ENOSPC; return the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for _ in range(100_000):
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def post_until(server: ServerProcess, status: int, acked: set[str], timeout: float = 15.0) -> httpx.Response:
    """Post one record at a time until the answer is `status`; note every 202 in `acked`."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        record_id = f"probe-{status}-{n}"
        r = server.post(orjson.dumps({"node_id": "probe", "id": record_id}))
        assert r.status_code in (202, 503, 507), r.text
        if r.status_code == 202:
            acked.add(record_id)
        if r.status_code == status:
            return r
        time.sleep(0.05)
    raise AssertionError(f"no {status} within {timeout}s; last: {r.status_code} {r.text}")


@pytest.mark.parametrize("ack", ["durable", "buffered"])
def test_disk_full_answers_507_then_recovers_by_itself(start_server: Callable[..., ServerProcess],
                                                       tmp_path: Path, key_file: Path, ack: str) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        data = disk / "data"
        server = start_server({"ingest": {"ack": ack}, "writer": {"directory": str(data), "fsync": "batch"}})
        before = [orjson.dumps({"node_id": "n", "id": f"before-{i}"}) for i in range(20)]
        for body in before:
            assert server.post(body).status_code == 202
        # buffered: let them reach the disk before it fills up
        wait_for(lambda: (server.healthz() or {}).get("records_written", 0) >= 20, what="20 records written")
        filler = fill(disk)
        acked = {f"before-{i}" for i in range(20)}
        r = post_until(server, 507, acked)
        assert r.json()["error"] == "insufficient_storage" and r.headers["retry-after"].isdigit()
        health = httpx.get(server.url + "/healthz", timeout=5).json()
        assert "No space left on device" in health["last_write_error"]
        filler.unlink()  # space returns: writes resume without a restart
        post_until(server, 202, acked)
        assert httpx.get(server.url + "/healthz", timeout=5).json()["last_write_error"] is None
        server.stop()
        ids = stored_ids(data, key_file)
        assert acked <= set(ids)  # nothing earlier damaged, nothing acknowledged lost
        assert len(ids) == len(set(ids))
        assert run_cli("verify", str(data)).returncode == 0


async def test_stalled_disk_fills_the_buffer_then_drains(tmp_path: Path, key_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stalled for seconds (injected: a real one cannot be made on demand here)."""
    stall = threading.Event()
    real_write_all = segment_writer.write_all

    def stalled_write_all(fd: int, data: bytes) -> None:
        stall.wait(20)
        real_write_all(fd, data)

    monkeypatch.setattr(segment_writer, "write_all", stalled_write_all)
    stall.set()  # the segment header goes through
    crypto = CryptoService.from_key_file(key_file)
    writer = SegmentWriter(tmp_path / "data", crypto, batch_size=10, flush_interval_ms=10, fsync="never",
                       fsync_interval_ms=1000, max_segment_bytes=1 << 20)
    writer.open()
    service = TelemetryService(RateLimiter(0, 1), BufferManager(200, 1 << 20), writer)
    app = create_app(service, 1 << 20)
    await service.start()
    stall.clear()
    transport = httpx.ASGITransport(app=app)
    accepted, rejected = 0, 0
    async with httpx.AsyncClient(transport=transport, base_url="http://sink") as client:
        for i in range(100):
            body = orjson.dumps([{"node_id": "n", "i": i, "k": k} for k in range(5)])
            r = await client.post("/telemetry", content=body, headers={"content-type": "application/json"})
            if r.status_code == 202:
                accepted += 5
            else:
                assert r.status_code == 503 and r.json()["error"] == "buffer_full"
                assert r.headers["retry-after"] == "1"
                rejected += 1
            assert service.buffer.records <= 200  # bounded, whatever the disk does
        assert accepted == 200 and rejected == 60
        stall.set()  # the disk wakes up: the backlog drains by itself
        for _ in range(500):
            if service.buffer.records == 0:
                break
            await asyncio.sleep(0.01)
        assert service.buffer.records == 0
        r = await client.post("/telemetry", content=b'{"node_id":"after"}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 202
    await service.stop(10)
    assert len(read_log(tmp_path / "data", key_file)) == 201


def test_write_error_other_than_disk_full_is_503() -> None:
    from telemetry_sink.errors import storage_error as _storage_error

    assert _storage_error(errno.EIO, "EIO").status == 503
    assert _storage_error(errno.ENOSPC, "full").status == 507
    assert _storage_error(errno.EDQUOT, "quota").error == "insufficient_storage"


def test_corruption_in_a_sealed_segment_verify_names_it_read_skips_it_strict_fails(tmp_path: Path) -> None:
    key = generate_key()
    key_file = tmp_path / "key"
    key_file.write_bytes(key + b"\n")
    key_file.chmod(0o600)
    data = tmp_path / "data"
    write_log(data, key, 400, segment_bytes=6000)
    segments = segment_format.list_segments(data)
    victim = segments[1]
    with segment_format.SegmentImage(victim) as seg:
        batches = [b for b in seg.batches() if isinstance(b, segment_format.Batch)]
    hit = batches[1]
    raw = bytearray(victim.read_bytes())
    for k in range(8):  # flip bytes in the middle of the second batch
        raw[(hit.offset + hit.end) // 2 + k] ^= 0x5A
    victim.write_bytes(bytes(raw))

    verify = run_cli("verify", str(data))
    assert verify.returncode == 1
    assert f"corrupt batch at offset {hit.offset}".encode() in verify.stdout
    assert victim.name.encode() in verify.stdout

    read = run_cli("read", "--key-file", str(key_file), str(data))
    assert read.returncode == 0
    assert f"damaged batch at offset {hit.offset}".encode() in read.stderr
    got = [orjson.loads(line)["i"] for line in read.stdout.splitlines()]
    lost = set(range(hit.first_seq, hit.next_seq))
    assert got == [i for i in range(400) if i not in lost]  # every other record, in order

    strict = run_cli("read", "--strict", "--key-file", str(key_file), str(data))
    assert strict.returncode == 2
    assert b"--strict" in strict.stderr


def data_fds(pid: int, data: Path) -> list[str]:
    """What the server process has open inside `data` (a leaked fd shows up here)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(data)):
                out.append(target)
    return sorted(out)


def write_errors(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("telemetry_sink_write_errors")))


@pytest.mark.parametrize("ack", ["durable", "buffered"])
def test_disk_full_at_segment_roll_over_leaves_no_empty_segment_and_resumes(
        start_server: Callable[..., ServerProcess], tmp_path: Path, key_file: Path, ack: str) -> None:
    """The new segment's header cannot be written: no header-only file wedges the retries with
    FileExistsError, no fd leaks, writing resumes once space returns, and a graceful stop
    writes every acknowledged record (the one 202'd while the disk was full, too)."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        data = disk / "data"
        server = start_server({"ingest": {"ack": ack},
                               "writer": {"directory": str(data), "fsync": "batch", "max_segment_bytes": 1500}})
        acked: set[str] = set()
        for i in range(200):  # until the active segment is sealed: the next write must create one
            r = server.post(orjson.dumps({"node_id": "n", "id": f"before-{i}"}))
            assert r.status_code == 202
            acked.add(f"before-{i}")
            wait_for(lambda n=i + 1: httpx.get(server.url + "/healthz", timeout=5).json()["records_written"] >= n,
                     what="the record on disk")
            if "sealed segment" in server.log():
                break
        segments_before = segment_format.list_segments(data)
        assert data_fds(server.proc.pid, data) == [str(data / "w0.lock")]  # sealed, none open yet
        filler = fill(disk)
        if ack == "buffered":
            r = server.post(orjson.dumps({"node_id": "n", "id": "while-full"}))
            assert r.status_code == 202  # buffered: acknowledged, so it must reach the disk later
            acked.add("while-full")
        else:
            r = post_until(server, 507, acked)
            assert r.json()["error"] == "insufficient_storage"
        def attempts() -> bool:
            if ack == "durable":  # the writer holds nothing: each attempt is a request's
                assert server.post(orjson.dumps({"node_id": "n", "id": "refused"})).status_code in (503, 507)
            return write_errors(server) >= 3

        wait_for(attempts, what="three failed attempts to open a segment")
        health = httpx.get(server.url + "/healthz", timeout=5).json()
        assert "No space left on device" in health["last_write_error"]
        assert "File exists" not in server.log()
        assert segment_format.list_segments(data) == segments_before  # no empty segment left behind
        assert data_fds(server.proc.pid, data) == [str(data / "w0.lock")]  # no fd leaked by the attempts
        filler.unlink()  # space returns: writing resumes without a restart
        post_until(server, 202, acked)
        fds = data_fds(server.proc.pid, data)
        assert len(fds) == 2 and fds[0].endswith(segment_format.SEGMENT_SUFFIX) and "deleted" not in fds[0]
        assert server.stop() in (0, -signal.SIGTERM)
        assert "shutdown complete" in server.log() and "were not written" not in server.log()
        ids = stored_ids(data, key_file)
        assert acked <= set(ids) and len(ids) == len(set(ids))
        assert run_cli("verify", str(data)).returncode == 0


@pytest.mark.parametrize("ack", ["buffered", "durable"])
def test_a_writer_that_cannot_continue_says_so_refuses_requests_and_reports_the_loss(
        start_server: Callable[..., ServerProcess], tmp_path: Path, key_file: Path, ack: str) -> None:
    """Sequence numbers run out (a segment named two short of 2**64 - 1): the writer stops for good.
    The server logs it loudly, /healthz and /readyz say so, every later request is refused with
    503 (never a 202 it cannot store), and the shutdown summary counts the acknowledged loss."""
    data = tmp_path / "data"
    data.mkdir()
    (data / segment_format.segment_name("w0", segment_format.MAX_SEQ - 1)).write_bytes(
        segment_format.FILE_HEADER_BYTES)
    server = start_server({"ingest": {"ack": ack}, "writer": {"directory": str(data)}})
    for i in range(2):  # the last two sequence numbers
        assert server.post(orjson.dumps({"node_id": "n", "id": f"fits-{i}"})).status_code == 202
        wait_for(lambda n=i + 1: httpx.get(server.url + "/healthz", timeout=5).json()["records_written"] == n,
                 what="the record on disk")
    r = server.post(orjson.dumps({"node_id": "n", "id": "one-too-many"}))
    assert r.status_code == (202 if ack == "buffered" else 503)  # buffered: acknowledged before the write
    health = wait_for(lambda: (h := httpx.get(server.url + "/healthz", timeout=5)).status_code == 503 and h,
                      what="/healthz to report the writer stopped")
    assert health.json()["status"] == "writer_stopped"
    assert "SequenceExhausted" in health.json()["last_write_error"]
    ready = httpx.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and "the writer is not running" in ready.json()["reasons"]
    for _ in range(3):
        refused = server.post(orjson.dumps({"node_id": "n", "id": "after"}))
        assert refused.status_code == 503 and refused.json()["error"] == "write_failed"
        assert "the writer stopped" in refused.json()["detail"]
    assert "CRITICAL" in server.log() and "the writer stopped and cannot continue" in server.log()
    server.stop()
    lost = 1 if ack == "buffered" else 0
    assert f"{lost} acknowledged records lost" in server.log()
    assert [seq for seq, _ in read_log(data, key_file)] == [segment_format.MAX_SEQ - 1, segment_format.MAX_SEQ]


FAULTS = Path(__file__).parent / "faults"  # sitecustomize.py: fault hooks inside the server process


def test_a_durable_202_does_not_leave_before_fsync_returns(start_server: Callable[..., ServerProcess],
                                                            tmp_path: Path, key_file: Path) -> None:
    """fsync is held (a stalled disk, injected: one cannot be stalled on demand here); the durable
    202 waits for it. Without the durable fsync no fsync starts and the 202 arrives at once."""
    hold = tmp_path / "hold-fsync"
    server = start_server({"ingest": {"ack": "durable"}, "writer": {"fsync": "never"}},
                          env={"PYTHONPATH": str(FAULTS), "TS_FAULT_HOLD_FSYNC": str(hold)})
    assert server.post(orjson.dumps({"node_id": "n", "id": "first"})).status_code == 202  # segment created
    hold.touch()
    answers: list[httpx.Response] = []
    poster = threading.Thread(target=lambda: answers.append(server.post(orjson.dumps({"node_id": "n", "id": "held"}))))
    poster.start()
    wait_for(lambda: Path(f"{hold}.entered").exists(), what="the batch's fsync to start")
    poster.join(1.0)  # an answer sent before the fsync returns would arrive within milliseconds
    assert poster.is_alive() and not answers, "the 202 left while fsync was still running"
    hold.unlink()  # the disk wakes up: the fsync returns, then the answer goes out
    poster.join(10)
    assert [r.status_code for r in answers] == [202]
    server.stop()
    assert stored_ids(tmp_path / "data", key_file) == ["first", "held"]


def test_a_write_torn_by_sigkill_is_cut_at_restart_and_nothing_acknowledged_is_lost(
        start_server: Callable[..., ServerProcess], tmp_path: Path, key_file: Path) -> None:
    """A real torn write: half a batch reaches the segment, then the process is SIGKILLed (from
    inside the write, injected, so the tear is certain). Restart cuts exactly that tail, keeps
    every acknowledged record, and continues the sequence numbers."""
    data = tmp_path / "data"
    tear = tmp_path / "tear-write"
    env = {"PYTHONPATH": str(FAULTS), "TS_FAULT_TEAR_WRITE": str(tear)}
    server = start_server({"ingest": {"ack": "durable"}}, env=env)
    acked = []
    for i in range(5):
        assert server.post(orjson.dumps({"node_id": "n", "id": f"acked-{i}"})).status_code == 202
        acked.append(f"acked-{i}")
    size_before = sum(p.stat().st_size for p in segment_format.list_segments(data))
    tear.touch()
    with pytest.raises(httpx.TransportError):  # killed mid-write: no answer at all, so no promise
        server.post(orjson.dumps({"node_id": "n", "id": "torn", "pad": "x" * 200}))
    assert server.wait() == -signal.SIGKILL and Path(f"{tear}.torn").exists()
    torn_bytes = sum(p.stat().st_size for p in segment_format.list_segments(data)) - size_before
    assert torn_bytes > 0  # half a batch is on disk
    verify = run_cli("verify", str(data))
    assert verify.returncode == 1 and b"torn tail" in verify.stdout
    tear.unlink()
    server = start_server({"ingest": {"ack": "durable"}}, env=env)
    assert f"cut {torn_bytes} bytes" in server.log()
    for i in range(5, 7):
        assert server.post(orjson.dumps({"node_id": "n", "id": f"acked-{i}"})).status_code == 202
        acked.append(f"acked-{i}")
    server.stop()
    assert stored_ids(data, key_file) == acked  # the torn request is gone, nothing else
    assert [seq for seq, _ in read_log(data, key_file)] == list(range(7))
    assert run_cli("verify", str(data)).returncode == 0
