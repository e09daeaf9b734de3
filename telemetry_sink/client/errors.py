"""The client's exceptions: what a caller is told about records it handed over and that were not delivered."""

from __future__ import annotations

from dataclasses import dataclass

# What to change when a refusal is about the client's settings rather than a record.
HINTS = {
    401: " (check the client's token)",
    413: " (set the client's max_batch_bytes below the server's [ingest] max_body_bytes)",
}


class ClientError(Exception):
    """Base class of every error the client raises on purpose."""


class ClientClosedError(ClientError):
    """`send`/`flush` on a client that was closed."""


@dataclass
class RejectedError(ClientError):
    """The server refused a batch with a status that retrying cannot fix (a 4xx other than 408 and 429, or 500).

    `error`, `detail` and `index` are the server's (`index`: the first bad record, 0-based, into `records`);
    `records` are the batch's records as sent (encoded JSON objects), so the caller can fix or log them. With a
    spool the batch is also kept on disk under `rejected/`. Nothing of the batch was stored by the server.
    """

    status: int
    error: str | None
    detail: str | None
    index: int | None
    records: list[bytes]
    idempotency_key: str

    def __str__(self) -> str:
        where = f" at index {self.index}" if self.index is not None else ""
        hint = HINTS.get(self.status, "")
        return (f"server refused a batch of {len(self.records)} records: {self.status} "
                f"{self.error or 'error'}{where}: {self.detail or '(no detail)'}{hint}")


@dataclass
class PendingFullError(ClientError):
    """`send` waited `block_timeout_s` for room in a full buffer or spool (`full_policy = "block"`)."""

    pending_bytes: int
    max_pending_bytes: int

    def __str__(self) -> str:
        return (f"client buffer full ({self.pending_bytes} of {self.max_pending_bytes} bytes pending) and the "
                f"server is not taking records fast enough; raise max_pending_bytes or block_timeout_s")


class SenderFailedError(ClientError):
    """The background sender stopped on an unexpected error (logged with its traceback); the client is unusable.

    With a spool the pending records are still on disk for the next client.
    """

    def __init__(self, cause: BaseException, pending_records: int) -> None:
        super().__init__(f"the client's sender stopped ({type(cause).__name__}: {cause}); {pending_records} "
                         f"records not delivered")
        self.pending_records = pending_records


@dataclass
class DeliveryTimeout(ClientError):
    """`flush`/`close` ran out of time with records still undelivered (the server is down or refusing with 503/429).

    With a spool the records stay on disk (`spool_dir`) and the next client opened on it sends them;
    without one, a closed client's pending records are lost, which is why this is raised.
    """

    pending_records: int
    spool_dir: str | None

    def __str__(self) -> str:
        if self.spool_dir:
            return (f"{self.pending_records} records not yet delivered; they stay in the spool {self.spool_dir} and "
                    f"are sent by the next client opened on it")
        return f"{self.pending_records} records not delivered in time (no spool: a closed client loses them)"
