"""Configuration: an INI file plus TELEMETRY_SINK_<SECTION>_<KEY> environment overrides.

Every key, its type and its default live in `SCHEMA`; docs/configuration.md lists the same.
Errors are one line naming the section, the key and what is wrong.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TELEMETRY_SINK_"
DEFAULT_CONFIG_PATH = Path("config.ini")


class ConfigError(ValueError):
    """A configuration problem; str() is one line naming section, key and the fault."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _optional_text(raw: str) -> str:
    return raw.strip()


def _percent(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 100:
        raise ValueError("must be between 1 and 100")
    return value


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


# section -> key -> (parser, default as written in config.ini)
SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], str]]] = {
    "server": {
        "host": (_text, "127.0.0.1"),
        "port": (_port, "8080"),
        "workers": (_positive_int, "1"),
        "shutdown_timeout_s": (_positive_int, "30"),
        "max_connections": (_positive_int, "1024"),
        "header_timeout_s": (_positive_int, "10"),
        "body_timeout_s": (_positive_int, "30"),
        "keep_alive_s": (_positive_int, "5"),
        "tls_certfile": (_optional_text, ""),
        "tls_keyfile": (_optional_text, ""),
        "tls_client_ca": (_optional_text, ""),
    },
    "ingest": {
        "max_body_bytes": (_positive_int, "1048576"),
        "ack": (_choice("buffered", "durable"), "buffered"),
    },
    "rate_limit": {
        "bytes_per_second": (_non_negative_int, "33554432"),
        "burst_bytes": (_positive_int, "8388608"),
        "mode": (_choice("reject", "delay"), "reject"),
        "max_delay_ms": (_non_negative_int, "1000"),
        "per_node_bytes_per_second": (_non_negative_int, "0"),
        "per_node_burst_bytes": (_positive_int, "2097152"),
        "per_node_max_buckets": (_positive_int, "10000"),
    },
    "buffer": {
        "max_records": (_positive_int, "100000"),
        "max_bytes": (_positive_int, "33554432"),
        "high_water_percent": (_percent, "90"),
    },
    "writer": {
        "directory": (_text, "./data"),
        "batch_size": (_positive_int, "1000"),
        "flush_interval_ms": (_positive_int, "200"),
        "fsync": (_choice("batch", "interval", "never"), "interval"),
        "fsync_interval_ms": (_positive_int, "1000"),
        "max_segment_bytes": (_positive_int, "134217728"),
        "max_segment_age_s": (_non_negative_int, "3600"),
        "retention_bytes": (_non_negative_int, "0"),
        "retention_days": (_non_negative_int, "0"),
    },
    "crypto": {
        "key_file": (_text, "./dev.key"),
    },
    "auth": {
        "tokens_file": (_optional_text, ""),
    },
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    workers: int
    shutdown_timeout_s: int
    max_connections: int
    header_timeout_s: int
    body_timeout_s: int
    keep_alive_s: int
    tls_certfile: Path | None
    tls_keyfile: Path | None
    tls_client_ca: Path | None


@dataclass(frozen=True, slots=True)
class IngestConfig:
    max_body_bytes: int
    ack: str


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    bytes_per_second: int
    burst_bytes: int
    mode: str
    max_delay_ms: int
    per_node_bytes_per_second: int
    per_node_burst_bytes: int
    per_node_max_buckets: int


@dataclass(frozen=True, slots=True)
class BufferConfig:
    max_records: int
    max_bytes: int
    high_water_percent: int


@dataclass(frozen=True, slots=True)
class WriterConfig:
    directory: Path
    batch_size: int
    flush_interval_ms: int
    fsync: str
    fsync_interval_ms: int
    max_segment_bytes: int
    max_segment_age_s: int
    retention_bytes: int
    retention_days: int


@dataclass(frozen=True, slots=True)
class CryptoConfig:
    key_file: Path


@dataclass(frozen=True, slots=True)
class AuthConfig:
    tokens_file: Path | None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration; relative paths are already resolved."""

    server: ServerConfig
    ingest: IngestConfig
    rate_limit: RateLimitConfig
    buffer: BufferConfig
    writer: WriterConfig
    crypto: CryptoConfig
    auth: AuthConfig
    source: Path | None


def _read_ini(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a valid INI file: {first_line}") from None
    return {section: dict(parser.items(section)) for section in parser.sections()}


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (if any), apply environment overrides, validate; raise ConfigError."""
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, str]] = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
    if path is not None:
        for section, values in _read_ini(path).items():
            if section not in SCHEMA:
                raise ConfigError(f"[{section}]: unknown section (known: {', '.join(SCHEMA)})")
            for key, value in values.items():
                if key not in SCHEMA[section]:
                    raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(SCHEMA[section])})")
                raw[section][key] = value
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "KEY":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section in SCHEMA:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if key not in SCHEMA[section]:
                    raise ConfigError(f"[{section}] {key}: unknown key, set by environment variable {name}")
                raw[section][key] = value
                break

    parsed: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        parsed[section] = {}
        for key, (parse, _) in keys.items():
            try:
                parsed[section][key] = parse(raw[section][key])
            except ValueError as exc:
                reason = str(exc) if "invalid literal" not in str(exc) else "must be an integer"
                raise ConfigError(f"[{section}] {key}: {reason} (got {raw[section][key]!r})") from None

    base = path.resolve().parent if path is not None else Path.cwd()
    parsed["writer"]["directory"] = base / parsed["writer"]["directory"]
    parsed["crypto"]["key_file"] = base / parsed["crypto"]["key_file"]
    for section, key in (("server", "tls_certfile"), ("server", "tls_keyfile"), ("server", "tls_client_ca"),
                         ("auth", "tokens_file")):
        parsed[section][key] = base / parsed[section][key] if parsed[section][key] else None
    config = Config(
        server=ServerConfig(**parsed["server"]),
        ingest=IngestConfig(**parsed["ingest"]),
        rate_limit=RateLimitConfig(**parsed["rate_limit"]),
        buffer=BufferConfig(**parsed["buffer"]),
        writer=WriterConfig(**parsed["writer"]),
        crypto=CryptoConfig(**parsed["crypto"]),
        auth=AuthConfig(**parsed["auth"]),
        source=path,
    )
    _check_combinations(config)
    return config


def _check_combinations(c: Config) -> None:
    share = c.rate_limit.burst_bytes // c.server.workers  # each worker gets an even share
    if c.rate_limit.bytes_per_second > 0 and c.ingest.max_body_bytes > share:
        per_worker = f" / {c.server.workers} workers = {share}" if c.server.workers > 1 else ""
        raise ConfigError(
            f"[ingest] max_body_bytes: {c.ingest.max_body_bytes} exceeds [rate_limit] burst_bytes "
            f"{c.rate_limit.burst_bytes}{per_worker}, so a request that large could never pass the rate limit"
        )
    if c.buffer.max_bytes < c.ingest.max_body_bytes:
        raise ConfigError(
            f"[buffer] max_bytes: {c.buffer.max_bytes} is smaller than [ingest] max_body_bytes "
            f"{c.ingest.max_body_bytes}, so a full-size request could never be buffered"
        )
    rl = c.rate_limit
    if rl.per_node_bytes_per_second > 0 and c.ingest.max_body_bytes > rl.per_node_burst_bytes:
        raise ConfigError(
            f"[ingest] max_body_bytes: {c.ingest.max_body_bytes} exceeds [rate_limit] per_node_burst_bytes "
            f"{rl.per_node_burst_bytes}, so a request that large could never pass the per-node limit"
        )
    if (c.server.tls_certfile is None) != (c.server.tls_keyfile is None):
        raise ConfigError("[server] tls_keyfile: tls_certfile and tls_keyfile must be set together")
    if c.server.tls_client_ca is not None and c.server.tls_certfile is None:
        raise ConfigError("[server] tls_client_ca: mutual TLS needs tls_certfile and tls_keyfile too")
    if c.writer.batch_size > c.buffer.max_records:
        raise ConfigError(
            f"[writer] batch_size: {c.writer.batch_size} exceeds [buffer] max_records "
            f"{c.buffer.max_records}, so a size-triggered flush could never happen"
        )
