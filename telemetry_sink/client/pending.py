"""Records handed to the client and not yet delivered: the batch being filled and the sealed ones, in memory.

`DiskSpool` (spool.py) keeps the same state on disk; the front ends see only this interface.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol

from .batching import Batch, new_key
from .errors import RejectedError


class PendingStore(Protocol):
    """Oldest-first store of sealed batches plus one open batch. Not thread-safe: the front ends lock."""

    open_records: int
    open_bytes: int
    open_since: float
    total_bytes: int

    def append(self, line: bytes) -> None: ...
    def seal(self) -> Batch | None: ...
    def oldest(self, skip: Batch | None = None) -> Batch | None: ...
    def sealed_records(self) -> int: ...
    def ndjson(self, batch: Batch) -> bytes: ...
    def remove(self, batch: Batch) -> None: ...
    def reject(self, batch: Batch, error: RejectedError) -> None: ...
    def close(self) -> None: ...


class SealedQueue:
    """What both stores share: their sealed batches, oldest first."""

    _sealed: deque[Batch]

    def oldest(self, skip: Batch | None = None) -> Batch | None:
        for batch in self._sealed:
            if batch is not skip:
                return batch
        return None

    def sealed_records(self) -> int:
        return sum(b.records for b in self._sealed)


class MemoryPending(SealedQueue):
    """The store without a spool: lost with the process, bounded by max_pending_bytes like the spool."""

    def __init__(self) -> None:
        self._open: list[bytes] = []
        self.open_records = 0
        self.open_bytes = 0
        self.open_since = 0.0
        self.total_bytes = 0
        self._sealed: deque[Batch] = deque()
        self._seq = 0

    def append(self, line: bytes) -> None:
        if not self._open:
            self.open_since = time.monotonic()
        self._open.append(line)
        self.open_records += 1
        self.open_bytes += len(line) + 1
        self.total_bytes += len(line) + 1

    def seal(self) -> Batch | None:
        if not self._open:
            return None
        self._seq += 1
        batch = Batch(self._seq, new_key(), self.open_records, self.open_bytes, ndjson=b"\n".join(self._open) + b"\n")
        self._sealed.append(batch)
        self._open = []
        self.open_records = self.open_bytes = 0
        return batch


    def ndjson(self, batch: Batch) -> bytes:
        assert batch.ndjson is not None
        return batch.ndjson

    def remove(self, batch: Batch) -> None:
        self._sealed.remove(batch)
        self.total_bytes -= batch.nbytes

    def reject(self, batch: Batch, error: RejectedError) -> None:
        # The records travel on in the exception; the store lets go of them.
        self.remove(batch)

    def close(self) -> None:
        pass
