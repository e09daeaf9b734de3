"""Store-and-forward on disk: the pending records in a directory, so they outlive an outage and a client restart.

Layout (one client process per directory, held with an flock on `lock`):

    NNNNNNNNNNNN.open          the batch being filled: one JSON record a line, appended by every `send`
    NNNNNNNNNNNN-KEY.batch     sealed batches, oldest (lowest NNN) first; KEY is the batch's Idempotency-Key
    rejected/NAME.batch        batches the server refused for good, with NAME.error.json (status, error, index)

Durability: every `send` writes its records to the open file before it returns, so they survive the client
process being killed. With `spool_fsync = "batch"` (the default) each batch is fsynced, and so is the directory
entry, when it is sealed (by count, bytes, age or `flush`), so sealed batches also survive a power cut; records
of the open batch (at most max_batch_age_s of them) are only as safe as the OS page cache. `"never"` leaves
all of it to the OS. A delivered batch's file is unlinked without an fsync: should the unlink be lost, the
batch is sent again with the same key, which the server recognises (Idempotency-Key).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import deque
from pathlib import Path

import orjson

# The segment format module is standard library only: sharing its helper costs the client nothing.
from ..segment_format import fsync_dir
from .batching import Batch, new_key
from .errors import ClientError, RejectedError
from .pending import SealedQueue

log = logging.getLogger("telemetry_sink.client")


class SpoolLockedError(ClientError):
    """Another client process has this spool directory open."""


class DiskSpool(SealedQueue):
    """`PendingStore` on disk (see the module docstring for layout and durability)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self._fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rejected").mkdir(exist_ok=True)
        self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"spool {directory} is in use by another client process; "
                                   f"give each process its own spool_dir") from None
        self._sealed: deque[Batch] = deque()
        self._open_fd: int | None = None
        self._open_seq = 0
        self.open_records = 0
        self.open_bytes = 0
        self.open_since = 0.0
        self.total_bytes = 0
        self._next_seq = 1
        self._recover()

    def _recover(self) -> None:
        """Adopt what a previous process left: sealed batches as they are, an open batch sealed (torn tail cut)."""
        entries: list[tuple[int, Path]] = []
        for path in self.directory.iterdir():
            stem = path.name.split(".", 1)[0].split("-", 1)[0]
            if path.suffix in (".open", ".batch") and stem.isdigit():
                entries.append((int(stem), path))
        for seq, path in sorted(entries):
            self._next_seq = max(self._next_seq, seq + 1)
            data = path.read_bytes()
            if path.suffix == ".open":
                # Only a power cut can leave half a line; that record's send() never returned.
                data = data[: data.rfind(b"\n") + 1]
                if not data:
                    path.unlink()
                    continue
                os.truncate(path, len(data))
                path = self._sealed_path(path, seq, new_key())
            key = path.stem.split("-", 1)[1]
            self._sealed.append(Batch(seq, key, data.count(b"\n"), len(data), path=path))
            self.total_bytes += len(data)
        if self._sealed:
            log.info("spool %s: %d batches (%d records) left by a previous client, sending them first",
                     self.directory, len(self._sealed), self.sealed_records())

    def _sealed_path(self, open_path: Path, seq: int, key: str) -> Path:
        path = open_path.with_name(f"{seq:012d}-{key}.batch")
        if self._fsync:
            with open(open_path, "rb") as f:
                os.fsync(f.fileno())
        open_path.rename(path)
        if self._fsync:
            fsync_dir(self.directory)
        return path

    def append(self, line: bytes) -> None:
        if self._open_fd is None:
            self._open_seq = self._next_seq
            self._next_seq += 1
            self._open_fd = os.open(self.directory / f"{self._open_seq:012d}.open",
                                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            self.open_since = time.monotonic()
        data = memoryview(line + b"\n")
        while data:
            data = data[os.write(self._open_fd, data):]
        self.open_records += 1
        self.open_bytes += len(line) + 1
        self.total_bytes += len(line) + 1

    def seal(self) -> Batch | None:
        if self._open_fd is None:
            return None
        os.close(self._open_fd)
        self._open_fd = None
        key = new_key()
        path = self._sealed_path(self.directory / f"{self._open_seq:012d}.open", self._open_seq, key)
        batch = Batch(self._open_seq, key, self.open_records, self.open_bytes, path=path)
        self._sealed.append(batch)
        self.open_records = self.open_bytes = 0
        return batch


    def ndjson(self, batch: Batch) -> bytes:
        assert batch.path is not None
        return batch.path.read_bytes()

    def remove(self, batch: Batch) -> None:
        assert batch.path is not None
        batch.path.unlink(missing_ok=True)
        self._sealed.remove(batch)
        self.total_bytes -= batch.nbytes

    def reject(self, batch: Batch, error: RejectedError) -> None:
        assert batch.path is not None
        target = self.directory / "rejected" / batch.path.name
        target.with_suffix(".error.json").write_bytes(orjson.dumps(
            {"status": error.status, "error": error.error, "detail": error.detail, "index": error.index}))
        batch.path.rename(target)
        self._sealed.remove(batch)
        self.total_bytes -= batch.nbytes

    def close(self) -> None:
        """Seal the open batch (so the next process finds it ready) and let go of the directory."""
        self.seal()
        os.close(self._lock_fd)
