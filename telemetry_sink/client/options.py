"""The client's settings, checked once, and what follows from them: the endpoint, the TLS context, fixed headers."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .. import __version__
from .retry import RetryPolicy

WireFormat = Literal["json", "ndjson"]
FullPolicy = Literal["block", "drop_oldest"]
SpoolFsync = Literal["batch", "never"]

USER_AGENT = f"telemetry-sink-client/{__version__}"


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """Every setting of `Client` and `AsyncClient` (they take the same keyword arguments); see docs/client.md."""

    url: str
    token: str | None = None
    # A batch is sent when it holds max_batch_records records, when one more record would take its body
    # past max_batch_bytes, or max_batch_age_s after its first record, whichever comes first. The byte bound
    # is of the uncompressed body, which is what the server's max_body_bytes (1 MiB by default) limits.
    max_batch_records: int = 1000
    max_batch_bytes: int = 512 * 1024
    max_batch_age_s: float = 1.0
    # Bodies of at least this many bytes are sent gzip-compressed (None: never).
    gzip_min_bytes: int | None = 32 * 1024
    wire_format: WireFormat = "json"
    timeout_s: float = 10.0
    # TLS: ca_file verifies the server against a private CA; client_cert (+ client_key) for mutual TLS.
    ca_file: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    tls_verify: bool = True
    # Store-and-forward: without spool_dir, pending records are kept in memory.
    spool_dir: str | Path | None = None
    spool_fsync: SpoolFsync = "batch"
    max_pending_bytes: int = 64 * 1024 * 1024
    full_policy: FullPolicy = "block"
    block_timeout_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://HOST[:PORT] or https://…, not {self.url!r}")
        if self.max_batch_records < 1 or self.max_batch_bytes < 64 or self.max_batch_age_s <= 0:
            raise ValueError("need max_batch_records >= 1, max_batch_bytes >= 64 and max_batch_age_s > 0")
        if self.max_pending_bytes < 2 * self.max_batch_bytes:
            # Room for the batch being sent and the one being filled, so `send` can always make progress.
            raise ValueError(f"max_pending_bytes ({self.max_pending_bytes}) must be at least twice "
                             f"max_batch_bytes ({self.max_batch_bytes})")
        if self.wire_format not in ("json", "ndjson"):
            raise ValueError(f"wire_format must be 'json' or 'ndjson', not {self.wire_format!r}")
        if self.full_policy not in ("block", "drop_oldest"):
            raise ValueError(f"full_policy must be 'block' or 'drop_oldest', not {self.full_policy!r}")
        if self.spool_fsync not in ("batch", "never"):
            raise ValueError(f"spool_fsync must be 'batch' or 'never', not {self.spool_fsync!r}")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        if self.timeout_s <= 0 or (self.block_timeout_s is not None and self.block_timeout_s < 0):
            raise ValueError("timeout_s must be > 0 and block_timeout_s >= 0")

    @property
    def endpoint(self) -> str:
        """The URL batches are posted to: `url` itself when it has a path, else `url` + /telemetry."""
        return self.url if urlsplit(self.url).path not in ("", "/") else self.url.rstrip("/") + "/telemetry"

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What httpx's `verify` gets: an SSLContext built from ca_file/client_cert, else tls_verify."""
        if not (self.ca_file or self.client_cert):
            return self.tls_verify
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        return ctx

    def headers(self) -> dict[str, str]:
        """Headers every request carries."""
        out = {"user-agent": USER_AGENT,
               "content-type": "application/json" if self.wire_format == "json" else "application/x-ndjson"}
        if self.token:
            out["authorization"] = f"Bearer {self.token}"
        return out
