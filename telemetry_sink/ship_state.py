"""Which sealed segments are confirmed in object storage: one marker file each, written atomically.

`<directory>/.shipped/<segment name>` holds the object key and size; it is written to a temporary file,
fsynced and renamed, so it survives crashes. When it cannot be written (a disk filled up while the store
was down), the confirmation is kept in memory so retention can free the space; after a restart such a
segment is uploaded again and found already there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from .segment_format import write_durably

log = logging.getLogger("telemetry_sink.shipper")

MARKER_DIR = ".shipped"
_PRUNE_EVERY = 100  # confirmations between sweeps for markers of segments deleted since


class ShippedState:
    """The confirmed segments of one log directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.markers = directory / MARKER_DIR
        self._in_memory: set[str] = set()
        self._recorded = 0

    def prepare(self) -> None:
        """Create the marker directory; drop stale markers and temporary files a crash left."""
        self.markers.mkdir(parents=True, exist_ok=True)
        self.prune(leftovers=True)

    def is_shipped(self, path: Path) -> bool:
        return path.name in self._in_memory or (self.markers / path.name).exists()

    def record(self, path: Path, key: str, size: int) -> None:
        """`path` is confirmed as object `key`: write its marker (or, failing that, remember it)."""
        try:
            self._write(path.name, orjson.dumps({"key": key, "size": size}))
        except OSError as exc:
            self._in_memory.add(path.name)
            log.warning("shipping: cannot record that %s is shipped (%s); retention may delete it, "
                        "a restart checks it again", path.name, exc.strerror or exc,
                        extra={"event": "ship_marker_failed", "segment": path.name})
        self._recorded += 1
        if self._recorded % _PRUNE_EVERY == 0:
            self.prune()

    def _write(self, name: str, data: bytes) -> None:
        marker = self.markers / name
        tmp = marker.with_name(f".{name}.tmp")
        try:
            write_durably(marker, data, tmp, 0o644)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def prune(self, leftovers: bool = False) -> None:
        """Drop the markers of segments deleted since (by retention), and with `leftovers` the temporary
        files of writes a crash interrupted: the marker directory stays small."""
        for marker in self.markers.iterdir():
            if marker.name.startswith("."):
                if leftovers:
                    marker.unlink(missing_ok=True)
            elif not (self.directory / marker.name).exists():
                marker.unlink(missing_ok=True)
        self._in_memory = {name for name in self._in_memory if (self.directory / name).exists()}
