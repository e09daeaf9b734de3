"""objstore against a real SeaweedFS: URLs, keys, create-only uploads, comparison on conflict, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_support import RO, RW, SeaweedS3

from telemetry_sink.objstore import Bucket, ObjectStoreError, StoreSettings, object_key, parse_url


def bucket(s3: SeaweedS3, prefix: str, monkeypatch: pytest.MonkeyPatch, identity: tuple[str, str] = RW) -> Bucket:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", identity[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", identity[1])
    return Bucket(parse_url(s3.url(prefix)), StoreSettings(s3.endpoint, "us-east-1", allow_http=True, max_retries=0))


def test_parse_url() -> None:
    assert parse_url("s3://telemetry/a/b/").prefix == "a/b"
    assert parse_url("s3://telemetry").prefix == ""
    assert str(parse_url("s3://telemetry/x")) == "s3://telemetry/x"
    for bad in ("http://x/y", "s3://", "s3://Upper/p", "s3://ab"):
        with pytest.raises(ValueError, match=r"s3://|bucket"):
            parse_url(bad)


def test_object_key_is_dated_by_the_first_batch_and_sorts_by_sequence() -> None:
    key = object_key("sink-a", "w0", 120000, 1_764_614_400_000)  # 2025-12-01T18:40:00Z
    assert key == "v1/2025/12/01/sink-a/w0-00000000000000120000.tslog"


def test_create_only_upload_never_overwrites(s3_server: SeaweedS3, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    b = bucket(s3_server, "objstore-create", monkeypatch)
    seg = tmp_path / "a.tslog"
    seg.write_bytes(os.urandom(100_000))
    assert b.upload_create_only("k/a.tslog", seg) == "uploaded"
    assert b.upload_create_only("k/a.tslog", seg) == "already_there"  # a repeated upload is a success
    original = seg.read_bytes()
    other = tmp_path / "b.tslog"
    other.write_bytes(os.urandom(100_000))  # same size, different bytes
    with pytest.raises(ObjectStoreError, match="different content; not overwritten") as same_size:
        b.upload_create_only("k/a.tslog", other)
    assert same_size.value.reason == "conflict"
    other.write_bytes(b"short")
    with pytest.raises(ObjectStoreError, match="already exists with 100000 bytes") as shorter:
        b.upload_create_only("k/a.tslog", other)
    assert shorter.value.reason == "conflict"
    assert b"".join(b.stream("k/a.tslog")) == original
    assert [(o.key, o.size) for o in b.list("k")] == [("k/a.tslog", 100_000)]


def test_permission_and_credential_errors_are_one_clear_line(s3_server: SeaweedS3, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seg = tmp_path / "a.tslog"
    seg.write_bytes(b"x" * 100)
    with pytest.raises(ObjectStoreError) as ro:
        bucket(s3_server, "objstore-perm", monkeypatch, RO).upload_create_only("a", seg)
    assert ro.value.reason == "access_denied"
    assert "403" in str(ro.value) and "AccessDenied" in str(ro.value) and "\n" not in str(ro.value)
    with pytest.raises(ObjectStoreError) as wrong:
        bucket(s3_server, "objstore-perm", monkeypatch, (RW[0], "not-the-secret")).upload_create_only("a", seg)
    assert wrong.value.reason == "credentials"
    assert "not-the-secret" not in str(wrong.value) and RW[1] not in str(wrong.value)


def test_unreachable_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    seg = tmp_path / "a.tslog"
    seg.write_bytes(b"x")
    b = Bucket(parse_url("s3://telemetry/p"), StoreSettings("http://127.0.0.1:9", "us-east-1", True, max_retries=0))
    with pytest.raises(ObjectStoreError) as down:
        b.upload_create_only("a", seg)
    assert down.value.reason == "unreachable", str(down.value)
