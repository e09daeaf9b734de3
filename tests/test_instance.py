"""Instance identity: configured, or generated once and kept in the data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from telemetry_sink.instance import InstanceIdError, resolve_instance_id


def test_generated_once_and_kept(tmp_path: Path) -> None:
    first = resolve_instance_id("", tmp_path / "data")
    assert (tmp_path / "data" / "instance_id").read_text().strip() == first
    assert resolve_instance_id("", tmp_path / "data") == first
    assert resolve_instance_id("", tmp_path / "other") != first  # another data directory: another instance


def test_configured_id_wins_and_is_checked(tmp_path: Path) -> None:
    assert resolve_instance_id("sink-a", tmp_path) == "sink-a"
    assert not (tmp_path / "instance_id").exists()
    for bad in ("a/b", ".hidden", "x" * 64, "sp ace"):
        with pytest.raises(InstanceIdError, match="instance id"):
            resolve_instance_id(bad, tmp_path)
    (tmp_path / "instance_id").write_text("a/b\n")  # a hand-edited file is checked too
    with pytest.raises(InstanceIdError, match="instance_id: instance id 'a/b'"):
        resolve_instance_id("", tmp_path)
