"""The `telemetry-sink` command line: argument parsing and dispatch to the modules that do the work
(serve.py, reader.py, export.py, rotate.py, auth.py, crypto.py). Errors a person can hit are one line, exit 2."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__, export, segment_format, speedups
from .auth import AuthConfigError
from .client.send_cmd import add_parser as add_send_parser
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .crypto import CryptoService, KeyConfigError, write_key_file
from .objstore import ObjectStoreError, StoreSettings
from .progress import Progress
from .reader import (
    DamageError,
    Follower,
    NoSegmentsError,
    RecordFilter,
    RecordWalker,
    parse_time,
    segment_refs,
    total_bytes,
    total_size,
    verify_segments,
)
from .segment_recovery import WriterStartError  # not segment_writer: that loads asyncio and prometheus_client
from .segment_source import ObjectFilter, SegmentRef
from .serve import ServeError

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


def cmd_serve(args: argparse.Namespace) -> int:
    from .logging_setup import configure
    from .serve import serve

    log_config = configure(args.log_level, args.log_format)
    return serve(_load(args.config), access_log=args.access_log, log_level=args.log_level, log_config=log_config)


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


# -- read and verify --


def _segments(args: argparse.Namespace) -> list[SegmentRef]:
    """Local paths, or s3:// URLs reached with the configured [ship] endpoint, region and allow_http."""
    if not args.paths:
        return segment_refs(args.paths, _load(args.config).writer.directory)
    settings = None
    if any(p.startswith("s3://") for p in args.paths):
        ship = _load(args.config).ship
        settings = StoreSettings(ship.endpoint_url, ship.region, ship.allow_http, ship.request_timeout_s)
    return segment_refs(args.paths, None, settings, ObjectFilter(args.day, args.instance))


def _crypto(key_file: str | None, config_arg: str | None) -> CryptoService:
    if key_file:
        return CryptoService.from_key_file(Path(key_file))
    return CryptoService.from_config(_load(config_arg).crypto.key_file)


def _warn(message: str) -> None:
    print(f"telemetry-sink: warning: {message}", file=sys.stderr, flush=True)


def cmd_read(args: argparse.Namespace) -> int:
    crypto = _crypto(args.key_file, args.config)
    follower = Follower(crypto, sys.stdout.buffer, _warn, _record_filter(args), args.strict)
    follower.read_new(_segments(args), final=not args.follow)
    if args.follow:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while True:
                time.sleep(args.poll_interval)
                follower.read_new(_segments(args), final=False)
        except KeyboardInterrupt:
            pass
    summary = follower.summary()
    if summary is not None:
        _warn(summary)
        return EXIT_DAMAGE
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    walker = RecordWalker(_crypto(args.key_file, args.config), _warn, _record_filter(args), args.strict)
    return export.main(args, walker, _segments(args), _warn)


def _record_filter(args: argparse.Namespace) -> RecordFilter:
    return RecordFilter(args.node, args.since, args.until)


def _time_arg(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_verify(args: argparse.Namespace) -> int:
    crypto = CryptoService.from_key_file(Path(args.key_file)) if args.key_file else None
    segments = _segments(args)
    if not segments:
        raise CliError("no segments found")
    with Progress("verify", total_size(segments)) as progress:
        damaged = verify_segments(segments, crypto, print, progress)
    return EXIT_DAMAGE if damaged else 0


# -- rotate-key --


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from .rotate import rotate_directory

    config = _load(args.config)
    directory = config.writer.directory
    if not directory.is_dir():
        raise CliError(f"log directory {directory} does not exist")
    crypto = _crypto(args.key_file, args.config)
    with Progress("rotate-key", total_bytes(segment_format.list_segments(directory))) as progress:
        report = rotate_directory(directory, crypto, progress)
    for path in report.skipped_active:
        print(f"{path.name}: skipped (a running writer is appending to it; run again after it rolls over)")
    for problem in report.failed:
        print(f"FAILED: {problem}")
    print(f"{len(report.rewritten)} segments re-encrypted ({report.tokens_rotated} records), "
          f"{len(report.unchanged)} already under the first key, {len(report.skipped_active)} active skipped, "
          f"{len(report.failed)} failed")
    return EXIT_DAMAGE if report.failed else 0


# -- top --


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run

    return run(args.urls or [_load(args.config).local_url()], args.interval, args.iterations)


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
    if speedups.FALLBACK_REASON is not None:
        rows.append(("compiled_path", f"not in use: {speedups.FALLBACK_REASON}; to get it: {speedups.HOW_TO_COMPILE}"))
    for name, value in rows:
        print(f"{name}: {value}")
    return 0


# -- argument parsing --


def _day(text: str) -> str:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date as YYYY-MM-DD") from None
    return text


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

    def source_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--day", metavar="YYYY-MM-DD", type=_day, help="s3:// only: objects of this UTC day")
        p.add_argument("--instance", metavar="ID", help="s3:// only: objects of this instance")
        p.add_argument("paths", nargs="*", metavar="PATH",
                       help="segment files, directories, or s3://bucket/prefix (credentials from the AWS "
                       "environment; endpoint, region and allow_http from [ship])")

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

    def record_opts(p: argparse.ArgumentParser) -> None:  # read's and export's
        p.add_argument("--key-file", metavar="PATH", help="key file (default: the configured one)")
        p.add_argument("--node", metavar="PATTERN", action="append", default=[],
                       help="only records whose node_id matches PATTERN, an id or a glob ('greenhouse-*'); "
                            "repeat for any of several")
        p.add_argument("--since", metavar="TIME", type=_time_arg,
                       help="only records whose ts >= TIME: Unix seconds, ISO 8601 (2026-12-01T10:00Z; UTC when no "
                            "offset) or a time ago (30m, 1h, 2d)")
        p.add_argument("--until", metavar="TIME", type=_time_arg, help="only records whose ts < TIME (same forms)")
        p.add_argument("--strict", action="store_true",
                       help="fail (exit 2) at the first damaged batch or unreadable record instead of skipping it")
        source_opts(p)

    record_opts(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep reading as the live log grows")
    p.add_argument("--poll-interval", type=float, default=0.25, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("export", help="decrypt segments into Parquet, CSV or NDJSON", description=export.DESCRIPTION)
    config_opt(p)
    record_opts(p)
    export.add_arguments(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check segments' integrity (no key needed)",
                       description="Walk every segment: batches, records, first/last sequence, gaps, torn tails "
                       "and corrupt batches with their offsets. Exit status 1 on any damage.")
    config_opt(p)
    p.add_argument("--key-file", metavar="PATH", help="also authenticate every token with these keys")
    source_opts(p)
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

    p = sub.add_parser("top", help="live view of running servers from their /metrics",
                       description="A live terminal view of one or more running servers, from their /metrics: "
                       "requests/s and records/s, answers by status, rejections by reason, buffer fill, write "
                       "and fsync latency, segments, and the shipping backlog when shipping is on. Press q to "
                       "quit.")
    config_opt(p)
    p.add_argument("urls", nargs="*", metavar="URL",
                   help="server base URLs (default: the configured [server] host and port)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("info", help="version, implementation, OpenSSL version, config path")
    config_opt(p)
    p.set_defaults(func=cmd_info)
    add_send_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, KeyConfigError, CliError, WriterStartError, AuthConfigError, ServeError, DamageError,
            NoSegmentsError, ObjectStoreError, export.ExportError) as exc:
        print(f"telemetry-sink: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `read | head`: the reader went away; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

