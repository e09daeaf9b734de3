"""CryptoService: key files, TELEMETRY_SINK_KEY, rotation, permissions, no default key."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from telemetry_sink.crypto import CryptoService, KeyConfigError, generate_key, write_key_file
from telemetry_sink.segment_format import FILE_HEADER_BYTES, Batch, iter_batches


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k" / "sink.key"
    write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_bytes().strip()
    Fernet(key)  # a valid key
    with pytest.raises(FileExistsError):
        write_key_file(path)
    assert path.read_bytes().strip() == key


def test_first_key_encrypts_every_key_decrypts(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    path = tmp_path / "keys"
    path.write_bytes(b"# rotated 2026-11\n" + new + b"\n\n" + old + b"\n")
    os.chmod(path, 0o600)
    crypto = CryptoService.from_key_file(path)
    assert crypto.key_count == 2
    assert crypto.decrypt(Fernet(old).encrypt(b"old record")) == b"old record"
    batch = crypto.new_framer().frame(0, 1_700_000_000_000, [b"fresh"])
    (item,) = iter_batches(FILE_HEADER_BYTES + batch)
    assert isinstance(item, Batch)
    assert Fernet(new).decrypt(item.tokens[0]) == b"fresh"  # the first line encrypts


def test_batch_decrypt_tries_every_key_in_order() -> None:
    old, new, other = generate_key(), generate_key(), generate_key()
    crypto = CryptoService([new.decode(), old.decode()], "test")
    tokens = [Fernet(new).encrypt(b"a"), Fernet(old).encrypt(b"b"), Fernet(other).encrypt(b"c"), b"junk"]
    assert crypto.decrypt_batch(tokens) == [b"a", b"b", None, None]
    assert crypto.decrypt_batch_keyed(tokens) == ([b"a", b"b", None, None], [0, 1, -1, -1])
    assert crypto.decrypt_batch([Fernet(new).encrypt_at_time(b"stale", 1_000)], ttl=60) == [None]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    environ = {"TELEMETRY_SINK_KEY": f"{a.decode()}, {b.decode()}"}
    crypto = CryptoService.from_config(tmp_path / "missing.key", environ=environ)
    assert crypto.key_count == 2
    assert crypto.decrypt(Fernet(b).encrypt(b"x")) == b"x"


def test_no_key_refuses_and_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="telemetry-sink keygen"):
        CryptoService.from_config(tmp_path / "missing.key", environ={})


@pytest.mark.parametrize("content", [b"", b"# only a comment\n", b"not-a-key\n", b"c2hvcnQ=\n"],
                         ids=["empty", "comment-only", "garbage", "short-key"])
def test_unusable_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyConfigError) as info:
        CryptoService.from_key_file(path)
    assert "not-a-key" not in str(info.value)  # never echo key material


def test_warns_when_group_or_others_can_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "open.key"
    path.write_bytes(generate_key() + b"\n")
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="telemetry_sink.crypto"):
        CryptoService.from_key_file(path)
    assert "accessible by group or others" in caplog.text
    caplog.clear()
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="telemetry_sink.crypto"):
        CryptoService.from_key_file(path)
    assert caplog.text == ""


def test_repr_never_shows_keys(tmp_path: Path) -> None:
    key = generate_key()
    crypto = CryptoService([key.decode()], "test")
    assert key.decode() not in repr(crypto)
    assert key.decode()[:10] not in repr(crypto)
