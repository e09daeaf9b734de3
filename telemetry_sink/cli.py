"""The `telemetry-sink` command: serve, keygen, read, verify, info."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson

from . import __version__, segment_format, speedups
from .auth import AuthConfigError
from .client.send_cmd import add_parser as add_send_parser
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .crypto import CryptoService, InvalidToken, KeyConfigError, write_key_file
from .segment_writer import WriterLockedError

log = logging.getLogger("telemetry_sink")

CONFIG_ENV = "TELEMETRY_SINK_CONFIG"
EXIT_DAMAGE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A fatal, user-facing error: printed as one line, exit status 2."""


def _config_path(arg: str | None) -> Path | None:
    """--config, else $TELEMETRY_SINK_CONFIG, else ./config.ini if present, else built-in defaults."""
    if arg:
        return Path(arg)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _load(arg: str | None) -> Config:
    return load_config(_config_path(arg))


# -- serve --


def _effective_config(config: Config) -> dict[str, Any]:
    """The configuration as logged at start-up: paths only, never key material (there is none in it)."""
    out: dict[str, Any] = {}
    for section in ("server", "ingest", "rate_limit", "buffer", "writer", "crypto", "auth"):
        out[section] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(getattr(config, section)).items()}
    out["source"] = str(config.source) if config.source else None
    return out


GIL_SWITCH_INTERVAL_S = 0.0005
SERVE_ENV = "TELEMETRY_SINK_SERVE_ARGS"  # how `serve` hands its arguments to worker processes
_serving: list[Any] = []  # the TelemetryService of this process, for the signal hook


def build_app(config: Config, *, workers: int = 1) -> Any:
    """Wire the service, open its writer (claiming a segment series) and build the ASGI app."""
    from prometheus_client import CollectorRegistry

    from .auth import TokenTable
    from .http_server import configure_guard, create_app
    from .metrics import WriterMetrics
    from .service import TelemetryService

    crypto = CryptoService.from_config(config.crypto.key_file)
    tokens = TokenTable(config.auth.tokens_file) if config.auth.tokens_file else None
    # The writer thread releases the GIL to encrypt and write, then waits to get it back while
    # the event loop parses requests; with Python's default 5 ms switch interval that wait
    # held 100-record arrays to ~300k records/s on 2 cores; 0.5 ms: ~530k, single records
    # unchanged (A/B in docs/BENCHMARKS.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    registry = CollectorRegistry()
    service = TelemetryService.from_config(config, crypto, workers=workers, metrics=WriterMetrics(registry))
    service.writer.open()
    _serving[:] = [service]
    srv = config.server
    configure_guard(srv.header_timeout_s, srv.body_timeout_s, srv.max_connections)
    return create_app(service, config.ingest.max_body_bytes, srv.shutdown_timeout_s, tokens=tokens,
                      high_water_percent=config.buffer.high_water_percent, registry=registry)


def worker_app() -> Any:
    """uvicorn app factory run in each worker process when [server] workers > 1."""
    params = orjson.loads(os.environ[SERVE_ENV])
    config = load_config(Path(params["config"]) if params["config"] else None)
    return build_app(config, workers=config.server.workers)


def _uvicorn_server_class() -> type[Any]:
    import uvicorn

    class SinkServer(uvicorn.Server):
        """uvicorn's own signal handling, plus: refuse new ingests from the first signal on."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            for service in _serving:
                service.begin_shutdown()
            super().handle_exit(sig, frame)

    return SinkServer


def _log_startup(config: Config) -> None:
    srv = config.server
    log.info("starting: speedups %s, config %s, %d worker(s), auth %s, tls %s", speedups.IMPLEMENTATION,
             config.source or "built-in defaults", srv.workers, "on" if config.auth.tokens_file else "off",
             "mutual" if srv.tls_client_ca else ("on" if srv.tls_certfile else "off"),
             extra={"event": "startup", "implementation": speedups.IMPLEMENTATION,
                    "config": _effective_config(config)})


def cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from .auth import TokenTable
    from .http_server import GuardedHttpToolsProtocol
    from .logging_setup import configure

    log_config = configure(args.log_level, args.log_format)
    path = _config_path(args.config)
    config = load_config(path)
    srv = config.server
    for name in ("tls_certfile", "tls_keyfile", "tls_client_ca"):
        tls_path = getattr(srv, name)
        if tls_path is not None and not tls_path.is_file():
            raise CliError(f"[server] {name}: {tls_path} does not exist")
    tls: dict[str, Any] = {}
    if srv.tls_certfile is not None:
        tls = {"ssl_certfile": str(srv.tls_certfile), "ssl_keyfile": str(srv.tls_keyfile)}
        if srv.tls_client_ca is not None:
            tls.update(ssl_ca_certs=str(srv.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    common: dict[str, Any] = dict(
        host=srv.host, port=srv.port, loop="uvloop", http=GuardedHttpToolsProtocol, lifespan="on",
        access_log=args.access_log, log_level=args.log_level, log_config=log_config,
        timeout_graceful_shutdown=srv.shutdown_timeout_s, timeout_keep_alive=srv.keep_alive_s, **tls,
    )
    if srv.workers == 1:
        app = build_app(config)
        _log_startup(config)
        _uvicorn_server_class()(uvicorn.Config(app, **common)).run()
        return 0
    # Fail fast, with one line, on what every worker would fail on.
    CryptoService.from_config(config.crypto.key_file)
    if config.auth.tokens_file:
        TokenTable(config.auth.tokens_file)
    _log_startup(config)
    os.environ[SERVE_ENV] = orjson.dumps({"config": str(path.resolve()) if path else None}).decode()
    # uvicorn's supervisor: it forwards signals to the workers, each of which drains its own
    # writer on shutdown (their lifespan), and restarts workers on SIGHUP.
    uv_config = uvicorn.Config("telemetry_sink.cli:worker_app", factory=True, workers=srv.workers, **common)
    Multiprocess(uv_config, sockets=[uv_config.bind_socket()]).run()
    return 0


# -- token --


def cmd_token_add(args: argparse.Namespace) -> int:
    from .auth import add_token

    config = _load(args.config)
    path = Path(args.tokens_file) if args.tokens_file else config.auth.tokens_file
    if path is None:
        raise CliError("no tokens file: set [auth] tokens_file in the config or pass --tokens-file")
    token = add_token(path, args.pattern)
    print(token)
    print(f"added a token for node ids matching {args.pattern!r} to {path}; this is the only time it is "
          f"shown. A running server picks it up on SIGHUP.", file=sys.stderr)
    return 0


# -- keygen --


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _load(args.config).crypto.key_file
    try:
        write_key_file(out)
    except FileExistsError:
        raise CliError(f"{out} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from None
    print(f"wrote a new key to {out} (mode 0600); keep a copy: without it the log cannot be read",
          file=sys.stderr)
    return 0


# -- shared by read and verify --


def _segments(paths: Sequence[str], config_arg: str | None) -> list[Path]:
    if not paths:
        directory = _load(config_arg).writer.directory
        if not directory.is_dir():
            raise CliError(f"log directory {directory} does not exist")
        return segment_format.list_segments(directory)
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(segment_format.list_segments(p))
        elif p.is_file():
            out.append(p)
        else:
            raise CliError(f"{p}: no such file or directory")
    return out


def _crypto(key_file: str | None, config_arg: str | None) -> CryptoService:
    if key_file:
        return CryptoService.from_key_file(Path(key_file))
    return CryptoService.from_config(_load(config_arg).crypto.key_file)


def _warn(message: str) -> None:
    print(f"telemetry-sink: warning: {message}", file=sys.stderr, flush=True)


# -- read --


@dataclass
class _Follower:
    """Reads segments incrementally: remembers how far each one has been read."""

    crypto: CryptoService
    out: IO[bytes]
    node: str | None
    since: float | None
    strict: bool = False
    offsets: dict[Path, int] = field(default_factory=dict)
    bad_tokens: int = 0

    def read_new(self, paths: list[Path], final: bool) -> None:
        for path in paths:
            start = self.offsets.get(path, segment_format.FILE_HEADER_SIZE)
            try:
                image = segment_format.SegmentImage(path)
            except segment_format.SegmentFormatError as exc:
                if final or path.stat().st_size >= segment_format.FILE_HEADER_SIZE:
                    _warn(f"{path}: skipped, {exc}")
                    self.offsets[path] = 1 << 62
                continue
            with image:
                if image.size <= start:
                    continue
                for item in image.batches(start):
                    if isinstance(item, segment_format.Batch):
                        self._emit(item)
                        self.offsets[path] = item.end
                    elif item.kind == "corrupt":
                        self._damage(f"{path}: damaged batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes: {item.detail})")
                        self.offsets[path] = item.end
                    elif final:
                        self._damage(f"{path}: ends in an incomplete batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes)")
            self.out.flush()

    def _damage(self, message: str) -> None:
        if self.strict:
            self.out.flush()
            raise CliError(f"{message} (--strict)")
        _warn(f"skipped {message}")

    def _emit(self, batch: segment_format.Batch) -> None:
        write = self.out.write
        for token in batch.tokens:
            try:
                plaintext = self.crypto.decrypt(token)
            except InvalidToken:
                self.bad_tokens += 1
                self._damage(f"a record in the batch at seq {batch.first_seq} that does not authenticate "
                             f"with the key(s)")
                continue
            if self.node is not None or self.since is not None:
                record = orjson.loads(plaintext)
                if self.node is not None and record.get("node_id") != self.node:
                    continue
                ts = record.get("ts")
                if self.since is not None and not (isinstance(ts, (int, float)) and ts >= self.since):
                    continue
            write(plaintext)
            write(b"\n")


def cmd_read(args: argparse.Namespace) -> int:
    crypto = _crypto(args.key_file, args.config)
    follower = _Follower(crypto, sys.stdout.buffer, args.node, args.since, args.strict)
    follower.read_new(_segments(args.paths, args.config), final=not args.follow)
    if not args.follow:
        return EXIT_DAMAGE if follower.bad_tokens else 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            time.sleep(args.poll_interval)
            follower.read_new(_segments(args.paths, args.config), final=False)
    except KeyboardInterrupt:
        return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# -- verify --


@dataclass
class _SegmentReport:
    batches: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)


def _verify_segment(path: Path, crypto: CryptoService | None, expected_seq: int | None) -> _SegmentReport:
    report = _SegmentReport()
    try:
        image = segment_format.SegmentImage(path)
    except (segment_format.SegmentFormatError, OSError) as exc:
        report.problems.append(f"unreadable: {exc}")
        return report
    with image:
        for item in image.batches():
            if isinstance(item, segment_format.Damage):
                what = "torn tail" if item.kind == "torn" else "corrupt batch"
                report.problems.append(f"{what} at offset {item.offset} ({item.end - item.offset} bytes: "
                                       f"{item.detail})")
                continue
            if expected_seq is not None and item.first_seq != expected_seq:
                report.problems.append(f"sequence gap at offset {item.offset}: expected {expected_seq}, "
                                       f"found {item.first_seq}")
            expected_seq = item.next_seq
            report.batches += 1
            report.records += item.count
            if report.first_seq is None:
                report.first_seq = item.first_seq
            if item.count:
                report.last_seq = item.next_seq - 1
            if crypto is not None:
                for i, token in enumerate(item.tokens):
                    try:
                        crypto.decrypt(token)
                    except InvalidToken:
                        report.problems.append(f"record {item.first_seq + i} (batch at offset {item.offset}) "
                                               f"does not authenticate")
    return report


def cmd_verify(args: argparse.Namespace) -> int:
    crypto = CryptoService.from_key_file(Path(args.key_file)) if args.key_file else None
    segments = _segments(args.paths, args.config)
    if not segments:
        raise CliError("no segments found")
    next_seq: dict[str, int] = {}
    damaged = 0
    totals = _SegmentReport()
    for path in segments:
        report = _verify_segment(path, crypto, next_seq.get(segment_format.parse_segment_name(path)[0]))
        if report.last_seq is not None:
            next_seq[segment_format.parse_segment_name(path)[0]] = report.last_seq + 1
        seq = f"seq {report.first_seq}..{report.last_seq}" if report.last_seq is not None else "no records"
        status = "ok" if not report.problems else "DAMAGED"
        print(f"{path}: {status}: {report.batches} batches, {report.records} records, {seq}")
        for problem in report.problems:
            print(f"  {problem}")
        damaged += bool(report.problems)
        totals.batches += report.batches
        totals.records += report.records
    auth = ", every token authenticated" if crypto is not None and not damaged else ""
    print(f"{len(segments)} segments, {totals.batches} batches, {totals.records} records, "
          f"{damaged} damaged{auth}")
    return EXIT_DAMAGE if damaged else 0


# -- rotate-key --


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from .rotate import rotate_directory

    config = _load(args.config)
    directory = config.writer.directory
    if not directory.is_dir():
        raise CliError(f"log directory {directory} does not exist")
    crypto = _crypto(args.key_file, args.config)
    report = rotate_directory(directory, crypto)
    for path in report.skipped_active:
        print(f"{path.name}: skipped (a running writer is appending to it; run again after it rolls over)")
    for problem in report.failed:
        print(f"FAILED: {problem}")
    print(f"{len(report.rewritten)} segments re-encrypted ({report.tokens_rotated} records), "
          f"{len(report.unchanged)} already under the first key, {len(report.skipped_active)} active skipped, "
          f"{len(report.failed)} failed")
    return EXIT_DAMAGE if report.failed else 0


# -- info --


def _openssl_version() -> str:
    version = getattr(sys.modules.get("telemetry_sink._speedups"), "OPENSSL_VERSION", None)
    if isinstance(version, str):
        return version
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def cmd_info(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    rows: list[tuple[str, Any]] = [
        ("version", __version__),
        ("implementation", speedups.IMPLEMENTATION),
        ("openssl", _openssl_version()),
        ("python", platform.python_version()),
        ("config", str(path.resolve()) if path else "(built-in defaults)"),
    ]
    for name, value in rows:
        print(f"{name}: {value}")
    return 0


# -- argument parsing --


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telemetry-sink",
        description="Telemetry ingest server: HTTP in, rate-limited, batched, Fernet-encrypted segment log out.",
        epilog="Configuration: --config PATH, else $TELEMETRY_SINK_CONFIG, else ./config.ini if present. "
               "Every key can be overridden with TELEMETRY_SINK_<SECTION>_<KEY>; keys with TELEMETRY_SINK_KEY.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="PATH", help="config file (default: ./config.ini)")

    p = sub.add_parser("serve", help="run the HTTP server", description="Run the HTTP ingest server "
                       "(uvicorn on uvloop + httptools). SIGTERM/SIGINT drain the buffer to disk and exit.")
    config_opt(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text, or one JSON object a line on stderr (default: text)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: it is slow)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="write a new key file (mode 0600)",
                       description="Write a new Fernet key file with mode 0600. Never overwrites a file.")
    config_opt(p)
    p.add_argument("--out", metavar="PATH", help="where to write it (default: [crypto] key_file)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("read", help="decrypt segments and print one JSON record a line",
                       description="Decrypt segments (default: every segment in the configured directory, in "
                       "order) and print one JSON record a line. Damaged batches are skipped with a warning.")
    config_opt(p)
    p.add_argument("--key-file", metavar="PATH", help="key file (default: the configured one)")
    p.add_argument("--node", metavar="ID", help="only records with this node_id")
    p.add_argument("--since", metavar="TS", type=float, help="only records whose ts >= TS (Unix seconds)")
    p.add_argument("--follow", "-f", action="store_true", help="keep reading as the live log grows")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) at the first damaged batch or unreadable record instead of skipping it")
    p.add_argument("--poll-interval", type=float, default=0.25, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", metavar="PATH", help="segment files or directories")
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("verify", help="check segments' integrity (no key needed)",
                       description="Walk every segment: batches, records, first/last sequence, gaps, torn tails "
                       "and corrupt batches with their offsets. Exit status 1 on any damage.")
    config_opt(p)
    p.add_argument("--key-file", metavar="PATH", help="also authenticate every token with these keys")
    p.add_argument("paths", nargs="*", metavar="PATH", help="segment files or directories")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rotate-key", help="re-encrypt sealed segments under the key file's first key",
                       description="Re-encrypt every sealed segment of the configured directory whose records do "
                       "not all use the key file's first key (the others must still be listed to decrypt). Each "
                       "segment is written to a temporary file, fsynced and renamed over the old one, so a crash "
                       "leaves every segment readable. A segment a running server appends to is skipped. "
                       "Running it again is a no-op.")
    config_opt(p)
    p.add_argument("--key-file", metavar="PATH", help="key file (default: the configured one)")
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser("token", help="manage bearer tokens ([auth] tokens_file)",
                       description="Manage the bearer tokens that may write records. Only SHA-256 hashes are stored.")
    token_sub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = token_sub.add_parser("add", help="create a token for NODE_PATTERN, print it once, store its hash",
                             description="Create a random token allowed to write records whose node_id matches "
                             "NODE_PATTERN (an exact id or a glob such as 'greenhouse-*'). The token is printed "
                             "once on stdout; only its SHA-256 goes into the tokens file. Send SIGHUP to a running "
                             "server to load it.")
    config_opt(p)
    p.add_argument("--tokens-file", metavar="PATH", help="tokens file (default: [auth] tokens_file)")
    p.add_argument("pattern", metavar="NODE_PATTERN")
    p.set_defaults(func=cmd_token_add)

    p = sub.add_parser("info", help="version, implementation, OpenSSL version, config path")
    config_opt(p)
    p.set_defaults(func=cmd_info)
    add_send_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, KeyConfigError, CliError, WriterLockedError, AuthConfigError) as exc:
        print(f"telemetry-sink: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `read | head`: the reader went away; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

