"""Records of one request: decode a JSON / NDJSON body, validate every record (all or nothing),
add the receive time as `ts` where missing, serialise the plaintexts the writer encrypts, and
check a token's right to write each record's node_id."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import orjson

from .auth import Principal
from .errors import IngestError
from .errors import invalid_record as _invalid
from .speedups import check_records, dump_records, encode_json, has_digit_run

MAX_NODE_ID_CHARS = 128
DEFAULT_MAX_RECORDS = 10_000  # [ingest] max_records_per_request


def _too_many(limit: int) -> IngestError:
    return IngestError(413, "too_many_records", f"the body holds more than {limit} records (the limit per request); "
                       "send them in several requests")


def parse_body(body: bytes, fmt: str, max_records: int = DEFAULT_MAX_RECORDS) -> list[Any]:
    """Decode a JSON (object or array of objects) or NDJSON body into a list of values, refusing
    more than `max_records` (NDJSON lines are counted before any is parsed)."""
    if fmt == "ndjson":
        return [value for piece in parse_slices(body, fmt, max_records) for value in piece]
    return _parse_document(body, max_records)  # one call, no generator: the common single record


def parse_slices(body: bytes, fmt: str, max_records: int = DEFAULT_MAX_RECORDS,
                 slice_records: int = 0) -> Iterator[list[Any]]:
    """parse_body in pieces of `slice_records` NDJSON lines (0: one piece), so that a caller can
    yield to others between them; a JSON document is always one piece (one C call)."""
    if fmt != "ndjson":
        yield _parse_document(body, max_records)
        return
    # A C-speed count bounds the per-line work before it starts (blank lines count too).
    if body.count(b"\n") + (not body.endswith(b"\n")) > max_records:
        raise _too_many(max_records)
    wide = has_digit_run(body, _WIDE_DIGITS)  # compiled: no per-byte Python work
    lines = body.split(b"\n")
    step = slice_records or len(lines)
    seen = 0
    loads = orjson.loads
    for start in range(0, len(lines), step):
        values: list[Any] = []
        for lineno, line in enumerate(lines[start:start + step], start + 1):
            if not line.strip():
                continue
            try:
                values.append(loads(line))
            except orjson.JSONDecodeError as exc:
                raise IngestError(400, "invalid_json", f"line {lineno}: {exc}") from None
            if wide and has_digit_run(line, _WIDE_DIGITS):
                _refuse_wide_integers(line, seen + len(values) - 1)
        seen += len(values)
        if start + step >= len(lines) and not seen:
            raise _invalid(0, "the body holds no records")
        yield values


def _parse_document(body: bytes, max_records: int) -> list[Any]:
    """The records of a JSON body: an object, or a non-empty array of at most `max_records`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, "invalid_json", str(exc)) from None
    if has_digit_run(body, _WIDE_DIGITS):
        _refuse_wide_integers(body, 0)
    if type(doc) is dict:
        return [doc]
    if type(doc) is list:
        if not doc:
            raise _invalid(0, "the array holds no records")
        if len(doc) > max_records:
            raise _too_many(max_records)
        return doc
    raise _invalid(0, f"the body must be a JSON object or an array of objects, not {_json_type(doc)}")


# orjson keeps integers from -2**63 to 2**64 - 1 exactly and silently makes wider ones floats. Only a
# body with a run of 19 or more digits can hold one: those (rare) bodies are checked exactly.
_WIDE_DIGITS = 19
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_DEPTH = 1024  # orjson refuses deeper documents


def _refuse_wide_integers(text: bytes, first_index: int) -> None:
    """422 naming the first record of `text` (one NDJSON line, or the whole JSON document) that holds
    an integer beyond 64 bits, found by the stdlib's exact parse. Called only after orjson parsed
    `text`, so its nesting is within orjson's 1024 levels: the recursion limit is raised to match,
    so that no RecursionError can occur here."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * _MAX_DEPTH))
    try:
        doc = json.loads(text)
        docs = doc if type(doc) is list else [doc]
        for index, record in enumerate(docs, first_index):
            if _holds_wide_integer(record):
                raise _invalid(index, f"an integer beyond 64 bits ({_INT_MIN} to {_INT_MAX}) cannot be stored "
                                      f"exactly: send it as a string")
    finally:
        sys.setrecursionlimit(limit)


def _holds_wide_integer(value: Any) -> bool:
    if type(value) is int:
        return not _INT_MIN <= value <= _INT_MAX
    if type(value) is dict:
        return any(_holds_wide_integer(v) for v in value.values())
    if type(value) is list:
        return any(_holds_wide_integer(v) for v in value)
    return False


def fill_node_id(values: list[Any], node_id: str) -> None:
    """Give every record (object) without a `node_id` this one ([ingest] node_id_header)."""
    for record in values:
        if type(record) is dict and "node_id" not in record:
            record["node_id"] = node_id


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def encode_records(values: list[Any], received_at: float, first_index: int = 0) -> tuple[list[bytes], int]:
    """Validate every record (all or nothing), add missing `ts`, return plaintexts and their size.
    `first_index` is the first record's index in the request (errors name the request's index).

    The per-record loop (validation, then one orjson.dumps of the list split into exact-size
    records) is compiled (`speedups.check_records` / `dump_records`); this module words the
    error for the first invalid record."""
    bad = check_records(values, received_at, MAX_NODE_ID_CHARS)
    if bad >= 0:
        raise _why_invalid(values[bad], bad + first_index)
    try:
        plaintexts = dump_records(values)
    except orjson.JSONEncodeError:
        # orjson parses deeper nesting than it will serialise: name the record, no 500.
        for index, record in enumerate(values, first_index):
            try:
                orjson.dumps(record)
            except orjson.JSONEncodeError as exc:
                raise _invalid(index, f"the record cannot be stored: {exc}") from None
        raise
    # One record (the common request): its length, without a map and a sum around it.
    return plaintexts, len(plaintexts[0]) if len(plaintexts) == 1 else sum(map(len, plaintexts))


# (plaintexts, their total size, (lowest ts, highest ts, node ids)) of one request's records.
Encoded = tuple[list[bytes], int, tuple[float, float, set[str]]]


def encode_body(body: bytes, fmt: str, received_at: float, max_records: int = DEFAULT_MAX_RECORDS) -> Encoded | None:
    """parse_body + encode_records + record_span in one compiled pass, for the JSON / NDJSON bodies
    whose records orjson would write back exactly as they were sent (speedups.encode_json; the usual
    sensor record). None for any other body: the caller takes that path, which words any error."""
    # The NDJSON line count refuses before any parsing, blank lines included (as parse_slices does).
    if fmt == "ndjson" and body.count(b"\n") + (not body.endswith(b"\n")) > max_records:
        return None
    return encode_json(body, fmt == "ndjson", received_at, max_records, MAX_NODE_ID_CHARS)


def _why_invalid(record: Any, index: int) -> IngestError:
    """The 422 for a record check_records refused."""
    if type(record) is not dict:
        return _invalid(index, f"a record must be a JSON object, not {_json_type(record)}")
    node_id = record.get("node_id")
    if type(node_id) is not str:
        if node_id is None and "node_id" not in record:
            return _invalid(index, "node_id is missing")
        return _invalid(index, f"node_id must be a string, not {_json_type(node_id)}")
    if not 0 < len(node_id) <= MAX_NODE_ID_CHARS:
        return _invalid(index, f"node_id must be 1 to {MAX_NODE_ID_CHARS} characters, not {len(node_id)}")
    return _invalid(index, f"ts must be a number (Unix seconds), not {_json_type(record.get('ts'))}")


def check_permissions(values: list[Any], principal: Principal) -> None:
    """403 naming the first record whose node_id the token may not write."""
    for index, record in enumerate(values):
        if not principal.may_write(record["node_id"]):
            raise IngestError(403, "forbidden", f"this token may not write node_id {record['node_id']!r}",
                              index=index)


