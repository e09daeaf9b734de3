"""The shipper against a real SeaweedFS: backlog found on start, markers, outage and recovery, conflicts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_for, write_log
from cryptography.fernet import Fernet
from s3_support import RW, SeaweedS3

from telemetry_sink import segment_format
from telemetry_sink.objstore import Bucket, StoreSettings, object_key, parse_url
from telemetry_sink.ship_state import MARKER_DIR
from telemetry_sink.shipper import Shipper, ShipSettings, first_created_ms


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", RW[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", RW[1])


@pytest.fixture
def shippers() -> Iterator[list[Shipper]]:
    made: list[Shipper] = []
    yield made
    for s in made:
        s.stop()


def make(directory: Path, s3: SeaweedS3, prefix: str, made: list[Shipper], **kw: object) -> tuple[Shipper, Bucket]:
    dest = parse_url(s3.url(prefix))
    bucket = Bucket(dest, StoreSettings(s3.endpoint, "us-east-1", allow_http=True, max_retries=0))
    settings = ShipSettings(dest, "inst-1", concurrency=2, retry_initial_s=0.05, retry_max_s=0.5, **kw)  # type: ignore[arg-type]
    shipper = Shipper(directory, settings, bucket)
    made.append(shipper)
    return shipper, bucket


def expected_keys(directory: Path) -> list[str]:
    out = []
    for p in segment_format.list_segments(directory):
        series, seq = segment_format.parse_segment_name(p)
        out.append(object_key("inst-1", series, seq, first_created_ms(p)))
    return sorted(out)


def test_ships_the_backlog_found_on_start_once(s3_server: SeaweedS3, tmp_path: Path, shippers: list[Shipper]) -> None:
    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 400)
    segments = segment_format.list_segments(data)
    assert len(segments) >= 3
    shipper, bucket = make(data, s3_server, "shipper-backlog", shippers)
    shipper.start("w0")
    wait_for(lambda: shipper.status().waiting_segments == 0 and shipper.uploaded == len(segments), what="uploads")
    listed = bucket.list()
    assert [o.key for o in listed] == expected_keys(data)
    for seg, obj in zip(segments, listed, strict=True):
        assert b"".join(bucket.stream(obj.key)) == seg.read_bytes()
        assert shipper.is_shipped(seg)
    # A restart finds every segment confirmed and uploads nothing.
    shipper.stop()
    again, _ = make(data, s3_server, "shipper-backlog", shippers)
    again.start("w0")
    assert again.status().waiting_segments == 0


def test_store_down_then_back(start_s3: Callable[[], SeaweedS3], tmp_path: Path, shippers: list[Shipper]) -> None:
    s3 = start_s3()
    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 100)
    s3.stop()
    shipper, bucket = make(data, s3, "down", shippers, unhealthy_after_s=0.2)
    shipper.start("w0")
    wait_for(lambda: shipper.failures["unreachable"] >= 2, what="failed attempts")
    status = shipper.status()
    assert status.waiting_segments == len(segment_format.list_segments(data)) and status.waiting_bytes > 0
    problem = wait_for(shipper.problem, what="a readiness reason")
    assert "shipping has failed for" in problem and "unreachable" in problem
    assert not any(shipper.is_shipped(p) for p in segment_format.list_segments(data))
    s3.start()
    wait_for(lambda: shipper.status().waiting_segments == 0, timeout=30, what="uploads after the store is back")
    assert shipper.problem() is None and shipper.status().failing_for_s == 0
    assert [o.key for o in bucket.list()] == expected_keys(data)


def test_delete_after_upload(s3_server: SeaweedS3, tmp_path: Path, shippers: list[Shipper]) -> None:
    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 100)
    keys = expected_keys(data)
    shipper, bucket = make(data, s3_server, "shipper-delete", shippers, after_upload="delete")
    shipper.start("w0")
    wait_for(lambda: not segment_format.list_segments(data), what="local segments deleted")
    assert [o.key for o in bucket.list()] == keys


def test_different_object_under_the_key_is_an_alarm_not_an_overwrite(
        s3_server: SeaweedS3, tmp_path: Path, shippers: list[Shipper]) -> None:
    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 20)
    [segment] = segment_format.list_segments(data)
    [key] = expected_keys(data)
    shipper, bucket = make(data, s3_server, "shipper-conflict", shippers)
    squatter = tmp_path / "squatter"
    squatter.write_bytes(b"not this segment")
    assert bucket.upload_create_only(key, squatter) == "uploaded"
    shipper.start("w0")
    problem = wait_for(shipper.problem, what="the conflict alarm")
    assert "differ from the local segment" in problem and key in problem
    assert shipper.failures["conflict"] >= 1
    assert b"".join(bucket.stream(key)) == b"not this segment"
    assert segment.exists() and not shipper.is_shipped(segment)


def test_series_left_by_another_run_are_shipped_unless_a_writer_holds_them(
        s3_server: SeaweedS3, tmp_path: Path, shippers: list[Shipper]) -> None:
    import fcntl
    import os

    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 400)  # series w0 (3 segments), its writer gone
    (data / MARKER_DIR).mkdir()
    (data / MARKER_DIR / "w0-00000000000000000000.tslog.gone").write_text("{}")  # a segment deleted since
    held = os.open(data / "w0.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running writer holds its series
    try:
        busy, _ = make(data, s3_server, "shipper-orphans-held", shippers)
        busy.start("w1")
        assert busy.status().waiting_segments == 0
    finally:
        os.close(held)
    assert not (data / MARKER_DIR / "w0-00000000000000000000.tslog.gone").exists()
    shipper, bucket = make(data, s3_server, "shipper-orphans", shippers)
    shipper.start("w1")
    wait_for(lambda: shipper.status().waiting_segments == 0 and shipper.uploaded, what="uploads")
    assert [o.key for o in bucket.list()] == expected_keys(data)


def test_a_torn_newest_segment_of_another_series_is_left_to_whoever_claims_it(
        s3_server: SeaweedS3, tmp_path: Path, shippers: list[Shipper]) -> None:
    data = tmp_path / "data"
    write_log(data, Fernet.generate_key(), 400)
    newest = segment_format.list_segments(data)[-1]
    with open(newest, "ab") as f:
        f.write(b"TSB1\x00\x00\x10\x00partial")  # a batch cut short by a crash
    shipper, bucket = make(data, s3_server, "shipper-orphan-torn", shippers)
    shipper.start("w1")
    wait_for(lambda: shipper.status().waiting_segments == 0 and shipper.uploaded, what="uploads")
    assert [o.key for o in bucket.list()] == expected_keys(data)[:-1]
    assert not shipper.is_shipped(newest)
