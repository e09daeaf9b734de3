"""CryptoService: Fernet keys from a key file or TELEMETRY_SINK_KEY, framers and decryption.

The first key encrypts; every key decrypts (MultiFernet), so keys can be rotated.
There is never a built-in default key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ._protocols import BatchDecryptorProtocol, BatchFramerProtocol, Buffer
from .speedups import BatchDecryptor, BatchFramer

log = logging.getLogger("telemetry_sink.crypto")

KEY_ENV = "TELEMETRY_SINK_KEY"

__all__ = ["KEY_ENV", "CryptoService", "InvalidToken", "KeyConfigError", "generate_key", "write_key_file"]


class KeyConfigError(ValueError):
    """No usable key: str() says what is wrong and how to fix it (never the key itself)."""


def generate_key() -> bytes:
    """A new random Fernet key (URL-safe base64 of 32 bytes from the OS CSPRNG)."""
    return Fernet.generate_key()


def write_key_file(path: Path) -> None:
    """Create `path` holding one new key, mode 0600; refuse to overwrite an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(generate_key() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _decode_key(text: str, where: str) -> bytes:
    try:
        # Strict: exactly 44 URL-safe base64 characters, nothing ignored after the padding.
        raw = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True) if len(text) == 44 else b""
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyConfigError(f"{where}: not a Fernet key (expected URL-safe base64 of 32 bytes)")
    return raw


class CryptoService:
    """Holds the keys; hands out batch framers for the first key and decrypts with all."""

    def __init__(self, keys: list[str], source: str) -> None:
        if not keys:
            raise KeyConfigError(f"{source}: holds no key")
        self.source = source
        self._raw = [_decode_key(k, f"{source}, key {i + 1}") for i, k in enumerate(keys)]
        self._primary = Fernet(keys[0].encode("ascii"))
        self._multi = MultiFernet([self._primary, *(Fernet(k.encode("ascii")) for k in keys[1:])])
        self.key_count = len(keys)
        self._local = threading.local()  # one decryptor per thread: it must not be shared

    @classmethod
    def from_key_file(cls, path: Path) -> CryptoService:
        """Load one key a line (blank lines and # comments skipped); warn if others can read it."""
        try:
            st = path.stat()
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise KeyConfigError(
                f"key file {path} does not exist: create one with `telemetry-sink keygen --out {path}` "
                f"or set {KEY_ENV}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyConfigError(f"key file {path}: cannot read it ({exc.__class__.__name__})") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s is accessible by group or others (mode %o); chmod 600 it", path,
                        stat.S_IMODE(st.st_mode))
        keys = [line.strip() for line in text.splitlines()]
        return cls([k for k in keys if k and not k.startswith("#")], f"key file {path}")

    @classmethod
    def from_config(cls, key_file: Path, environ: Mapping[str, str] | None = None) -> CryptoService:
        """TELEMETRY_SINK_KEY (comma-separated keys) if set, else the key file."""
        env = os.environ if environ is None else environ
        if env.get(KEY_ENV, "").strip():
            return cls([k.strip() for k in env[KEY_ENV].split(",") if k.strip()], KEY_ENV)
        return cls.from_key_file(key_file)

    def new_framer(self) -> BatchFramerProtocol:
        """A batch framer that encrypts under the first key (one per writer thread)."""
        first = self._raw[0]
        return BatchFramer(first[:16], first[16:])

    def new_decryptor(self) -> BatchDecryptorProtocol:
        """A batch decryptor that tries every key in order (one per thread)."""
        return BatchDecryptor(self._raw)

    def decrypt_batch(self, tokens: Sequence[bytes], ttl: int | None = None) -> list[bytes | None]:
        """Each token's plaintext, or None where no key authenticates it (or it is older than `ttl` s)."""
        return self._decryptor().decrypt(tokens, ttl)

    def decrypt_span(self, image: Buffer, pos: int, count: int) -> tuple[list[bytes | None], int]:
        """decrypt_batch of the `count` tokens laid out in a segment image from `pos` (no copies of
        them), and the position after them."""
        return self._decryptor().decrypt_span(image, pos, count)

    def decrypt_batch_keyed(self, tokens: Sequence[bytes]) -> tuple[list[bytes | None], list[int]]:
        """As decrypt_batch, plus the index of the key that authenticated each token (-1: none)."""
        return self._decryptor().decrypt_keyed(tokens)

    def _decryptor(self) -> BatchDecryptorProtocol:
        decryptor: BatchDecryptorProtocol | None = getattr(self._local, "decryptor", None)
        if decryptor is None:
            decryptor = self._local.decryptor = self.new_decryptor()
        return decryptor

    def decrypt(self, token: bytes) -> bytes:
        """Authenticate and decrypt a token with any configured key; raises InvalidToken."""
        return self._multi.decrypt(token)

    def encrypt(self, plaintext: bytes) -> bytes:
        """One Fernet token under the first key."""
        return self._multi.encrypt(plaintext)

    def uses_primary_key(self, token: bytes) -> bool:
        """Whether `token` authenticates under the first (encrypting) key."""
        try:
            self._primary.decrypt(token)
        except InvalidToken:
            return False
        return True

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt `token` under the first key, keeping its timestamp; raises InvalidToken."""
        return self._multi.rotate(token)

    def __repr__(self) -> str:  # never show key material
        return f"CryptoService(source={self.source!r}, keys={self.key_count})"
