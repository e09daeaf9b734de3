"""Segment index v1: a small sidecar file per sealed segment (`NAME.tslog.idx`) saying what its
records can hold (the range of `ts`, the node ids), so a filtered read skips segments that cannot
match without decrypting them. Documented in docs/log-format.md ("Segment index").

A sidecar rather than a trailer: a trailer after the last batch would read as a torn tail to every
reader that knows only the batch format. An index is a hint, never the data: one that is missing,
malformed, of another version or written for a different size of its segment is ignored and the
segment is read in full.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from .segment_format import write_durably

INDEX_SUFFIX = ".idx"
INDEX_VERSION = 1
# More distinct node ids than this in one segment: the index keeps no node list (a node filter
# then reads the segment); the ts range is always kept.
MAX_NODES = 1024


@dataclass(slots=True)
class Span:
    """The range of `ts` and the node ids of some records; `nodes` None: too many to list."""

    ts_min: float = math.inf
    ts_max: float = -math.inf
    nodes: set[str] | None = None
    records: int = 0

    @classmethod
    def empty(cls) -> Span:
        return cls(nodes=set())

    def add(self, ts_min: float, ts_max: float, nodes: Iterable[str], records: int) -> None:
        """Widen to cover `records` more records with these bounds and node ids."""
        self.ts_min = min(self.ts_min, ts_min)
        self.ts_max = max(self.ts_max, ts_max)
        self.records += records
        if self.nodes is not None:
            self.nodes.update(nodes)
            if len(self.nodes) > MAX_NODES:
                self.nodes = None

    def merge(self, other: Span) -> None:
        self.add(other.ts_min, other.ts_max, other.nodes if other.nodes is not None else (), other.records)
        if other.nodes is None:
            self.nodes = None


@dataclass(frozen=True, slots=True)
class SegmentIndex:
    """What one sealed segment's records can hold."""

    segment: str  # the segment's file name
    size: int  # the segment's size when the index was written
    first_seq: int
    next_seq: int
    span: Span

    def overlaps(self, since: float | None, until: float | None) -> bool:
        """Whether a record with since <= ts < until can be in the segment."""
        if self.span.records == 0:
            return False
        return (since is None or self.span.ts_max >= since) and (until is None or self.span.ts_min < until)


def index_path(segment: Path) -> Path:
    return segment.with_name(segment.name + INDEX_SUFFIX)


def write_index(segment: Path, size: int, first_seq: int, next_seq: int, span: Span) -> None:
    """Write the sidecar of a sealed segment durably (temp file, fsync, rename)."""
    doc = {
        "telemetry_sink_segment_index": INDEX_VERSION,
        "segment": segment.name,
        "size": size,
        "first_seq": first_seq,
        "next_seq": next_seq,
        "records": span.records,
        "ts_min": span.ts_min if span.records else None,
        "ts_max": span.ts_max if span.records else None,
        "nodes": sorted(span.nodes) if span.nodes is not None else None,
    }
    path = index_path(segment)
    write_durably(path, orjson.dumps(doc), path.with_name(f".{path.name}.tmp"), 0o600)


def read_index(segment: Path) -> SegmentIndex | None:
    """The segment's index if it is there, of this version, and written for the segment as it is now."""
    try:
        doc = orjson.loads(index_path(segment).read_bytes())
        if doc.get("telemetry_sink_segment_index") != INDEX_VERSION or doc["segment"] != segment.name:
            return None
        if doc["size"] != segment.stat().st_size:
            return None  # the segment changed since (appended to after a recovery, or replaced)
        records = int(doc["records"])
        nodes = doc["nodes"]
        span = Span(float(doc["ts_min"]) if records else math.inf, float(doc["ts_max"]) if records else -math.inf,
                    set(nodes) if isinstance(nodes, list) else None, records)
        return SegmentIndex(doc["segment"], int(doc["size"]), int(doc["first_seq"]), int(doc["next_seq"]), span)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_index(segment: Path) -> None:
    """Delete a segment's sidecar (with the segment, by retention or after shipping)."""
    with contextlib.suppress(FileNotFoundError):
        index_path(segment).unlink()
