"""Configuration: every key declared once, read from an INI file plus TELEMETRY_SINK_<SECTION>_<KEY> overrides.

Each section is a frozen dataclass below and each key one field of it, declared with `key(parser, "default", doc)`
(the default as written in config.ini; `path=True` resolves it against the config file's directory,
`optional=True` makes an empty value None, `choices=` lists the allowed values). Parsing, environment overrides,
path resolution, the one-line errors and the docs check all read these declarations.

To add a key: add one field to its section's dataclass, then its row in docs/configuration.md (the same default
and doc) and its line in config.ini; tests/test_config.py checks all three agree. A new section is one more
dataclass plus one field of `Config`.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, dataclass_transform, get_type_hints

ENV_PREFIX = "TELEMETRY_SINK_"
DEFAULT_CONFIG_PATH = Path("config.ini")

# Allowed values, declared once; the modules that act on them import these.
ACK_MODES = ("buffered", "durable")
RATE_LIMIT_MODES = ("reject", "delay")
FSYNC_POLICIES = ("batch", "interval", "never")
AFTER_UPLOAD_POLICIES = ("keep", "delete")
MAX_SHIPPED_SEGMENT_BYTES = 5 << 30  # a single S3 PUT (create-only uploads cannot be multipart everywhere)


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


def _percent(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 100:
        raise ValueError("must be between 1 and 100")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        raise ValueError("must be true or false")
    return value in ("true", "yes", "on", "1")


def _s3_url(raw: str) -> str:
    value = raw.strip()
    if value and not (value.startswith("s3://") and len(value) > len("s3://")):
        raise ValueError("must be an s3://bucket/prefix URL, or empty (shipping off)")
    return value


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


@dataclass(frozen=True, slots=True)
class Key:
    """How one key is read: its parser, its default as written in config.ini, and its doc line."""

    parse: Callable[[str], Any]
    default: str
    doc: str
    path: bool = False  # relative to the config file's directory (the working directory without one)
    optional: bool = False  # empty means None
    choices: tuple[str, ...] = ()  # compared after strip() and lower()

    def convert(self, raw: str, base: Path) -> Any:
        """The typed value of `raw`; ValueError says what is wrong."""
        if self.optional and not raw.strip():
            return None
        if self.choices:
            raw = raw.strip().lower()
            if raw not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}")
        value = self.parse(raw)
        return base / value if self.path else value


def key(parse: Callable[[str], Any], default_text: str, doc: str, *, path: bool = False, optional: bool = False,
        choices: tuple[str, ...] = ()) -> Any:
    """Declare one config key as a section dataclass field (no dataclass default: load_config fills every field)."""
    return field(metadata={"key": Key(parse, default_text, doc, path, optional, choices)})


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(key,))
def section(cls: type[_T]) -> type[_T]:
    """Make `cls` a config section: a frozen dataclass whose fields are declared with `key()`."""
    return dataclass(frozen=True, slots=True)(cls)


_TLS_PAIR_DOC = "PEM certificate chain and private key: serve HTTPS"  # one docs row for both keys


@section
class ServerConfig:
    host: str = key(_text, "127.0.0.1", "address to listen on")
    port: int = key(_port, "8080", "TCP port")
    workers: int = key(_positive_int, "1", "worker processes; each has its own writer and segment series "
                       "(`w0`, `w1`, …); the global rate limit and `retention_bytes` are split evenly between them")
    shutdown_timeout_s: int = key(_positive_int, "30", "on SIGTERM/SIGINT: how long to wait for in-flight "
                                  "requests, and then for the buffer to drain to disk")
    max_connections: int = key(_positive_int, "1024", "open connections beyond this are closed as soon as they "
                               "are accepted")
    header_timeout_s: int = key(_positive_int, "10", "a request head (request line and headers) must arrive "
                                "within this; a silent or trickling client is disconnected")
    body_timeout_s: int = key(_positive_int, "30", "the body must arrive within this, else 408 and the "
                              "connection is closed")
    keep_alive_s: int = key(_positive_int, "5", "an idle keep-alive connection is closed after this")
    max_header_bytes: int = key(_positive_int, "32768", "largest request head (request line and headers), "
                                "enforced as it arrives: 414 if the URL alone passes it, else 431, and the "
                                "connection is closed")
    fast_lane: str = key(str, "on", "`on`: POST /telemetry requests that can be answered without waiting are "
                         "handled in the HTTP protocol itself, below ASGI; `off`: every request goes through ASGI "
                         "(same answers, slower; for A/B)", choices=("on", "off"))
    tls_certfile: Path | None = key(_text, "", _TLS_PAIR_DOC, path=True, optional=True)
    tls_keyfile: Path | None = key(_text, "", _TLS_PAIR_DOC, path=True, optional=True)
    tls_client_ca: Path | None = key(_text, "", "PEM CA bundle: require client certificates signed by it "
                                     "(mutual TLS)", path=True, optional=True)


@section
class IngestConfig:
    max_body_bytes: int = key(_positive_int, "4194304", "largest request body; larger: 413 (4 MiB: above the ~2.3 MB "
                              "chunks Fluent Bit's http output posts)")
    max_records_per_request: int = key(_positive_int, "10000", "most records in one request, counted before "
                                       "parsing (NDJSON: lines); more: 413 `too_many_records`")
    ack: str = key(str, "buffered", "`buffered`: 202 once the records are in the memory buffer; `durable`: 202 "
                   "only after they are written and fsynced (see the README's guarantees)", choices=ACK_MODES)
    idempotency_window_s: int = key(_non_negative_int, "3600", "a request repeated with the same "
                                    "`Idempotency-Key` (same client, same body) within this gets the first answer "
                                    "and stores nothing (see docs/http-api.md); `0` ignores the header and writes "
                                    "segments without the keyed flag")
    idempotency_max_keys: int = key(_positive_int, "100000", "at most this many keys are remembered (about 200 "
                                    "bytes each); past it the oldest answered key is forgotten early")
    node_id_header: str | None = key(_text, "", "a request header (e.g. `X-Node-Id`) whose value becomes the "
                                     "`node_id` of records that have none, for agents that cannot add a field; "
                                     "empty: off", optional=True)


@section
class RateLimitConfig:
    bytes_per_second: int = key(_non_negative_int, "33554432", "global refill rate over request body bytes; "
                                "`0` disables the limit")
    burst_bytes: int = key(_positive_int, "33554432", "bucket capacity (split between workers, each share at "
                           "least max_body_bytes)")
    mode: str = key(str, "reject", "`reject`: 429 at once; `delay`: wait up to `max_delay_ms`, then 429",
                    choices=RATE_LIMIT_MODES)
    max_delay_ms: int = key(_non_negative_int, "1000", "longest wait in `delay` mode")
    per_node_bytes_per_second: int = key(_non_negative_int, "0", "per-client limit on top of the global one "
                                         "(`0`: off), keyed by the bearer token when `[auth]` is on, else by the "
                                         "client address")
    per_node_burst_bytes: int = key(_positive_int, "2097152", "per-client bucket capacity")
    per_node_max_buckets: int = key(_positive_int, "10000", "at most this many per-client buckets are kept; the "
                                    "least recently used is evicted (so a flood of distinct clients cannot grow "
                                    "memory; an evicted client starts again with a full bucket)")


@section
class BufferConfig:
    max_records: int = key(_positive_int, "100000", "records accepted but not yet written (including the batch "
                           "being written)")
    max_bytes: int = key(_positive_int, "33554432", "the same in plaintext bytes")
    high_water_percent: int = key(_percent, "90", "`/readyz` answers 503 once the buffer is this full")


@section
class WriterConfig:
    directory: Path = key(_text, "./data", "log directory (created if missing)", path=True)
    batch_size: int = key(_positive_int, "1000", "write a batch when this many records wait …")
    flush_interval_ms: int = key(_positive_int, "200", "… or when the oldest waiting record has waited this long")
    fsync: str = key(str, "interval", "`batch`: fsync after every batch; `interval`: at most once per "
                     "`fsync_interval_ms` (and an idle tail is fsynced within it); `never`: leave it to the OS "
                     "(sealing a segment and shutting down always fsync)", choices=FSYNC_POLICIES)
    fsync_interval_ms: int = key(_positive_int, "1000", "see `fsync`")
    max_segment_bytes: int = key(_positive_int, "134217728", "seal the segment and start a new one once it passes "
                                 "this size")
    max_segment_age_s: int = key(_non_negative_int, "3600", "also seal it once its first batch is this old, even "
                                 "if idle (`0`: no age limit)")
    retention_bytes: int = key(_non_negative_int, "0", "delete the oldest sealed segments while the log is larger "
                               "than this (`0`: unlimited); with several workers each series keeps an equal share")
    retention_days: int = key(_non_negative_int, "0", "delete sealed segments last written more than this many "
                              "days ago (`0`: keep)")


@section
class CryptoConfig:
    key_file: Path = key(_text, "./dev.key", "one Fernet key a line; the first encrypts, all decrypt", path=True)


@section
class AuthConfig:
    tokens_file: Path | None = key(_text, "", "`NODE_ID_PATTERN TOKEN_SHA256` lines; when set, POST /telemetry "
                                   "needs a bearer token (see docs/security.md)", path=True, optional=True)


@section
class ShipConfig:
    destination: str = key(_s3_url, "", "`s3://bucket/prefix`: upload every sealed segment there as one object "
                           "(empty: shipping off); see docs/object-storage.md")
    endpoint_url: str = key(str.strip, "", "S3 endpoint, e.g. `http://127.0.0.1:8333` for SeaweedFS or MinIO "
                            "(empty: AWS, or `AWS_ENDPOINT_URL`)")
    region: str = key(str.strip, "", "bucket region (empty: `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`)")
    allow_http: bool = key(_bool, "false", "allow a plain-HTTP endpoint (test and loopback stores only)")
    instance_id: str = key(str.strip, "", "this instance's name in object keys (empty: generated once and kept "
                           "in `<directory>/instance_id`)")
    concurrency: int = key(_positive_int, "2", "segments uploaded at the same time")
    retry_initial_ms: int = key(_positive_int, "1000", "first wait after a failed upload; doubles per failure "
                                "(with jitter) …")
    retry_max_ms: int = key(_positive_int, "60000", "… up to this")
    request_timeout_s: int = key(_positive_int, "120", "one upload or download request may take this long")
    after_upload: str = key(str, "keep", "`keep`: the local copy stays under the writer's retention; `delete`: "
                            "delete it as soon as its upload is confirmed", choices=AFTER_UPLOAD_POLICIES)
    unhealthy_after_s: int = key(_positive_int, "300", "`/healthz` and `/readyz` report shipping once uploads "
                                 "have failed for this long")


@section
class OtlpConfig:
    node_id_attribute: str = key(_text, "service.instance.id", "POST /v1/logs: the resource attribute whose value "
                                 "becomes each log record's `node_id` (`host.name` when it is absent; see "
                                 "docs/otlp.md)")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration; relative paths are already resolved. Each field but `source` is a section."""

    server: ServerConfig
    ingest: IngestConfig
    rate_limit: RateLimitConfig
    buffer: BufferConfig
    writer: WriterConfig
    crypto: CryptoConfig
    auth: AuthConfig
    ship: ShipConfig
    otlp: OtlpConfig
    source: Path | None

    def as_dict(self) -> dict[str, Any]:
        """Every section's values (paths as strings) plus `source`: JSON-ready, for the start-up log line."""
        out: dict[str, Any] = {
            name: {k: str(v) if isinstance(v, Path) else v for k, v in asdict(getattr(self, name)).items()}
            for name in SECTIONS
        }
        out["source"] = str(self.source) if self.source else None
        return out

    def local_url(self) -> str:
        """The base URL a tool on this host reaches the configured server at (a wildcard host is
        reached on loopback); ConfigError when the port is only chosen at start (0)."""
        srv = self.server
        if srv.port == 0:
            raise ConfigError(f"[server] port: 0 in {self.source or 'the built-in defaults'} is chosen when the "
                              f"server starts; pass the server's URL instead")
        host = "127.0.0.1" if srv.host in ("0.0.0.0", "::", "") else srv.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if srv.tls_certfile else 'http'}://{host}:{srv.port}"


# section name (as in config.ini) -> its dataclass, in Config's field order
SECTIONS: dict[str, type[Any]] = {name: cls for name, cls in get_type_hints(Config).items() if name != "source"}
# section -> key -> Key, read off the dataclass fields (declaration order is config.ini order)
SCHEMA: dict[str, dict[str, Key]] = {
    name: {f.name: f.metadata["key"] for f in fields(cls)} for name, cls in SECTIONS.items()
}


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
    raw = {name: {k: spec.default for k, spec in keys.items()} for name, keys in SCHEMA.items()}
    if path is not None:
        for name, ini_values in _read_ini(path).items():
            if name not in SCHEMA:
                raise ConfigError(f"[{name}]: unknown section (known: {', '.join(SCHEMA)})")
            for k, value in ini_values.items():
                if k not in SCHEMA[name]:
                    raise ConfigError(f"[{name}] {k}: unknown key (known: {', '.join(SCHEMA[name])})")
                raw[name][k] = value
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "KEY":
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        for name in sorted(SCHEMA, key=len, reverse=True):  # the longest section name that fits wins
            if rest.startswith(name + "_"):
                k = rest[len(name) + 1 :]
                if k not in SCHEMA[name]:
                    raise ConfigError(f"[{name}] {k}: unknown key, set by environment variable {var}")
                raw[name][k] = value
                break

    base = path.resolve().parent if path is not None else Path.cwd()
    built: dict[str, Any] = {}
    for name, keys in SCHEMA.items():
        values: dict[str, Any] = {}
        for k, spec in keys.items():
            try:
                values[k] = spec.convert(raw[name][k], base)
            except ValueError as exc:
                reason = str(exc) if "invalid literal" not in str(exc) else "must be an integer"
                raise ConfigError(f"[{name}] {k}: {reason} (got {raw[name][k]!r})") from None
        built[name] = SECTIONS[name](**values)
    config = Config(**built, source=path)
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
    if c.ship.destination and c.writer.max_segment_bytes > MAX_SHIPPED_SEGMENT_BYTES:
        raise ConfigError(
            f"[writer] max_segment_bytes: {c.writer.max_segment_bytes} exceeds 5 GiB, the most one upload "
            f"to [ship] destination can hold"
        )
    if c.writer.batch_size > c.buffer.max_records:
        raise ConfigError(
            f"[writer] batch_size: {c.writer.batch_size} exceeds [buffer] max_records "
            f"{c.buffer.max_records}, so a size-triggered flush could never happen"
        )
