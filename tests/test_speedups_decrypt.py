"""BatchDecryptor, both implementations, against `cryptography`'s Fernet and MultiFernet.

Every token, valid or tampered, must come out the way MultiFernet.decrypt says: the same
plaintext, or rejected (None) where it raises. Tampered tokens include ones re-signed with
the right key, so the checks after the MAC (version, padding, lengths) are reached too.
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from dataclasses import dataclass
from types import ModuleType

import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_sink.segment_format import FILE_HEADER_BYTES, Batch, iter_batches
from telemetry_sink.testing import compiled_speedups

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _fernet(key: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(key))


def _sign(key: bytes, raw: bytes) -> bytes:
    """raw + its HMAC under `key`'s signing half, base64url: a token whose MAC is right."""
    h = hmac.HMAC(key[:16], hashes.SHA256())
    h.update(raw)
    return base64.urlsafe_b64encode(raw + h.finalize())


def _craft(key: bytes, body: bytes, ts: int, iv: bytes, *, version: int = 0x80, pad: bool = True) -> bytes:
    """A token built by hand: `body` PKCS7-padded (or taken as is) and encrypted under `key`."""
    if pad:
        padder = padding.PKCS7(128).padder()
        body = padder.update(body) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key[16:]), modes.CBC(iv)).encryptor()
    ct = encryptor.update(body) + encryptor.finalize()
    return _sign(key, bytes([version]) + ts.to_bytes(8, "big") + iv + ct)


def _expected(keys: list[bytes], token: bytes, ttl: int | None, now: int) -> tuple[bytes | None, int]:
    """What MultiFernet says (plaintext or None), and the index of the first key that accepts it."""
    multi = MultiFernet([_fernet(k) for k in keys])
    try:
        plaintext: bytes | None = multi.decrypt(token) if ttl is None else multi.decrypt_at_time(token, ttl, now)
    except (InvalidToken, ValueError):  # ValueError: a MAC-valid token too short for an IV
        plaintext = None
    index = -1
    for i, key in enumerate(keys):
        try:
            f = _fernet(key)
            f.decrypt(token) if ttl is None else f.decrypt_at_time(token, ttl, now)
        except (InvalidToken, ValueError):
            continue
        index = i
        break
    return plaintext, index


@dataclass
class Case:
    keys: list[bytes]
    tokens: list[bytes]


def _tamper(rng: random.Random, token: bytes, keys: list[bytes]) -> bytes:
    """One of the ways a token goes wrong: on the wire, on disk, or forged with a key."""
    raw = base64.urlsafe_b64decode(token)
    how = rng.randrange(14)
    pos = rng.randrange(len(token))
    if how == 0:  # a flipped bit anywhere in the decoded token
        i = rng.randrange(len(raw))
        return base64.urlsafe_b64encode(raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :])
    if how == 1:  # one character replaced by any byte
        return token[:pos] + bytes([rng.randrange(256)]) + token[pos + 1 :]
    if how == 2:  # a stray byte inserted (base64 skips non-alphabet bytes, so some still decrypt)
        return token[:pos] + bytes([rng.choice(b"\n .=+/*\x00\xff" + ALPHABET)]) + token[pos:]
    if how == 3:  # a character deleted
        return token[:pos] + token[pos + 1 :]
    if how == 4:  # truncated
        return token[:pos]
    if how == 5:  # padding stripped or doubled
        return token.rstrip(b"=") if rng.random() < 0.5 else token + b"=="
    if how == 6:  # junk after the padding (ignored by the decoder) or before it
        junk = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))
        return token + junk if rng.random() < 0.5 else junk + token
    if how == 7:  # standard alphabet instead of URL-safe
        return token.replace(b"-", b"+").replace(b"_", b"/")
    key = rng.choice(keys)
    iv = rng.randbytes(16)
    ts = int.from_bytes(raw[1:9], "big")
    body = rng.randbytes(rng.randint(0, 40))
    if how == 8:  # right MAC, wrong version byte
        return _craft(key, body, ts, iv, version=rng.choice([0x00, 0x7F, 0x81, 0xFF]))
    if how == 9:  # right MAC, bad PKCS7 padding
        block = rng.randbytes(16 * rng.randint(1, 3))
        last = rng.choice([0, 17, 255, rng.randint(1, 16)])
        block = block[:-2] + bytes([rng.randrange(256), last])
        return _craft(key, block, ts, iv, pad=False)
    if how == 10:  # right MAC, ciphertext not a whole number of blocks (or empty)
        return _sign(key, raw[:9] + iv + rng.randbytes(rng.choice([0, 1, 15, 17, 31])))
    if how == 11:  # right MAC over something too short to hold an IV
        return _sign(key, raw[: rng.randint(0, 30)])
    if how == 12:  # right MAC, right padding: a forged but valid token (accepted by both)
        return _craft(key, body, ts, iv)
    return base64.urlsafe_b64encode(raw[: rng.randint(0, len(raw))])  # a truncated decoded token


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rng = random.Random(draw(st.integers(0, 2**32)))
    keys: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        # Sometimes the same signing key with another encryption key: its MAC passes, the
        # padding (almost always) fails and MultiFernet moves on to the next key.
        keys.append(keys[-1][:16] + rng.randbytes(16) if keys and rng.random() < 0.3 else rng.randbytes(32))
    foreign = rng.randbytes(32)
    tokens = []
    for _ in range(draw(st.integers(0, 60))):
        key = rng.choice([*keys, foreign])
        body = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 150, rng.randint(0, 600)]))
        token = _fernet(key).encrypt_at_time(body, rng.randint(0, 2**40))
        tokens.append(_tamper(rng, token, keys) if rng.random() < 0.6 else token)
    return Case(keys, tokens)


@settings(SETTINGS, max_examples=150)
@given(case=cases(), ttl=st.one_of(st.none(), st.integers(-100, 2**41)), now=st.integers(0, 2**41))
def test_matches_multifernet(speedups_impl: ModuleType, case: Case, ttl: int | None, now: int) -> None:
    decryptor = speedups_impl.BatchDecryptor(case.keys)
    expected = [_expected(case.keys, t, ttl, now) for t in case.tokens]
    plaintexts, indices = decryptor.decrypt_keyed(case.tokens, ttl, now)
    assert plaintexts == [e[0] for e in expected]
    assert indices == [e[1] for e in expected]
    assert decryptor.decrypt(case.tokens, ttl, now) == plaintexts


@settings(SETTINGS, max_examples=100)
@given(case=cases(), ttl=st.one_of(st.none(), st.integers(-100, 2**41)), now=st.integers(0, 2**41),
       lead=st.binary(max_size=7), cut=st.integers(0, 3))
def test_decrypt_span_is_decrypt_of_the_laid_out_tokens(speedups_impl: ModuleType, case: Case, ttl: int | None,
                                                        now: int, lead: bytes, cut: int) -> None:
    """decrypt_span reads the tokens where a batch body lays them out (a length, then the token) and
    answers what decrypt does for them, with the position after them; a layout cut short is refused."""
    decryptor = speedups_impl.BatchDecryptor(case.keys)
    layout = b"".join(len(t).to_bytes(4, "big") + t for t in case.tokens)
    image = lead + layout
    for view in (image, memoryview(image), bytearray(image)):
        assert decryptor.decrypt_span(view, len(lead), len(case.tokens), ttl, now) == (
            decryptor.decrypt(case.tokens, ttl, now), len(image))
    if case.tokens and cut:
        with pytest.raises(ValueError):
            decryptor.decrypt_span(image[:-cut], len(lead), len(case.tokens), ttl, now)
    with pytest.raises(ValueError):
        decryptor.decrypt_span(image, -1, 0)
    assert decryptor.decrypt_span(image, len(image), 0) == ([], len(image))


@settings(SETTINGS, max_examples=200)
@given(
    ts=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 61, 2**64 - 1])),
    ttl=st.one_of(st.integers(-(2**70), 2**70), st.integers(-70, 70)),
    now=st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 2**64 + 100)),
)
def test_ttl_window_matches_fernet(speedups_impl: ModuleType, ts: int, ttl: int, now: int) -> None:
    """The ttl test at the edges of the 64-bit timestamp and of Python's unbounded ints."""
    key = bytes(range(32))
    tokens = [_fernet(key).encrypt_at_time(b"x", ts)]
    for shift in (-61, -60, -1, 0, 1, 60, 61):  # tokens right at the window's edges
        if 0 <= now + shift < 2**64:
            tokens.append(_fernet(key).encrypt_at_time(b"y", now + shift))
        if 0 <= now - ttl + shift < 2**64:
            tokens.append(_fernet(key).encrypt_at_time(b"z", now - ttl + shift))
    got = speedups_impl.BatchDecryptor([key]).decrypt(tokens, ttl, now)
    assert got == [_expected([key], t, ttl, now)[0] for t in tokens]


def test_ttl_defaults_to_the_clock(speedups_impl: ModuleType) -> None:
    key = os.urandom(32)
    now = int(time.time())
    old, fresh = _fernet(key).encrypt_at_time(b"old", now - 3600), _fernet(key).encrypt_at_time(b"new", now)
    decryptor = speedups_impl.BatchDecryptor([key])
    assert decryptor.decrypt([old, fresh]) == [b"old", b"new"]
    assert decryptor.decrypt([old, fresh], 600) == [None, b"new"]


def _parse(batch: bytes) -> Batch:
    found = list(iter_batches(FILE_HEADER_BYTES + batch))
    assert len(found) == 1 and isinstance(found[0], Batch)
    return found[0]


def test_reverses_the_framer(speedups_impl: ModuleType) -> None:
    key = os.urandom(32)
    records = [b"", b"a", b"x" * 15, b"y" * 16, b"z" * 17, os.urandom(1 << 20), *(os.urandom(150) for _ in range(500))]
    batch = _parse(speedups_impl.BatchFramer(key[:16], key[16:]).frame(1, 1_700_000_000_000, records))
    assert speedups_impl.BatchDecryptor([os.urandom(32), key]).decrypt_keyed(batch.tokens) == (
        records,
        [1] * len(records),
    )


def test_empty_batch(speedups_impl: ModuleType) -> None:
    decryptor = speedups_impl.BatchDecryptor([os.urandom(32)])
    assert decryptor.decrypt([]) == []
    assert decryptor.decrypt_keyed(()) == ([], [])


@pytest.mark.parametrize("keys", [[], [b"k" * 16], [b"k" * 32, b"k" * 33]])
def test_bad_keys(speedups_impl: ModuleType, keys: list[bytes]) -> None:
    with pytest.raises(ValueError, match="key"):
        speedups_impl.BatchDecryptor(keys)


@pytest.mark.parametrize("bad", ["a-str-token", bytearray(b"token"), None, 5])
def test_non_bytes_tokens_raise_type_error(speedups_impl: ModuleType, bad: object) -> None:
    decryptor = speedups_impl.BatchDecryptor([os.urandom(32)])
    with pytest.raises(TypeError, match="index 1"):
        decryptor.decrypt([_fernet(os.urandom(32)).encrypt(b"x"), bad])


def test_ttl_must_be_an_integer(speedups_impl: ModuleType) -> None:
    """Fernet takes a float ttl, but compares it unrounded; refuse rather than round differently."""
    with pytest.raises(TypeError):
        speedups_impl.BatchDecryptor([os.urandom(32)]).decrypt([b"x"], 1.5)


def test_repr_hides_keys(speedups_impl: ModuleType) -> None:
    key = os.urandom(32)
    text = repr(speedups_impl.BatchDecryptor([key]))
    assert "keys=1" in text
    assert key.hex() not in text and base64.urlsafe_b64encode(key).decode() not in text


def test_shared_decryptor_misuse_is_safe(speedups_impl: ModuleType) -> None:
    """Two threads on ONE decryptor: the compiled one may refuse, but never returns a wrong plaintext."""
    key = os.urandom(32)
    tokens = [_fernet(key).encrypt(b"r%d" % i) for i in range(2000)]
    decryptor = speedups_impl.BatchDecryptor([key])
    outputs: list[list[bytes | None]] = []
    errors: list[RuntimeError] = []

    def work() -> None:
        for _ in range(10):
            try:
                outputs.append(decryptor.decrypt(tokens))
            except RuntimeError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) + len(errors) == 20
    assert all("two threads" in str(e) for e in errors)
    assert all(out == [b"r%d" % i for i in range(2000)] for out in outputs)


def test_compiled_decryptor_without_init_refuses() -> None:
    compiled = compiled_speedups()
    decryptor = compiled.BatchDecryptor.__new__(compiled.BatchDecryptor)
    with pytest.raises(RuntimeError, match="__init__"):
        decryptor.decrypt([b"x"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_compiled_decryptor_memory_is_flat() -> None:
    """~500k tokens (a quarter rejected) and 50k one-token calls must not grow RSS: no C leaks."""
    key = os.urandom(32)
    decryptor = compiled_speedups().BatchDecryptor([os.urandom(32), key])
    tokens = [_fernet(key).encrypt(os.urandom(150)) for _ in range(750)] + [b"bad" * 50] * 250
    one = tokens[:1]

    def run(calls: int, batch: list[bytes]) -> None:
        for _ in range(calls):
            decryptor.decrypt(batch)

    run(50, tokens)
    run(5_000, one)
    before = _rss_bytes()
    run(500, tokens)
    after_big = _rss_bytes()
    run(50_000, one)
    after_small = _rss_bytes()
    slack = 4 << 20
    assert after_big - before < slack, f"RSS grew {(after_big - before) >> 10} KiB over 500k tokens"
    assert after_small - after_big < slack, f"RSS grew {(after_small - after_big) >> 10} KiB over 50k calls"
