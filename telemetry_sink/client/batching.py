"""Records to bytes, and a batch of them to a request body (JSON array or NDJSON, gzip above a size)."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .options import ClientOptions

Record = Mapping[str, Any] | bytes
CHUNK = 1000  # records encoded, then taken under one lock, at a time by send_many


def encode_record(record: Record, max_bytes: int) -> bytes:
    """One record as compact JSON (no newline in it, so NDJSON framing and the array form are both a join).

    `bytes` are taken as an already-encoded JSON object and only checked for shape: one line, `{...}`.
    """
    if isinstance(record, bytes | bytearray | memoryview):
        line = bytes(record).strip()
        if not (line.startswith(b"{") and line.endswith(b"}")) or b"\n" in line or b"\r" in line:
            raise ValueError("an encoded record must be one JSON object on one line")
    elif isinstance(record, Mapping):
        try:
            line = orjson.dumps(record)
        except orjson.JSONEncodeError as exc:
            raise TypeError(f"record is not JSON-serialisable: {exc}") from None
    else:
        raise TypeError(f"a record is a mapping (dict) or an encoded JSON object (bytes), not {type(record).__name__}")
    if len(line) + 2 > max_bytes:
        raise ValueError(f"record of {len(line)} bytes exceeds max_batch_bytes ({max_bytes})")
    return line


def new_key() -> str:
    """A fresh Idempotency-Key value: 128 random bits, which no other batch of any client will draw."""
    return uuid.uuid4().hex


@dataclass(eq=False)
class Batch:
    """A sealed batch: its records never change, and its key goes with every attempt to send it.

    `ndjson` is the records one a line (in memory); a spooled batch has `path` instead and is read back when sent.
    """

    seq: int
    key: str
    records: int
    nbytes: int
    ndjson: bytes | None = None
    path: Path | None = None


def build_request(batch: Batch, ndjson: bytes, options: ClientOptions) -> tuple[bytes, dict[str, str]]:
    """The request body for a batch and its headers: the fixed ones, Content-Encoding, Idempotency-Key."""
    headers = options.headers()
    # The IETF httpapi draft makes the key a Structured Field string, hence the quotes.
    headers["idempotency-key"] = f'"{batch.key}"'
    body = ndjson if options.wire_format == "ndjson" else b"[" + ndjson.rstrip(b"\n").replace(b"\n", b",") + b"]"
    if options.gzip_min_bytes is not None and len(body) >= options.gzip_min_bytes:
        # Level 1: most of the size win on JSON for a fraction of level 6's CPU, which matters on small gateways.
        headers["content-encoding"] = "gzip"
        return gzip.compress(body, compresslevel=1, mtime=0), headers
    return body, headers


def split_lines(ndjson: bytes) -> list[bytes]:
    """A batch's records, one bytes object each (for RejectedError.records)."""
    return ndjson.splitlines()
