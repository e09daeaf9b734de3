"""Config: defaults, the INI file, environment overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from telemetry_sink.config import SCHEMA, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.ini"
    path.write_text(text)
    return path


def test_shipped_config_ini_matches_built_in_defaults() -> None:
    shipped = load_config(REPO / "config.ini", environ={})
    defaults = load_config(None, environ={})
    assert shipped.rate_limit == defaults.rate_limit
    assert shipped.buffer == defaults.buffer
    assert shipped.ingest == defaults.ingest
    assert shipped.writer.batch_size == defaults.writer.batch_size
    assert shipped.writer.directory == REPO / "data"
    assert shipped.crypto.key_file == REPO / "dev.key"


def test_shipped_config_ini_sets_every_key() -> None:
    text = (REPO / "config.ini").read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} =" in text, f"config.ini does not document [{section}] {key}"


def test_file_values_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[writer]\nbatch_size = 7\ndirectory = logs\n[server]\nport = 9\n"), environ={})
    assert cfg.writer.batch_size == 7
    assert cfg.writer.directory == tmp_path / "logs"
    assert cfg.server.port == 9


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[rate_limit]\nmode = reject\n")
    cfg = load_config(path, environ={"TELEMETRY_SINK_RATE_LIMIT_MODE": "delay",
                                     "TELEMETRY_SINK_WRITER_FSYNC": "batch",
                                     "TELEMETRY_SINK_NO_EXTENSIONS": "1"})
    assert cfg.rate_limit.mode == "delay"
    assert cfg.writer.fsync == "batch"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        pytest.param("[writer]\nbatch_size = ten\n", {}, "[writer] batch_size: must be an integer", id="not-int"),
        pytest.param("[writer]\nbatch_size = 0\n", {}, "[writer] batch_size: must be a positive integer",
                     id="zero"),
        pytest.param("[writer]\nfsync = sometimes\n", {}, "[writer] fsync: must be one of batch, interval, never",
                     id="bad-choice"),
        pytest.param("[writer]\nbatchsize = 1\n", {}, "[writer] batchsize: unknown key", id="unknown-key"),
        pytest.param("[wirter]\n", {}, "[wirter]: unknown section", id="unknown-section"),
        pytest.param("", {"TELEMETRY_SINK_SERVER_PORTT": "1"}, "[server] portt: unknown key", id="unknown-env-key"),
        pytest.param("[server]\nport = 70000\n", {}, "[server] port: must be between 0 and 65535", id="port"),
        pytest.param("[ingest]\nmax_body_bytes = 2000\n[rate_limit]\nburst_bytes = 1000\n", {},
                     "[ingest] max_body_bytes: 2000 exceeds [rate_limit] burst_bytes 1000", id="body-over-burst"),
        pytest.param("[buffer]\nmax_records = 10\n[writer]\nbatch_size = 11\n", {},
                     "[writer] batch_size: 11 exceeds [buffer] max_records 10", id="batch-over-buffer"),
        pytest.param("[ingest]\nmax_body_bytes = 2000\n[buffer]\nmax_bytes = 1000\n", {},
                     "[buffer] max_bytes: 1000 is smaller than [ingest] max_body_bytes", id="buffer-under-body"),
        pytest.param("not an ini", {}, "not a valid INI file", id="not-ini"),
    ],
)
def test_errors_name_section_key_and_fault(tmp_path: Path, text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=environ)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_body_over_burst_is_fine_when_the_limiter_is_off(tmp_path: Path) -> None:
    path = write(tmp_path, "[ingest]\nmax_body_bytes = 2000\n[rate_limit]\nburst_bytes = 1000\nbytes_per_second = 0\n")
    assert load_config(path, environ={}).rate_limit.bytes_per_second == 0


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.ini", environ={})


def test_docs_list_every_key_with_its_default() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in SCHEMA:
            for key in cells[1].split(", "):  # `tls_certfile, tls_keyfile` share a row
                rows[cells[0], key] = cells[2]
    for section, keys in SCHEMA.items():
        for key, (_, default) in keys.items():
            assert rows.get((section, key)) == (f"`{default}`" if default else "empty"), \
                f"docs/configuration.md: [{section}] {key}"
