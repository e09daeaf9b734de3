"""Config: defaults, the INI file, environment overrides and one-line errors."""

from __future__ import annotations

import configparser
import json
from pathlib import Path
from typing import get_type_hints

import pytest

from telemetry_sink.config import (
    ACK_MODES,
    FSYNC_POLICIES,
    RATE_LIMIT_MODES,
    SCHEMA,
    SECTIONS,
    ConfigError,
    load_config,
)
from telemetry_sink.rate_limiter import RateLimiter

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
        for key, spec in keys.items():
            assert rows.get((section, key)) == (f"`{spec.default}`" if spec.default else "empty"), \
                f"docs/configuration.md: [{section}] {key}"


def doc_rows() -> dict[tuple[str, str], str]:
    """(section, key) -> meaning, from the table in docs/configuration.md."""
    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in SCHEMA:
            for key in cells[1].split(", "):
                rows[cells[0], key] = cells[3]
    return rows


def test_docs_meaning_is_the_declared_doc() -> None:
    rows = doc_rows()
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            assert rows.get((section, key)) == spec.doc, f"docs/configuration.md: [{section}] {key} meaning"


def test_config_ini_writes_every_declared_default() -> None:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.read(REPO / "config.ini", encoding="utf-8")
    assert parser.sections() == list(SCHEMA)
    for section, keys in SCHEMA.items():
        assert list(parser[section]) == list(keys), f"config.ini [{section}]: keys not in declaration order"
        for key, spec in keys.items():
            assert parser[section][key] == spec.default, f"config.ini [{section}] {key}"


def test_every_key_parses_its_own_default_to_its_declared_type(tmp_path: Path) -> None:
    defaults = load_config(None, environ={})
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for key, spec in SCHEMA[section].items():
            value = getattr(getattr(defaults, section), key)
            assert value == spec.convert(spec.default, Path.cwd())
            assert isinstance(value, hints[key]), f"[{section}] {key}: {value!r} is not {hints[key]}"
            assert not spec.path or value is None or value.is_absolute()
            assert not spec.choices or value in spec.choices


def test_as_dict_has_every_section_and_key_and_is_json() -> None:
    out = load_config(REPO / "config.ini", environ={}).as_dict()
    assert {s: list(v) for s, v in out.items() if s != "source"} == {s: list(k) for s, k in SCHEMA.items()}
    assert json.loads(json.dumps(out))["writer"]["directory"] == str(REPO / "data")
    assert out["source"] == str(REPO / "config.ini")


@pytest.mark.parametrize(
    ("var", "value", "section", "key", "expected"),
    [
        pytest.param("SERVER_HOST", " 0.0.0.0 ", "server", "host", "0.0.0.0", id="text"),
        pytest.param("BUFFER_HIGH_WATER_PERCENT", "50", "buffer", "high_water_percent", 50, id="int"),
        pytest.param("RATE_LIMIT_MODE", "DELAY", "rate_limit", "mode", "delay", id="choice"),
        pytest.param("INGEST_ACK", "durable", "ingest", "ack", "durable", id="choice-ack"),
        pytest.param("WRITER_DIRECTORY", "elsewhere", "writer", "directory", "conf/elsewhere", id="path"),
        pytest.param("CRYPTO_KEY_FILE", "/abs/k.key", "crypto", "key_file", Path("/abs/k.key"), id="absolute-path"),
        pytest.param("AUTH_TOKENS_FILE", "tokens", "auth", "tokens_file", "conf/tokens", id="optional-path"),
        pytest.param("AUTH_TOKENS_FILE", "  ", "auth", "tokens_file", None, id="optional-empty"),
    ],
)
def test_environment_overrides_each_kind_of_key(tmp_path: Path, var: str, value: str, section: str, key: str,
                                                expected: object) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", "[auth]\ntokens_file = from-file\n")
    cfg = load_config(path, environ={"TELEMETRY_SINK_" + var: value})
    if isinstance(expected, str) and expected.startswith("conf/"):
        expected = tmp_path / expected  # relative to the config file, not the working directory
    assert getattr(getattr(cfg, section), key) == expected


def test_path_keys_resolve_against_the_config_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", "[server]\ntls_certfile = c.pem\ntls_keyfile = ../k.pem\n[crypto]\nkey_file = k\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/c.ini"), environ={})
    assert cfg.server.tls_certfile == tmp_path / "etc" / "c.pem"
    assert cfg.server.tls_keyfile == tmp_path / "etc" / ".." / "k.pem"
    assert cfg.crypto.key_file == tmp_path / "etc" / "k"
    assert load_config(None, environ={}).crypto.key_file == tmp_path / "dev.key"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        pytest.param("[wirter]\n", {}, f"[wirter]: unknown section (known: {', '.join(SCHEMA)})", id="section"),
        pytest.param("[crypto]\nkey = x\n", {}, "[crypto] key: unknown key (known: key_file)", id="key"),
        pytest.param("", {"TELEMETRY_SINK_AUTH_TOKENS": "x"},
                     "[auth] tokens: unknown key, set by environment variable TELEMETRY_SINK_AUTH_TOKENS", id="env"),
        pytest.param("[ingest]\nack = maybe\n", {}, "[ingest] ack: must be one of buffered, durable (got 'maybe')",
                     id="choice"),
        pytest.param("[writer]\ndirectory =\n", {}, "[writer] directory: must not be empty (got '')", id="empty-path"),
        pytest.param("", {"TELEMETRY_SINK_BUFFER_MAX_BYTES": "1e9"},
                     "[buffer] max_bytes: must be an integer (got '1e9')", id="env-not-int"),
    ],
)
def test_errors_are_exactly_one_line(tmp_path: Path, text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=environ)
    assert str(info.value) == message


def test_allowed_values_are_the_ones_the_consumers_check(tmp_path: Path) -> None:
    assert SCHEMA["writer"]["fsync"].choices == FSYNC_POLICIES
    assert SCHEMA["rate_limit"]["mode"].choices == RATE_LIMIT_MODES
    assert SCHEMA["ingest"]["ack"].choices == ACK_MODES
    with pytest.raises(ValueError, match="mode must be reject or delay"):
        RateLimiter(1, 1, "sometimes")
    for mode in RATE_LIMIT_MODES:
        assert RateLimiter(1, 1, mode).mode == mode
