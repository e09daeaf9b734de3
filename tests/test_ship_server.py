"""Shipping from a real server to a real SeaweedFS: round trip through `read s3://`, outages, crashes,
wrong credentials, conflicting objects and damaged objects."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer, run_cli, wait_for, write_log
from cryptography.fernet import Fernet
from s3_support import RO, RW, SeaweedS3

from telemetry_sink import segment_format
from telemetry_sink.objstore import Bucket, StoreSettings, object_key, parse_url
from telemetry_sink.ship_state import MARKER_DIR
from telemetry_sink.shipper import first_created_ms

GRACEFUL_EXIT = (0, -signal.SIGTERM)  # uvicorn may re-raise the signal after a clean shutdown


@pytest.fixture(scope="module")
def lane() -> str:
    """One HTTP lane: shipping does not depend on it, and the session's bucket keeps one run's objects."""
    return "fast"


def ship_overrides(s3: SeaweedS3, prefix: str, directory: Path, **ship: Any) -> dict[str, dict[str, Any]]:
    return {
        "ship": {"destination": s3.url(prefix), "endpoint_url": s3.endpoint, "region": "us-east-1",
                 "allow_http": "true", "retry_initial_ms": 50, "retry_max_ms": 500, **ship},
        "writer": {"directory": str(directory), "max_segment_bytes": 4000, "fsync": "never"},
        "rate_limit": {"bytes_per_second": 0},
    }


def post_records(server: ServerProcess, first: int, count: int, per_request: int = 20, pad: int = 40) -> list[int]:
    acked = []
    for i in range(first, first + count, per_request):
        ids = list(range(i, min(i + per_request, first + count)))
        body = orjson.dumps([{"node_id": "n1", "i": j, "pad": "x" * pad} for j in ids])
        if server.post(body).status_code == 202:
            acked.extend(ids)
    return acked


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf"^telemetry_sink_{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert match is not None, f"no metric {name}"
    return float(match.group(1))


def readiness(server: ServerProcess) -> list[str]:
    body = httpx.get(server.url + "/readyz", timeout=5).json()
    return list(body.get("reasons", []))


def read_s3(s3: SeaweedS3, prefix: str, key_file: Path, *extra: str) -> list[int]:
    out = run_cli("read", "--key-file", str(key_file), *extra, s3.url(prefix), env=s3.env(RO))
    assert out.returncode == 0, out.stderr.decode()
    return sorted(orjson.loads(line)["i"] for line in out.stdout.splitlines())


def bucket(s3: SeaweedS3, prefix: str) -> Bucket:
    import os

    os.environ.update({"AWS_ACCESS_KEY_ID": RW[0], "AWS_SECRET_ACCESS_KEY": RW[1]})
    return Bucket(parse_url(s3.url(prefix)), StoreSettings(s3.endpoint, "us-east-1", True, max_retries=0))


def test_round_trip_from_two_instances(start_server: StartServer, s3_server: SeaweedS3, tmp_path: Path,
                                       key_file: Path) -> None:
    a = start_server(ship_overrides(s3_server, "round", tmp_path / "a", instance_id="sink-a"),
                     env=s3_server.env(RW))
    b = start_server(ship_overrides(s3_server, "round", tmp_path / "b"), env=s3_server.env(RW))
    acked = post_records(a, 0, 600) + post_records(b, 600, 400)
    assert len(acked) == 1000
    assert a.stop() in GRACEFUL_EXIT and b.stop() in GRACEFUL_EXIT  # the final seal is shipped during the drain
    assert "shipped segment" in a.log() and "s3://telemetry/round/v1/" in a.log()
    assert read_s3(s3_server, "round", key_file) == list(range(1000))
    generated = (tmp_path / "b" / "instance_id").read_text().strip()
    objects = bucket(s3_server, "round").list()
    assert {o.key.split("/")[4] for o in objects} == {"sink-a", generated}
    assert len(objects) == len(segment_format.list_segments(tmp_path / "a")) + len(
        segment_format.list_segments(tmp_path / "b"))
    verify = run_cli("verify", "--key-file", str(key_file), s3_server.url("round"), env=s3_server.env(RO))
    assert verify.returncode == 0, verify.stdout.decode()
    assert b"1000 records, 0 damaged, every token authenticated" in verify.stdout
    assert read_s3(s3_server, "round", key_file, "--instance", "sink-a") == list(range(600))
    for output in (a.log(), b.log()):
        assert RW[1] not in output and RW[0] not in output  # credentials appear in no log line


def test_store_down_when_segments_seal_then_back(start_server: StartServer, start_s3: Callable[[], SeaweedS3],
                                                 tmp_path: Path, key_file: Path) -> None:
    s3 = start_s3()
    s3.stop()
    data = tmp_path / "data"
    overrides = ship_overrides(s3, "outage", data, unhealthy_after_s=1)
    overrides["writer"]["retention_bytes"] = 5000  # retention would delete most segments if they were shipped
    server = start_server(overrides, env=s3.env(RW))
    acked = post_records(server, 0, 500)
    reasons = wait_for(lambda: [r for r in readiness(server) if "shipping has failed" in r], what="/readyz reason")
    assert "unreachable" in reasons[0]
    waiting = metric(server, "ship_waiting_segments")
    assert waiting >= 3 and metric(server, "ship_waiting_bytes") > 10_000
    assert metric(server, "ship_oldest_unshipped_age_seconds") > 0
    text = httpx.get(server.url + "/metrics", timeout=5).text
    failures = re.search(r'^telemetry_sink_ship_failures_total\{reason="unreachable"\} ([0-9.e+]+)$', text, re.M)
    assert failures is not None and float(failures.group(1)) >= 1
    assert len(segment_format.list_segments(data)) >= waiting
    assert "retention: deleted" not in server.log()  # over budget, but nothing is shipped: nothing deleted
    assert "upload of w0-" in server.log() and "failed (unreachable)" in server.log()
    s3.start()
    wait_for(lambda: metric(server, "ship_waiting_segments") == 0, timeout=60, what="the backlog to drain")
    wait_for(lambda: not readiness(server), what="ready again")
    assert metric(server, "ship_oldest_unshipped_age_seconds") == 0
    post_records(server, 500, 100)  # the next seal runs retention, which may now delete shipped segments
    wait_for(lambda: "retention: deleted" in server.log(), what="retention of shipped segments")
    acked += list(range(500, 600))
    assert server.stop() in GRACEFUL_EXIT
    assert read_s3(s3, "outage", key_file) == acked


def test_sigkill_during_upload_then_restart_ships_once(start_server: StartServer, s3_server: SeaweedS3,
                                                       tmp_path: Path, key_file: Path) -> None:
    data = tmp_path / "data"
    overrides = ship_overrides(s3_server, "crash", data, instance_id="crashy")
    overrides["writer"]["max_segment_bytes"] = 8 << 20
    overrides["ingest"] = {"ack": "durable"}
    server = start_server(overrides, env=s3_server.env(RW), args=("--log-level", "debug"))
    acked: list[int] = []

    def client() -> None:  # posts until the server dies under it
        with contextlib.suppress(httpx.TransportError):
            for i in range(0, 200_000, 500):
                acked.extend(post_records(server, i, 500, per_request=500, pad=400))

    poster = threading.Thread(target=client, daemon=True)
    poster.start()
    wait_for(lambda: "uploading segment" in server.log(), timeout=120, what="an upload to start")
    server.signal(signal.SIGKILL)
    server.wait()
    poster.join(30)
    assert "shipped segment" not in server.log()  # killed while the first upload was in flight
    again = start_server(overrides, env=s3_server.env(RW))
    assert again.stop() in GRACEFUL_EXIT
    keys = [o.key for o in bucket(s3_server, "crash").list()]
    assert len(keys) == len(set(keys)) == len(segment_format.list_segments(data))
    local = sorted(object_key("crashy", *segment_format.parse_segment_name(p), first_created_ms(p))
                   for p in segment_format.list_segments(data))
    assert keys == local
    got = read_s3(s3_server, "crash", key_file)
    assert len(got) == len(set(got)) and set(acked) <= set(got)


def test_read_only_identity_is_reported_and_nothing_is_deleted(start_server: StartServer, s3_server: SeaweedS3,
                                                               tmp_path: Path) -> None:
    data = tmp_path / "data"
    overrides = ship_overrides(s3_server, "readonly", data, after_upload="delete", unhealthy_after_s=1)
    overrides["writer"]["retention_bytes"] = 4000
    server = start_server(overrides, env=s3_server.env(RO))
    post_records(server, 0, 300)
    reasons = wait_for(lambda: [r for r in readiness(server) if "shipping has failed" in r], what="/readyz reason")
    assert "access_denied" in reasons[0] and "AccessDenied" in reasons[0]
    health = httpx.get(server.url + "/healthz", timeout=5)
    assert health.status_code == 200  # liveness: restarting the process would not fix the store
    assert "shipping has failed for" in health.json()["shipping"] and "AccessDenied" in health.json()["shipping"]
    log = server.log()
    assert re.search(r"upload of w0-\d+\.tslog to s3://telemetry/readonly/v1/\S+ failed \(access_denied\)", log)
    assert RO[1] not in log and RW[1] not in log
    server.stop()
    assert len(segment_format.list_segments(data)) >= 3
    assert not list((data / MARKER_DIR).iterdir())


def test_different_object_under_the_key_is_not_overwritten(start_server: StartServer, s3_server: SeaweedS3,
                                                           tmp_path: Path) -> None:
    squatter = tmp_path / "squatter"
    squatter.write_bytes(b"someone else's bytes")
    key = object_key("squat", "w0", 0, int(time.time() * 1000))
    store = bucket(s3_server, "conflict")
    store.upload_create_only(key, squatter)
    server = start_server(ship_overrides(s3_server, "conflict", tmp_path / "data", instance_id="squat"),
                          env=s3_server.env(RW))
    post_records(server, 0, 200)
    reasons = wait_for(lambda: [r for r in readiness(server) if "differ from the local segment" in r],
                       what="the conflict alarm")
    assert key in reasons[0]
    assert metric(server, "ship_conflicts") == 1 and "shipping ALARM" in server.log()
    assert b"".join(store.stream(key)) == b"someone else's bytes"
    server.stop()
    assert (tmp_path / "data" / "w0-00000000000000000000.tslog").exists()


def test_verify_names_the_damaged_object_and_batch(s3_server: SeaweedS3, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = Fernet.generate_key()
    write_log(data, key, 400, segment_bytes=20_000)
    first = segment_format.list_segments(data)[1]
    with segment_format.SegmentImage(first) as image:
        batch = [b for b in image.batches() if isinstance(b, segment_format.Batch)][2]
    raw = bytearray(first.read_bytes())
    raw[batch.offset + 40] ^= 0x01
    first.write_bytes(bytes(raw))
    store = bucket(s3_server, "flipped")
    for path in segment_format.list_segments(data):
        series, seq = segment_format.parse_segment_name(path)
        store.upload_create_only(object_key("inst", series, seq, first_created_ms(path)), path)
    remote = run_cli("verify", s3_server.url("flipped"), env=s3_server.env(RO))
    local = run_cli("verify", str(data))
    assert remote.returncode == local.returncode == 1
    damaged = [line for line in remote.stdout.decode().splitlines() if "DAMAGED" in line]
    assert len(damaged) == 1 and damaged[0].startswith("s3://telemetry/flipped/v1/")
    assert f"/inst/{first.name}: DAMAGED" in damaged[0]
    assert f"corrupt batch at offset {batch.offset} " in remote.stdout.decode()
    (tmp_path / "k").write_bytes(key + b"\n")
    read = run_cli("read", "--key-file", str(tmp_path / "k"), s3_server.url("flipped"), env=s3_server.env(RO))
    assert f"/inst/{first.name}: damaged batch at offset {batch.offset} " in read.stderr.decode()
    assert len(read.stdout.splitlines()) == 400 - batch.count
    one = run_cli("verify", damaged[0].split(": DAMAGED")[0], env=s3_server.env(RO))  # one object named in full
    assert one.returncode == 1 and one.stdout.decode().splitlines()[0] == damaged[0]
    assert "1 segments," in one.stdout.decode()
    # The same report as for the local files, line for line, but for the names.
    strip = re.compile(r"^\S+/(w0-\d+\.tslog)", re.M)
    assert strip.sub(r"\1", remote.stdout.decode()) == strip.sub(r"\1", local.stdout.decode())


def test_two_workers_ship_their_own_series_under_one_instance_id(start_server: StartServer, s3_server: SeaweedS3,
                                                                  tmp_path: Path, key_file: Path) -> None:
    data = tmp_path / "data"
    overrides = ship_overrides(s3_server, "workers", data)
    overrides["server"] = {"workers": 2}
    server = start_server(overrides, env=s3_server.env(RW))
    acked = []
    for i in range(0, 800, 20):  # a new connection each, so both workers get some
        body = orjson.dumps([{"node_id": "n1", "i": j, "pad": "x" * 40} for j in range(i, i + 20)])
        if server.post(body, headers={"connection": "close"}).status_code == 202:
            acked.extend(range(i, i + 20))
    assert server.stop() in GRACEFUL_EXIT
    assert read_s3(s3_server, "workers", key_file) == acked == list(range(800))
    objects = bucket(s3_server, "workers").list()
    instance = (data / "instance_id").read_text().strip()
    assert {o.key.split("/")[4] for o in objects} == {instance}
    assert {o.key.split("/")[5].split("-")[0] for o in objects} == {"w0", "w1"}


def test_restart_after_a_crash_that_left_an_empty_segment(start_server: StartServer, s3_server: SeaweedS3,
                                                          tmp_path: Path, key_file: Path) -> None:
    # A crash between creating a segment (its header) and its first batch leaves a segment with no record;
    # with shipping on no tail is re-opened, so the next segment needs that name.
    data = tmp_path / "data"
    write_log(data, key_file.read_bytes().strip(), 40)
    [first] = segment_format.list_segments(data)
    next_seq = segment_format.parse_segment_name(first)[1] + 40
    empty = data / segment_format.segment_name("w0", next_seq)
    empty.write_bytes(segment_format.FILE_HEADER_BYTES)
    server = start_server(ship_overrides(s3_server, "empty", data), env=s3_server.env(RW))
    acked = post_records(server, 40, 100)
    assert acked == list(range(40, 140))
    assert server.stop() in GRACEFUL_EXIT
    assert "Traceback" not in server.log() and "failed" not in server.log()
    assert read_s3(s3_server, "empty", key_file) == list(range(140))


def test_store_down_fills_the_disk_then_507_until_it_is_back(start_server: StartServer,
                                                             start_s3: Callable[[], SeaweedS3],
                                                             tmp_path: Path, key_file: Path) -> None:
    from test_durability import small_tmpfs

    s3 = start_s3()
    s3.stop()
    with small_tmpfs(tmp_path / "disk", "384k") as disk:
        overrides = ship_overrides(s3, "diskfull", disk / "data")
        overrides["writer"]["retention_bytes"] = 16000  # with the store up, the disk would stay nearly empty
        overrides["ingest"] = {"ack": "durable"}
        server = start_server(overrides, env=s3.env(RW))
        acked: list[int] = []
        status = 202
        for i in range(0, 100_000, 20):  # until the disk is full: retention may not delete unshipped segments
            body = orjson.dumps([{"node_id": "n1", "i": j, "pad": "x" * 40} for j in range(i, i + 20)])
            r = server.post(body)
            status = r.status_code
            if status == 202:
                acked.extend(range(i, i + 20))
            else:
                break
        assert status == 507 and r.json()["error"] == "insufficient_storage", r.text
        assert "retention: deleted" not in server.log()
        s3.start()  # shipping resumes, retention deletes what is confirmed, space returns
        wait_for(lambda: "retention: deleted" in server.log(), timeout=60, what="retention after the uploads")
        last = 100_000

        def accepted_again() -> bool:
            nonlocal last
            body = orjson.dumps([{"node_id": "n1", "i": j, "pad": "x" * 40} for j in range(last, last + 20)])
            ok = server.post(body).status_code == 202
            if ok:
                acked.extend(range(last, last + 20))
            last += 20
            return ok

        wait_for(accepted_again, timeout=60, what="202 again")
        assert server.stop() in GRACEFUL_EXIT
        got = read_s3(s3, "diskfull", key_file)
        assert set(acked) <= set(got) and len(got) == len(set(got))
