"""Per-node bearer tokens: a tokens file of `node_id_pattern token_sha256` lines.

Only SHA-256 hashes of tokens are stored. A token may write records whose `node_id` matches
one of its patterns (shell-style globs such as `greenhouse-*`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("telemetry_sink.auth")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_GLOB_CHARS = frozenset("*?[")


class AuthConfigError(ValueError):
    """The tokens file is unusable; str() names the file and line (never a token)."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the tokens file."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated token: what it may write, and a stable key for per-node limits."""

    key: str  # the token's hash: never the token itself
    patterns: tuple[str, ...]

    def may_write(self, node_id: str) -> bool:
        for pattern in self.patterns:
            if pattern == node_id or (_GLOB_CHARS.intersection(pattern) and fnmatch.fnmatchcase(node_id, pattern)):
                return True
        return False


def _parse(path: Path) -> dict[str, Principal]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"tokens file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise AuthConfigError(f"tokens file {path}: not UTF-8 text (byte {exc.start}); write it as UTF-8") from None
    patterns: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not _HEX64.fullmatch(fields[1].lower()):
            raise AuthConfigError(
                f"tokens file {path}, line {lineno}: expected `NODE_ID_PATTERN TOKEN_SHA256` "
                f"(64 hex digits)"
            )
        patterns.setdefault(fields[1].lower(), []).append(fields[0])
    return {digest: Principal(digest, tuple(p)) for digest, p in patterns.items()}


ALLOW_EMPTY = "# allow-empty"


def _allows_empty(path: Path) -> bool:
    try:
        return any(line.strip() == ALLOW_EMPTY for line in path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return False


class TokenTable:
    """The tokens file, loaded at start-up and re-read on demand (SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_digest = _parse(path)

    def __len__(self) -> int:
        return len(self._by_digest)

    def reload(self) -> bool:
        """Re-read the file; on error keep the current tokens and log why. Returns success.

        A file that now holds no token would lock every client out: it is refused like a broken
        one, unless it says so on purpose with a line `# allow-empty`."""
        try:
            fresh = _parse(self.path)
            if not fresh and self._by_digest and not _allows_empty(self.path):
                raise AuthConfigError(f"tokens file {self.path}: holds no tokens, which would lock every client out; "
                                      f"add a line `{ALLOW_EMPTY}` to mean it")
        except AuthConfigError as exc:
            log.error("tokens file not reloaded, keeping %d tokens: %s", len(self._by_digest), exc)
            return False
        self._by_digest = fresh
        log.info("tokens file %s reloaded: %d tokens", self.path, len(self._by_digest))
        return True

    def authenticate(self, authorization: bytes | None) -> Principal | None:
        """The principal for an `Authorization: Bearer <token>` header value, or None."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip()).hexdigest()
        found = self._by_digest.get(digest)
        # The lookup is keyed by a hash the client cannot steer; the final comparison is
        # constant-time anyway so no timing difference depends on the stored values.
        if found is None or not hmac.compare_digest(found.key, digest):
            return None
        return found


def add_token(path: Path, pattern: str) -> str:
    """Append a new random token's hash for `pattern` to `path` (created 0600); return the token."""
    if not pattern or any(c.isspace() for c in pattern):
        raise AuthConfigError("the node id pattern must be non-empty and contain no white space")
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{pattern} {hash_token(token)}\n".encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a hand-edited file without a final newline: keep lines apart
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return token
