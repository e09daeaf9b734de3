"""Where segments are read from: local files and directories, or `s3://bucket/prefix` in object storage.

Both kinds of source give `SegmentRef`s that the reader walks alike: a label for messages (the path, or
`s3://bucket/key`), the series whose sequence numbers run on (for objects: `<instance_id>/<series>`, so
several instances sharing a prefix are checked apart), and `open()`, a view of the batches. Objects are
streamed in key order, never downloaded whole to disk or memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import segment_format
from .objstore import OBJECT_KEY, Bucket, Destination, StoreSettings, is_url, parse_url
from .segment_format import FILE_HEADER_SIZE, Batch, Damage, SegmentImage
from .segment_index import SegmentIndex, read_index
from .segment_stream import iter_stream_batches


class NoSegmentsError(Exception):
    """A path given to read or verify names neither a segment nor a directory of segments."""


class SegmentView(Protocol):
    size: int

    def batches(self, start: int = FILE_HEADER_SIZE) -> Iterator[Batch | Damage]: ...

    def close(self) -> None: ...


class SegmentRef(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def series(self) -> str: ...

    def size_now(self) -> int: ...

    def open(self) -> SegmentView:
        """Raises SegmentFormatError (not a v1 segment), OSError or ObjectStoreError."""
        ...

    def index(self) -> SegmentIndex | None:
        """The segment's index (segment_index.py) when there is a valid one, else None."""
        ...


@dataclass(frozen=True, slots=True)
class LocalSegment:
    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def series(self) -> str:
        try:
            return segment_format.parse_segment_name(self.path)[0]
        except ValueError:  # not named as a writer names segments: no sequence to continue
            return str(self.path)

    def size_now(self) -> int:
        return self.path.stat().st_size

    def open(self) -> SegmentView:
        return SegmentImage(self.path)

    def index(self) -> SegmentIndex | None:
        return read_index(self.path)


class _ObjectView:
    """One streamed GET of a segment object; `batches()` may be walked once."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        self.size = size
        self._chunks = chunks
        first = b""
        while len(first) < FILE_HEADER_SIZE:  # check the header now, like SegmentImage does
            chunk = next(chunks, None)
            if chunk is None:
                break
            first += chunk
        segment_format.check_file_header(first[:FILE_HEADER_SIZE])
        self._first = first

    def batches(self, start: int = FILE_HEADER_SIZE) -> Iterator[Batch | Damage]:
        def rest() -> Iterator[bytes]:
            yield self._first
            yield from self._chunks

        return iter_stream_batches(rest(), self.size, start)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True, slots=True)
class ObjectSegment:
    bucket: Bucket
    key: str  # relative to the bucket's prefix
    size: int
    instance: str
    series_name: str

    @property
    def label(self) -> str:
        return f"s3://{self.bucket.destination.bucket}/{self.bucket.destination.full_key(self.key)}"

    @property
    def series(self) -> str:
        return f"{self.instance}/{self.series_name}"

    def size_now(self) -> int:
        return self.size

    def open(self) -> SegmentView:
        return _ObjectView(self.bucket.stream(self.key), self.size)

    def index(self) -> SegmentIndex | None:
        return None  # indexes are not shipped: a filtered read from a bucket reads every object


@dataclass(frozen=True, slots=True)
class ObjectFilter:
    """Which objects of a prefix to read: one day (`YYYY-MM-DD`, UTC) and/or one instance; None: all."""

    day: str | None = None
    instance: str | None = None


def object_segments(url: str, settings: StoreSettings, only: ObjectFilter) -> list[ObjectSegment]:
    """The segment objects under `url` in key order (day, instance, series, first sequence number); a URL
    ending in `.tslog` names one object."""
    try:
        dest = parse_url(url)
    except ValueError as exc:
        raise NoSegmentsError(str(exc)) from None
    single = None
    if dest.prefix.endswith(segment_format.SEGMENT_SUFFIX):  # one object named in full
        parent, _, single = dest.prefix.rpartition("/")
        dest = Destination(dest.bucket, parent)
    bucket = Bucket(dest, settings)
    prefix = ""
    if only.day is not None and single is None:
        prefix = "v1/" + only.day.replace("-", "/")
        if only.instance is not None:
            prefix += f"/{only.instance}"
    out: list[ObjectSegment] = []
    for obj in bucket.list(prefix):
        match = OBJECT_KEY.search(dest.full_key(obj.key))
        if single is not None and obj.key != single:
            continue
        if match is None or (only.instance is not None and match["instance"] != only.instance):
            continue
        out.append(ObjectSegment(bucket, obj.key, obj.size, match["instance"], match["series"]))
    return out


def total_size(segments: Sequence[SegmentRef]) -> int:
    """What a progress bar counts towards: the segments' sizes (0 for one that vanished)."""
    total = 0
    for ref in segments:
        try:
            total += ref.size_now()
        except OSError:
            continue
    return total


def _check_is_segment(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            segment_format.check_file_header(f.read(segment_format.FILE_HEADER_SIZE))
    except segment_format.SegmentFormatError as exc:
        raise NoSegmentsError(f"{path} is not a telemetry-sink segment ({exc})") from None
    except OSError as exc:
        raise NoSegmentsError(f"{path}: cannot read it ({exc.strerror})") from None


def segment_refs(paths: Sequence[str], default_directory: Path | None, settings: StoreSettings | None = None,
                 only: ObjectFilter | None = None) -> list[SegmentRef]:
    """The segments named by `paths` (files, directories or s3:// URLs), or those of `default_directory`.
    A file named explicitly must be a segment (NoSegmentsError, one line, if not)."""
    if not paths:
        if default_directory is None or not default_directory.is_dir():
            raise NoSegmentsError(f"log directory {default_directory} does not exist")
        return [LocalSegment(p) for p in segment_format.list_segments(default_directory)]
    out: list[SegmentRef] = []
    for raw in paths:
        if is_url(raw):
            out.extend(object_segments(raw, settings or StoreSettings(), only or ObjectFilter()))
            continue
        p = Path(raw)
        if p.is_dir():
            out.extend(LocalSegment(s) for s in segment_format.list_segments(p))
        elif p.is_file():
            _check_is_segment(p)
            out.append(LocalSegment(p))
        else:
            raise NoSegmentsError(f"{p}: no such file or directory")
    return out
