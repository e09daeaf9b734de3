"""CRC-32 of any byte range of a buffer in bounded time, for the resynchronising segment reader.

Resynchronising past damage checks many candidate batches whose bodies overlap (a crafted file
can hold a fake header every 12 bytes, each claiming a body to the end of the file); hashing each
body from scratch is quadratic in the file size. Instead, with P(x) = crc32(buf[:x]):

    crc32(buf[a:b]) = P(b) xor shift(P(a), b - a)

where shift(c, n) multiplies c by x^(8n) modulo the CRC-32 polynomial: the arithmetic of zlib's
crc32_combine, which Python 3.11's zlib module does not expose (hence this module). P comes from
checkpoints every `stride` bytes, built once front to back, so a range costs at most two strides of
hashing plus a few table look-ups, and memory is 4 bytes per stride of file.
"""

from __future__ import annotations

import functools
import mmap
from array import array

try:
    # Every reader of segments checks each batch's CRC-32. zlib-ng's (a dependency; zlib's where it
    # has no wheel) folds with the CPU's carry-less multiply: 13x zlib's on a 300 KB batch, same values.
    from zlib_ng.zlib_ng import crc32 as crc32
except ImportError:
    from zlib import crc32 as crc32

_POLY = 0xEDB88320  # CRC-32 (zlib, IEEE 802.3), bit-reflected
_ONE = 1 << 31  # the polynomial 1 in zlib's reflected bit order
_DIGITS = 8  # lengths below 2**32 in base-16 digits; longer ones take the slow path
STRIDE = 1024


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's multmodp)."""
    product = 0
    m = _ONE
    while a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


@functools.cache
def _x2n() -> list[int]:
    """x^(2^k) modulo the polynomial for k < 32 (the order of x divides 2^32 - 1, so k repeats mod 32)."""
    table = [_ONE >> 1]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: shifting a CRC past n zero bytes multiplies it by this."""
    x2n = _x2n()
    power, k = _ONE, 3
    while n:
        if n & 1:
            power = _multmodp(x2n[k & 31], power)
        n >>= 1
        k += 1
    return power


@functools.cache
def _tables() -> list[list[array[int]]]:
    """For each base-16 digit position d and value t: four byte tables of c -> c * x^(8 t 16^d)."""
    out: list[list[array[int]]] = []
    for d in range(_DIGITS):
        for t in range(16):
            power = _x8n(t << (4 * d)) if t else 0
            byte_tables = []
            for j in range(4):
                table = array("I", bytes(4 * 256))
                for bit in range(8):
                    table[1 << bit] = _multmodp(power, 1 << (8 * j + bit)) if power else 0
                for b in range(3, 256):
                    low = b & -b
                    if b != low:  # linear over GF(2): combine the table's single-bit entries
                        table[b] = table[b ^ low] ^ table[low]
                byte_tables.append(table)
            out.append(byte_tables)
    return out


def shift(crc: int, n: int) -> int:
    """The CRC `crc` carried past n more bytes of zeros, less their own CRC: crc * x^(8n) mod p."""
    if n >> (4 * _DIGITS):
        return _multmodp(_x8n(n), crc)
    tables = _tables()
    d = 0
    while n:
        t = n & 15
        if t:
            t0, t1, t2, t3 = tables[d * 16 + t]
            crc = t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]
        n >>= 4
        d += 1
    return crc


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32(A + B) from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    return shift(crc_a, len_b) ^ crc_b


class RangeCrc:
    """crc32 of any range of `buf`, from prefix CRCs kept every `stride` bytes (built lazily)."""

    def __init__(self, buf: bytes | mmap.mmap, stride: int = STRIDE) -> None:
        self._buf = buf
        self._stride = stride
        self._checkpoints = array("I", [0])  # P(k * stride)
        self._last = (-1, 0)
        self.bytes_hashed = 0  # work done: lets tests check it stays linear in the file size

    def prefix(self, pos: int) -> int:
        """crc32(buf[:pos])."""
        if pos == self._last[0]:
            return self._last[1]  # resynchronising often checks many bodies that claim the same end
        stride, checkpoints = self._stride, self._checkpoints
        k = pos // stride
        with memoryview(self._buf) as view:
            while len(checkpoints) <= k:
                i = len(checkpoints) - 1
                checkpoints.append(crc32(view[i * stride : (i + 1) * stride], checkpoints[i]))
                self.bytes_hashed += stride
            self.bytes_hashed += pos - k * stride
            crc = crc32(view[k * stride : pos], checkpoints[k])
        self._last = (pos, crc)
        return crc

    def range(self, start: int, end: int) -> int:
        """crc32(buf[start:end])."""
        at_start = self.prefix(start)
        return self.prefix(end) ^ shift(at_start, end - start)  # end last: it stays in the one-entry cache
