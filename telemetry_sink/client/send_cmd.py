"""`telemetry-sink send`: NDJSON from stdin or files, delivered through `Client` (shell scripts, back-filling).

Also runnable as `python -m telemetry_sink.client`, which loads none of the server's modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from ..progress import Progress
from .errors import ClientError, DeliveryTimeout, RejectedError

if TYPE_CHECKING:  # the CLI registers this command at start-up; httpx is imported only when it runs
    from .batching import Record

EXIT_REFUSED = 1  # the server refused some records for good (each refusal printed)
EXIT_USAGE = 2  # bad arguments or an input line that is not a JSON object
EXIT_UNDELIVERED = 3  # records left undelivered when --timeout ran out (kept in --spool when given)
PROGRESS_EVERY = 1000  # records between progress updates
URL_ENV = "TELEMETRY_SINK_URL"
TOKEN_ENV = "TELEMETRY_SINK_TOKEN"


class InputError(Exception):
    """An input line that is not one JSON object: where, and what."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `send` on the `telemetry-sink` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "send", help="send NDJSON records (stdin or files) to a server",
        description="Read one JSON object a line from the files (or stdin, or '-') and deliver them to a "
        "telemetry-sink server in batches, retrying while it is unreachable or busy. Exit status: 0 all "
        "delivered, 1 the server refused some records (printed), 2 bad usage or input (reading stops at the "
        "bad line; the lines before it are delivered), 3 not all delivered within --timeout.")
    configure(p)
    p.set_defaults(func=run)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"server URL (default: from --config, else ${URL_ENV}, else http://127.0.0.1:8080)")
    p.add_argument("--config", metavar="PATH", help="a local server's config file, for back-filling on its host: "
                   "send to its [server] host and port, batches within its max_body_bytes")
    p.add_argument("--token-file", metavar="PATH",
                   help=f"file holding the bearer token (default: ${TOKEN_ENV}; never put a token in argv)")
    p.add_argument("--node-id", metavar="ID", help="node_id for records that have none")
    p.add_argument("--spool", metavar="DIR", help="store-and-forward directory: survive outages and restarts")
    p.add_argument("--batch-records", type=int, default=1000, metavar="N", help="records per batch (1000)")
    p.add_argument("--batch-bytes", type=int, default=512 * 1024, metavar="N", help="bytes per batch (512 KiB)")
    p.add_argument("--gzip-min-bytes", type=int, default=32 * 1024, metavar="N",
                   help="gzip bodies from this size (32 KiB; 0: never)")
    p.add_argument("--ca-file", metavar="PATH", help="CA bundle to verify the server with")
    p.add_argument("--client-cert", metavar="PATH", help="client certificate (PEM, may hold the key) for mTLS")
    p.add_argument("--client-key", metavar="PATH", help="client private key (PEM), if not in --client-cert")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up waiting for delivery after S seconds at the end (300)")
    p.add_argument("paths", nargs="*", metavar="FILE", help="NDJSON files ('-' or none: stdin)")


def _target(args: argparse.Namespace) -> tuple[str, int]:
    """The URL to send to and the batch byte bound, from --url / --config / the environment."""
    if args.url or not args.config:
        return args.url or os.environ.get(URL_ENV, "http://127.0.0.1:8080"), args.batch_bytes
    from ..config import load_config

    config = load_config(Path(args.config))
    return config.local_url(), min(args.batch_bytes, config.ingest.max_body_bytes)


def _input_bytes(paths: Sequence[str]) -> int | None:
    """What the progress bar counts towards: the files' sizes (None when reading a pipe)."""
    if not paths or "-" in paths:
        return None
    try:
        return sum(os.path.getsize(p) for p in paths)
    except OSError:
        return None  # reported with its name when it is opened


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def _records(paths: Sequence[str], node_id: str | None) -> Iterator[tuple[int, Record]]:
    """(bytes of its line, record) for every non-blank line; raises InputError at a line that is not an object."""
    for name in paths or ["-"]:
        stream: IO[bytes] = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
        try:
            for lineno, raw in enumerate(stream, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise InputError(f"{name}:{lineno}: not JSON ({exc})") from None
                if not isinstance(value, dict):
                    raise InputError(f"{name}:{lineno}: not a JSON object")
                if node_id is not None and "node_id" not in value:
                    value["node_id"] = node_id
                    yield len(raw), value
                else:
                    yield len(raw), line  # already valid JSON: sent as read, not re-encoded
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def _report(exc: RejectedError) -> None:
    bad = exc.records[exc.index][:200].decode(errors="replace") if exc.index is not None else ""
    print(f"telemetry-sink send: {exc}" + (f"; record: {bad}" if bad else ""), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from .sync_client import Client

    try:
        url, batch_bytes = _target(args)
        client = Client(url, token=_token(args), max_batch_records=args.batch_records,
                        max_batch_bytes=batch_bytes, gzip_min_bytes=args.gzip_min_bytes or None,
                        spool_dir=args.spool, ca_file=args.ca_file, client_cert=args.client_cert,
                        client_key=args.client_key)
    except (ValueError, OSError, ClientError) as exc:
        print(f"telemetry-sink send: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refused = 0
    status = 0
    with Progress("send", _input_bytes(args.paths)) as progress:
        done = done_bytes = 0
        try:
            for nbytes, record in _records(args.paths, args.node_id):
                while True:
                    try:
                        client.send(record)
                        break
                    except RejectedError as exc:  # an earlier batch's refusal; this record was not taken yet
                        refused += len(exc.records)
                        _report(exc)
                done, done_bytes = done + 1, done_bytes + nbytes
                if done == PROGRESS_EVERY:
                    progress.advance(done, done_bytes)
                    done = done_bytes = 0
        except (InputError, OSError) as exc:
            print(f"telemetry-sink send: error: {exc}", file=sys.stderr)
            status = EXIT_USAGE
        progress.advance(done, done_bytes)
    while True:  # close() raises each refusal not yet reported, one a call, then returns
        try:
            client.close(timeout=args.timeout)
            break
        except RejectedError as exc:
            refused += len(exc.records)
            _report(exc)
        except DeliveryTimeout as exc:
            print(f"telemetry-sink send: {exc}", file=sys.stderr)
            status = status or EXIT_UNDELIVERED
    if refused:
        print(f"telemetry-sink send: {refused} records refused by the server", file=sys.stderr)
    return status or (EXIT_REFUSED if refused else 0)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m telemetry_sink.client [options] [FILE...]`: the same as `telemetry-sink send`."""
    parser = argparse.ArgumentParser(prog="python -m telemetry_sink.client", description="Send NDJSON records.")
    configure(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130
