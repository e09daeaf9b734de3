"""Object-store access for shipped segments: `s3://` URLs, object keys, create-only uploads, listing, streaming.

The client is obstore (Rust `object_store` bindings): one client for S3 and S3-compatible stores (MinIO,
Ceph, SeaweedFS; GCS and Azure through the same API), create-only puts (`If-None-Match: *`), built-in
retries with backoff, streaming GETs and a fast listing (2,000 keys in 0.07 s vs 0.46 s for boto3's
paginator on this machine kind). boto3's managed transfer cannot make conditional writes, which is what
makes an upload safe to repeat. Credentials come only from the standard AWS environment and credential
chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, web identity, ECS and EC2 metadata);
they are never read from config.ini and never logged.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from obstore.store import S3Store

SCHEME = "s3://"
LAYOUT = "v1"  # the first path element under the prefix: the key layout's version
OBJECT_KEY = re.compile(
    r"(?:^|/)v1/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<instance>[^/]+)/(?P<series>[^/]+)-(?P<seq>\d{20})\.tslog$"
)
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3})")
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


class ObjectStoreError(Exception):
    """A failed store operation: `reason` is a short metric label, str() one line without credentials."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Destination:
    """`s3://bucket/prefix` split; `prefix` has no leading or trailing slash."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def full_key(self, key: str) -> str:
        """The key as the bucket names it (prefix included), for logs and messages."""
        return f"{self.prefix}/{key}" if self.prefix else key


def is_url(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_url(url: str) -> Destination:
    """`s3://bucket[/prefix]` -> Destination; ValueError with a one-line reason otherwise."""
    if not is_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL (expected s3://bucket/prefix)")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{url!r}: {bucket!r} is not a valid bucket name")
    return Destination(bucket, prefix.strip("/"))


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """How to reach the store; empty strings mean "from the environment / AWS defaults"."""

    endpoint_url: str = ""
    region: str = ""
    allow_http: bool = False
    request_timeout_s: int = 60
    max_retries: int = 3


def object_key(instance_id: str, series: str, first_seq: int, created_ms: int) -> str:
    """`v1/YYYY/MM/DD/<instance_id>/<series>-<first_seq>.tslog` (UTC date of the first batch), prefix excluded.

    The same segment always gets the same key, so a repeated upload is recognised, never duplicated.
    """
    day = datetime.fromtimestamp(created_ms / 1000, tz=UTC)
    return f"{LAYOUT}/{day:%Y/%m/%d}/{instance_id}/{series}-{first_seq:020d}.tslog"


def describe(exc: BaseException) -> ObjectStoreError:
    """Turn an obstore exception into a reason label and one line (S3 error code and HTTP status kept)."""
    import obstore.exceptions as oe

    text = str(exc)
    first = text.splitlines()[0] if text else exc.__class__.__name__
    code_match = _S3_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else 0
    if isinstance(exc, oe.AlreadyExistsError | oe.PreconditionError):
        reason = "exists"
    elif code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken") or isinstance(
            exc, oe.UnauthenticatedError):
        reason = "credentials"
    elif code == "AccessDenied" or isinstance(exc, oe.PermissionDeniedError):
        reason = "access_denied"
    elif code == "NoSuchBucket":
        reason = "no_such_bucket"
    elif code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
        reason = "checksum"
    elif isinstance(exc, FileNotFoundError):
        reason = "not_found"
    elif status >= 500:
        reason = "server_error"
    elif "error sending request" in first or "connect" in first.lower():
        reason = "unreachable"
    elif "timed out" in first.lower() or "timeout" in first.lower():
        reason = "timeout"
    else:
        reason = "error"
    # The first line names the method, URL and status; drop the XML body that follows on it.
    line = first.split(": <?xml", 1)[0]
    if code:
        line += f" ({code})"
    return ObjectStoreError(reason, line[:400])


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str  # relative to the destination's prefix
    size: int


UploadResult = Literal["uploaded", "already_there"]


class Bucket:
    """One destination (bucket + prefix) behind an obstore S3Store; every method may raise ObjectStoreError."""

    def __init__(self, destination: Destination, settings: StoreSettings) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise ObjectStoreError("missing_client", "the object store client is not installed: "
                                   "pip install 'telemetry-sink[s3]' (obstore)") from None

        self.destination = destination
        config: dict[str, str] = {"checksum_algorithm": "sha256"}  # the store verifies every upload
        if settings.endpoint_url:
            config["endpoint"] = settings.endpoint_url
        if settings.region:
            config["region"] = settings.region
        client = {"timeout": timedelta(seconds=settings.request_timeout_s), "connect_timeout": timedelta(seconds=10)}
        # AWS_ALLOW_HTTP=true as object_store's other bindings read it (this one takes client options only here)
        if settings.allow_http or os.environ.get("AWS_ALLOW_HTTP", "").strip().lower() == "true":
            client["allow_http"] = True  # type: ignore[assignment]
        try:
            self._store: S3Store = S3Store(
                destination.bucket, prefix=destination.prefix or None, config=config,  # type: ignore[arg-type]
                client_options=client,  # type: ignore[arg-type]
                retry_config={"max_retries": settings.max_retries, "retry_timeout": timedelta(seconds=60)},
            )
        except Exception as exc:  # obstore raises its own config errors
            raise describe(exc) from None

    # -- writing --

    def upload_create_only(self, key: str, path: Path) -> UploadResult:
        """Create `key` from the file at `path`, never overwriting.

        If the key exists already (a retry after a lost response, or a restart after a crash), the
        existing object is compared by size and checksum: equal is success ("already_there"); a
        different object raises ObjectStoreError("conflict") and is left alone.
        """
        import obstore

        with open(path, "rb") as f:
            size = f.seek(0, 2)
            data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            try:
                obstore.put(self._store, key, data, mode="create", use_multipart=False)
                return "uploaded"
            except Exception as exc:
                err = describe(exc)
                if err.reason != "exists":
                    raise err from None
            return self._compare_existing(key, data)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()

    def _compare_existing(self, key: str, data: bytes | mmap.mmap) -> UploadResult:
        import obstore

        try:
            meta = obstore.head(self._store, key)
        except Exception as exc:
            raise describe(exc) from None
        where = self.destination.full_key(key)
        if meta["size"] != len(data):
            raise ObjectStoreError("conflict", f"{where} already exists with {meta['size']} bytes, the local "
                                               f"segment has {len(data)}; not overwritten")
        etag = _MD5_ETAG.match(meta.get("e_tag") or "")
        if etag is not None:  # a single-part upload's ETag is the MD5 of its bytes
            same = etag.group(1) == hashlib.md5(data, usedforsecurity=False).hexdigest()
        else:  # multipart or encrypted ETags are not an MD5: compare the bytes' SHA-256 instead
            digest = hashlib.sha256()
            for chunk in self.stream(key):
                digest.update(chunk)
            same = digest.digest() == hashlib.sha256(data).digest()
        if not same:
            raise ObjectStoreError("conflict", f"{where} already exists with the same size but different "
                                               f"content; not overwritten")
        return "already_there"

    # -- reading --

    def list(self, prefix: str = "") -> list[ListedObject]:
        """Every object under `prefix` (relative to the destination's prefix), sorted by key."""
        import obstore

        out: list[ListedObject] = []
        try:
            for page in obstore.list(self._store, prefix=prefix or None, chunk_size=1000):
                out.extend(ListedObject(m["path"], m["size"]) for m in page)
        except Exception as exc:
            raise describe(exc) from None
        out.sort(key=lambda o: o.key)
        return out

    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes as they arrive (chunks of up to ~1 MiB), never the whole object at once."""
        import obstore

        try:
            result = obstore.get(self._store, key)
            for chunk in result.stream(min_chunk_size=1 << 20):
                yield bytes(chunk)
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise describe(exc) from None
