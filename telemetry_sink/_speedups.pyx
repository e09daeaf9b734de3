# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, embedsignature=True
"""Compiled hot path: the token bucket, the batch framer (Fernet + TSB1) and the batch decryptor in C.

Behaviour matches the pure-Python twin `telemetry_sink._speedups_py`; see docs/speedups.md.
Needs OpenSSL >= 3.0 (libcrypto: RAND_bytes, EVP cipher and digest) and zlib (crc32).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.math cimport INFINITY, isinf, rint
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

cimport cython

import operator
import time

import orjson as _orjson

_dumps = _orjson.dumps

# Refuse to build against OpenSSL 1.x: EVP_*_fetch and EVP_EncryptInit_ex2 are 3.0 APIs, and
# a compile error here makes setup.py fall back to the twin with a clear warning.
cdef extern from *:
    """
    #include <openssl/opensslv.h>
    #if OPENSSL_VERSION_NUMBER < 0x30000000L
    #error "telemetry_sink._speedups needs OpenSSL 3.0 or newer"
    #endif
    """

cdef extern from "openssl/crypto.h" nogil:
    const char *OpenSSL_version(int t)
    int _OSSL_VERSION_TYPE "OPENSSL_VERSION"
    int CRYPTO_memcmp(const void *a, const void *b, size_t length)
    void OPENSSL_cleanse(void *ptr, size_t length)

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_get_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t length)
    void ERR_clear_error()

cdef extern from "openssl/rand.h" nogil:
    int RAND_bytes(unsigned char *buf, int num)

cdef extern from "openssl/params.h" nogil:
    ctypedef struct OSSL_PARAM:
        const char *key

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct OSSL_LIB_CTX
    ctypedef struct EVP_CIPHER
    ctypedef struct EVP_CIPHER_CTX
    EVP_CIPHER *EVP_CIPHER_fetch(OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties)
    void EVP_CIPHER_free(EVP_CIPHER *cipher)
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_EncryptInit_ex2(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, const unsigned char *key,
                            const unsigned char *iv, const OSSL_PARAM *params)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_DecryptInit_ex2(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, const unsigned char *key,
                            const unsigned char *iv, const OSSL_PARAM *params)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad)
    ctypedef struct EVP_MD
    ctypedef struct EVP_MD_CTX
    EVP_MD *EVP_MD_fetch(OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties)
    void EVP_MD_free(EVP_MD *md)
    EVP_MD_CTX *EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx)
    int EVP_MD_CTX_copy_ex(EVP_MD_CTX *out, const EVP_MD_CTX *inp)
    int EVP_DigestInit_ex2(EVP_MD_CTX *ctx, const EVP_MD *type, const OSSL_PARAM *params)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s)

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int length)


IMPLEMENTATION = "compiled"
OPENSSL_VERSION = OpenSSL_version(_OSSL_VERSION_TYPE).decode("ascii", "replace")


class OpenSSLError(RuntimeError):
    """An OpenSSL call failed; no output was produced."""


# --- TSB1 / Fernet layout constants (see telemetry_sink/segment_format.py and the Fernet spec) ---
cdef enum:
    BATCH_HEADER_SIZE = 12      # "TSB1", u32 body length, u32 crc32(body)
    BODY_HEADER_SIZE = 20       # u64 first_seq, u32 count, u64 created_ms
    KEY_SIZE = 16
    IV_SIZE = 16
    BLOCK = 16
    MAC_SIZE = 32
    TOKEN_PREFIX = 25           # version byte, u64 timestamp, IV

cdef extern from *:
    """
    #define TS_U32_MAX ((uint64_t)0xFFFFFFFFu)
    /* EVP_EncryptUpdate takes an int length; leave room for the padding block. */
    #define TS_MAX_RECORD ((size_t)(0x7FFFFFFF - 32))
    """
    const uint64_t U32_MAX "TS_U32_MAX"
    const uint64_t U64_MAX "UINT64_MAX"
    const size_t MAX_RECORD "TS_MAX_RECORD"

cdef const char *_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Steps of the nogil loop, so a failure names the OpenSSL call that failed.
cdef enum _Step:
    STEP_OK = 0
    STEP_RAND = 1
    STEP_CIPHER_INIT = 2
    STEP_CIPHER_UPDATE = 3
    STEP_MAC_INIT = 5
    STEP_MAC_UPDATE = 6
    STEP_MAC_FINAL = 7
    STEP_LENGTH = 8
    STEP_DECRYPT_INIT = 9
    STEP_DECRYPT_UPDATE = 10

_STEP_NAMES = {
    STEP_RAND: "RAND_bytes",
    STEP_CIPHER_INIT: "EVP_EncryptInit_ex2",
    STEP_CIPHER_UPDATE: "EVP_EncryptUpdate",
    STEP_MAC_INIT: "EVP_MD_CTX_copy_ex (HMAC-SHA256)",
    STEP_MAC_UPDATE: "EVP_DigestUpdate (HMAC-SHA256)",
    STEP_MAC_FINAL: "EVP_DigestFinal_ex (HMAC-SHA256)",
    STEP_LENGTH: "output length check",
    STEP_DECRYPT_INIT: "EVP_DecryptInit_ex2",
    STEP_DECRYPT_UPDATE: "EVP_DecryptUpdate",
}

ctypedef struct _Record:
    const unsigned char *data
    size_t length

ctypedef struct _Batch:
    size_t first        # index of its first record in the record table
    size_t count
    size_t body_size


cdef object _openssl_error(str what):
    """Build an OpenSSLError from the thread's OpenSSL error queue (and empty the queue)."""
    cdef char buf[256]
    cdef unsigned long code = ERR_get_error()
    detail = "no OpenSSL error queued"
    if code != 0:
        ERR_error_string_n(code, buf, sizeof(buf))
        detail = buf.decode("ascii", "replace")
    ERR_clear_error()
    return OpenSSLError(f"{what} failed: {detail}")


cdef inline void _put_u32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _put_u64(unsigned char *p, uint64_t v) noexcept nogil:
    _put_u32(p, <uint32_t>(v >> 32))
    _put_u32(p + 4, <uint32_t>v)


cdef inline size_t _ciphertext_size(size_t n) noexcept nogil:
    # PKCS7 always adds 1..16 bytes, so a whole-block plaintext gains a full block.
    return (n // BLOCK + 1) * BLOCK


cdef inline size_t _b64_size(size_t n) noexcept nogil:
    return (n + 2) // 3 * 4


# Every 12-bit value as its two URL-safe base64 characters: one lookup per two output bytes
# (a 3-byte group is two lookups instead of four).
cdef unsigned char _B64PAIR[4096][2]
for _i in range(4096):
    _B64PAIR[_i][0] = _B64URL[_i >> 6]
    _B64PAIR[_i][1] = _B64URL[_i & 63]


cdef size_t _b64url_encode(const unsigned char *src, size_t n, unsigned char *dst) noexcept nogil:
    """URL-safe base64 with `=` padding and no newlines (what base64.urlsafe_b64encode gives)."""
    cdef size_t i = 0
    cdef size_t o = 0
    cdef uint32_t v
    while i + 3 <= n:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8) | src[i + 2]
        memcpy(dst + o, _B64PAIR[v >> 12], 2)
        memcpy(dst + o + 2, _B64PAIR[v & 0xFFF], 2)
        i += 3
        o += 4
    if n - i == 1:
        v = <uint32_t>src[i] << 16
        dst[o] = _B64URL[(v >> 18) & 63]
        dst[o + 1] = _B64URL[(v >> 12) & 63]
        dst[o + 2] = b'='
        dst[o + 3] = b'='
        o += 4
    elif n - i == 2:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8)
        dst[o] = _B64URL[(v >> 18) & 63]
        dst[o + 1] = _B64URL[(v >> 12) & 63]
        dst[o + 2] = _B64URL[(v >> 6) & 63]
        dst[o + 3] = b'='
        o += 4
    return o


# HMAC-SHA256 (RFC 2104) on EVP digests: the SHA-256 states after the key's inner and outer pad
# blocks are computed once per key and copied for each MAC, as EVP_MAC's HMAC does internally, but
# without its per-call parameter plumbing (0.66 against 0.75 µs for a 185-byte token, measured).
cdef struct _Hmac:
    EVP_MD_CTX *inner
    EVP_MD_CTX *outer
    EVP_MD_CTX *work


cdef bint _pad_state(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *key, unsigned char pad_byte) noexcept nogil:
    """`ctx` = SHA-256 after the key's 64-byte pad block (key XOR `pad_byte`, zero-extended)."""
    cdef unsigned char pad[64]
    cdef int i
    cdef bint ok
    memset(pad, pad_byte, 64)
    for i in range(KEY_SIZE):
        pad[i] ^= key[i]
    ok = EVP_DigestInit_ex2(ctx, md, NULL) == 1 and EVP_DigestUpdate(ctx, pad, 64) == 1
    OPENSSL_cleanse(pad, 64)
    return ok


cdef int _hmac_init(_Hmac *h, const unsigned char *key) noexcept nogil:
    """Key `h` (zeroed, or freed) with a 16-byte signing key: 1, or 0 when OpenSSL fails (then
    _hmac_free it)."""
    cdef EVP_MD *md = EVP_MD_fetch(NULL, b"SHA256", NULL)
    cdef bint ok
    h.inner = EVP_MD_CTX_new()
    h.outer = EVP_MD_CTX_new()
    h.work = EVP_MD_CTX_new()
    ok = (md != NULL and h.inner != NULL and h.outer != NULL and h.work != NULL
          and _pad_state(h.inner, md, key, 0x36) and _pad_state(h.outer, md, key, 0x5C))
    EVP_MD_free(md)  # the contexts hold their own references
    return ok


cdef void _hmac_free(_Hmac *h) noexcept nogil:
    # EVP_MD_CTX_free cleanses the states (they are as good as the key); NULL is a no-op.
    EVP_MD_CTX_free(h.inner)
    EVP_MD_CTX_free(h.outer)
    EVP_MD_CTX_free(h.work)
    h.inner = h.outer = h.work = NULL


cdef int _digest_from(EVP_MD_CTX *work, const EVP_MD_CTX *state, const unsigned char *data, size_t n,
                      unsigned char *out) noexcept nogil:
    """SHA-256 continued from `state` over `data`, into `out` (32 bytes); STEP_OK or the failing step."""
    cdef unsigned int length = 0
    if EVP_MD_CTX_copy_ex(work, state) != 1:
        return STEP_MAC_INIT
    if EVP_DigestUpdate(work, data, n) != 1:
        return STEP_MAC_UPDATE
    if EVP_DigestFinal_ex(work, out, &length) != 1 or length != MAC_SIZE:
        return STEP_MAC_FINAL
    return STEP_OK


cdef int _hmac(_Hmac *h, const unsigned char *data, size_t n, unsigned char *tag) noexcept nogil:
    """The 32-byte HMAC-SHA256 of `data` into `tag`; STEP_OK or the step that failed."""
    cdef unsigned char inner[MAC_SIZE]
    cdef int step = _digest_from(h.work, h.inner, data, n, inner)
    if step != STEP_OK:
        return step
    return _digest_from(h.work, h.outer, inner, MAC_SIZE, tag)


cdef int _frame_into(EVP_CIPHER_CTX *cctx, _Hmac *mac, uint64_t seq, uint64_t created_ms,
                     const _Record *recs, size_t n, unsigned char *ivs, unsigned char *scratch,
                     unsigned char *plain, unsigned char *out, size_t body_size) noexcept nogil:
    """Fill `out` (BATCH_HEADER_SIZE + body_size bytes); return STEP_OK or the failing step.
    `scratch` takes one raw token at a time, `plain` one padded plaintext (the caller wipes it)."""
    cdef size_t i
    cdef size_t k
    cdef size_t ct_size
    cdef size_t raw_size
    cdef size_t pad
    cdef int step
    cdef int out1 = 0
    cdef unsigned char *pos = out + BATCH_HEADER_SIZE + BODY_HEADER_SIZE
    cdef unsigned char *end = out + BATCH_HEADER_SIZE + body_size
    cdef const unsigned char *iv
    cdef unsigned char chain[IV_SIZE]

    # All IVs for the batch in one call: fresh CSPRNG output, one IV per token. Fits an int:
    # a token takes >= 104 body bytes and the body is < 2**32, so n * 16 < 2**30.
    if n > 0 and RAND_bytes(ivs, <int>(n * IV_SIZE)) != 1:
        return STEP_RAND

    # The batch's tokens are one CBC stream, so the cipher is set up once per batch, not per
    # token (OpenSSL 3's parameter handling in that set-up was >= 6 % of framing under perf):
    # CBC feeds each block the previous ciphertext block (`chain`), so a token's first plaintext
    # block XOR its IV XOR `chain` enciphers to exactly what CBC under that IV gives. Padding
    # (PKCS7) is added here.
    memset(chain, 0, IV_SIZE)
    if EVP_EncryptInit_ex2(cctx, NULL, NULL, chain, NULL) != 1:
        return STEP_CIPHER_INIT
    scratch[0] = 0x80  # Fernet version
    _put_u64(scratch + 1, created_ms // 1000)
    for i in range(n):
        iv = ivs + i * IV_SIZE
        ct_size = _ciphertext_size(recs[i].length)
        raw_size = TOKEN_PREFIX + ct_size + MAC_SIZE
        pad = ct_size - recs[i].length
        memcpy(plain, recs[i].data, recs[i].length)
        memset(plain + recs[i].length, <int>pad, pad)
        for k in range(<size_t>IV_SIZE):
            plain[k] ^= iv[k] ^ chain[k]
        memcpy(scratch + 9, iv, IV_SIZE)
        if EVP_EncryptUpdate(cctx, scratch + TOKEN_PREFIX, &out1, plain, <int>ct_size) != 1:
            return STEP_CIPHER_UPDATE
        if <size_t>out1 != ct_size:
            return STEP_LENGTH
        memcpy(chain, scratch + TOKEN_PREFIX + ct_size - BLOCK, BLOCK)
        step = _hmac(mac, scratch, TOKEN_PREFIX + ct_size, scratch + TOKEN_PREFIX + ct_size)
        if step != STEP_OK:
            return step
        # Sizes were computed from the same immutable records in pass 1; re-check anyway
        # so a bug there can never write past the end of the result.
        if pos + 4 + _b64_size(raw_size) > end:
            return STEP_LENGTH
        _put_u32(pos, <uint32_t>_b64_size(raw_size))
        pos += 4
        pos += _b64url_encode(scratch, raw_size, pos)
    if pos != end:
        return STEP_LENGTH

    _put_u64(out + BATCH_HEADER_SIZE, seq)
    _put_u32(out + BATCH_HEADER_SIZE + 8, <uint32_t>n)
    _put_u64(out + BATCH_HEADER_SIZE + 12, created_ms)
    memcpy(out, b"TSB1", 4)
    _put_u32(out + 4, <uint32_t>body_size)
    # body_size <= U32_MAX was checked, so it fits zlib's unsigned int length.
    _put_u32(out + 8, <uint32_t>crc32(0, out + BATCH_HEADER_SIZE, <unsigned int>body_size))
    return STEP_OK


@cython.final
cdef class TokenBucket:
    """Token bucket: `rate` tokens a second refill up to `capacity`; time is passed in.

    Same float arithmetic, in the same order, as the twin, so results are bit-identical.
    Not locked: callers serialise access (the GIL does, as no method releases it).
    """

    cdef public double rate
    cdef public double capacity
    cdef public double tokens
    cdef public double updated

    def __init__(self, double rate, double capacity, double now):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    cdef inline void _refill(self, double now) noexcept:
        cdef double tokens
        if now > self.updated:
            tokens = self.tokens + (now - self.updated) * self.rate
            # Python's min(capacity, tokens): tokens only when strictly smaller.
            self.tokens = tokens if tokens < self.capacity else self.capacity
            self.updated = now

    def refill(self, double now) -> None:
        """Add the tokens earned since the last call (time never runs backwards here)."""
        self._refill(now)

    def try_acquire(self, double n, double now) -> bool:
        """Take `n` tokens if they are there now; return whether it did."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    cdef inline double _time_until_available(self, double n, double now):
        self._refill(now)
        if n > self.capacity:
            return INFINITY
        if self.tokens >= n:
            return 0.0
        return (n - self.tokens) / self.rate

    def time_until_available(self, double n, double now) -> float:
        """Seconds until `n` tokens will be there (0.0 if now; inf if n > capacity)."""
        return self._time_until_available(n, now)

    def reserve(self, double n, double now, double max_wait) -> float:
        """Take `n` tokens, going into debt, if they are there within `max_wait` seconds.

        Returns the wait (>= 0) the caller must sleep before proceeding, or -1.0 (and
        takes nothing) when the wait would exceed `max_wait`. Debt queues callers FIFO.
        """
        cdef double wait = self._time_until_available(n, now)
        if wait > max_wait:
            return -1.0
        self.tokens -= n
        return wait

    def __repr__(self) -> str:
        return (f"TokenBucket(rate={self.rate!r}, capacity={self.capacity!r}, "
                f"tokens={self.tokens!r}, updated={self.updated!r})")


@cython.final
@cython.auto_pickle(False)  # never serialise the keys
cdef class BatchFramer:
    """Encrypts records as standard Fernet tokens and frames them as one TSB1 batch.

    The cipher and MAC contexts are reused across records and calls, and `frame()` runs
    its loop without the GIL, so an instance must be used by one thread at a time (give
    each worker thread its own framer). Overlapping calls on one instance are detected
    and raise RuntimeError rather than corrupting the shared contexts.
    """

    cdef EVP_CIPHER_CTX *_cipher_ctx
    cdef _Hmac _mac
    cdef bint _ready
    cdef bint _busy

    def __cinit__(self):
        self._cipher_ctx = NULL
        memset(&self._mac, 0, sizeof(_Hmac))
        self._ready = False
        self._busy = False

    def __init__(self, signing_key, encryption_key):
        if len(signing_key) != KEY_SIZE or len(encryption_key) != KEY_SIZE:
            raise ValueError("signing and encryption keys must be 16 bytes each")
        cdef const unsigned char[::1] sk = signing_key
        cdef const unsigned char[::1] ek = encryption_key
        if self._busy:
            raise RuntimeError("BatchFramer re-initialised while frame() is running")
        self._ready = False
        self._free_contexts()
        self._init_contexts(&sk[0], &ek[0])
        self._ready = True

    cdef void _free_contexts(self) noexcept:
        if self._cipher_ctx != NULL:
            EVP_CIPHER_CTX_free(self._cipher_ctx)
            self._cipher_ctx = NULL
        _hmac_free(&self._mac)

    cdef int _init_contexts(self, const unsigned char *signing_key, const unsigned char *encryption_key) except -1:
        cdef EVP_CIPHER *cipher = NULL
        try:
            # Explicit fetches: the implicit ones inside EVP_aes_128_cbc()/HMAC() cost a
            # provider lookup per call, which dominated small records when measured.
            cipher = EVP_CIPHER_fetch(NULL, b"AES-128-CBC", NULL)
            if cipher == NULL:
                raise _openssl_error("EVP_CIPHER_fetch(AES-128-CBC)")
            self._cipher_ctx = EVP_CIPHER_CTX_new()
            if self._cipher_ctx == NULL:
                raise _openssl_error("EVP_CIPHER_CTX_new")
            # Key schedule once; each batch only re-initialises the IV (_frame_into).
            if EVP_EncryptInit_ex2(self._cipher_ctx, cipher, encryption_key, NULL, NULL) != 1:
                raise _openssl_error("EVP_EncryptInit_ex2")
            # _frame_into pads each token itself (one CBC stream per batch).
            if EVP_CIPHER_CTX_set_padding(self._cipher_ctx, 0) != 1:
                raise _openssl_error("EVP_CIPHER_CTX_set_padding")
            # Pads hashed once; each record copies the two states (see _Hmac).
            if not _hmac_init(&self._mac, signing_key):
                raise _openssl_error("HMAC-SHA256 key setup")
        except BaseException:
            self._free_contexts()
            raise
        finally:
            # The context holds its own reference to the algorithm object.
            EVP_CIPHER_free(cipher)
        return 0

    def __dealloc__(self):
        # EVP_*_CTX_free cleanse the key schedule and HMAC pads; no key copy is kept here.
        self._free_contexts()

    def __repr__(self) -> str:
        return "<telemetry_sink._speedups.BatchFramer>"  # never show key material

    def frame(self, first_seq, created_ms, records) -> bytes:
        """Return one complete batch; each token carries created_ms // 1000 as its time.

        `records` must be bytes objects (TypeError otherwise). Builds the exact-size output
        once and encrypts, MACs and encodes every record with the GIL released.
        """
        # A private tuple keeps every record alive (and the pointers valid) while the GIL
        # is released, even if the caller's list is mutated by another thread meanwhile.
        return self._frame_guarded(first_seq, created_ms, (tuple(records),))

    def frame_many(self, first_seq, created_ms, batches) -> bytes:
        """`frame()` of each batch in turn (sequence numbers running on from `first_seq`), as one
        bytes: the batches' frames back to back. One GIL release for them all, so a writer thread
        waits for the GIL once per hand-off rather than once per batch."""
        return self._frame_guarded(first_seq, created_ms, tuple([tuple(records) for records in batches]))

    cdef bytes _frame_guarded(self, first_seq, created_ms, tuple batches):
        cdef uint64_t seq = first_seq
        cdef uint64_t cms = created_ms
        if not self._ready:
            raise RuntimeError("BatchFramer.__init__ was not called")
        # Check-and-set with no Python code in between, so no other thread can slip in.
        if self._busy:
            raise RuntimeError("BatchFramer.frame() called from two threads at once; "
                               "use one framer per thread")
        self._busy = True
        try:
            return self._frame(seq, cms, batches)
        finally:
            self._busy = False

    cdef bytes _frame(self, uint64_t seq, uint64_t cms, tuple batches):
        cdef Py_ssize_t nb = PyTuple_GET_SIZE(batches)
        cdef Py_ssize_t b
        cdef Py_ssize_t i
        cdef Py_ssize_t n
        cdef Py_ssize_t total = 0
        cdef tuple recs
        cdef object item
        cdef size_t length
        cdef size_t raw_size
        cdef size_t max_raw = 0
        cdef uint64_t body_size
        cdef uint64_t out_size = 0
        cdef uint64_t first
        cdef unsigned char *work = NULL
        cdef _Record *rec_array
        cdef _Batch *batch_array
        cdef unsigned char *ivs
        cdef unsigned char *scratch
        cdef unsigned char *plain = NULL
        cdef unsigned char *out
        cdef int step = STEP_OK
        cdef bytes result

        batch_array = <_Batch *>malloc(<size_t>nb * sizeof(_Batch) + 1)
        if batch_array == NULL:
            raise MemoryError()
        try:
            # Pass 1 (GIL held): type-check the records and size each batch's output exactly.
            for b in range(nb):
                recs = <tuple>PyTuple_GET_ITEM(batches, b)
                n = PyTuple_GET_SIZE(recs)
                if <uint64_t>n > U32_MAX:
                    raise OverflowError("a batch holds at most 2**32 - 1 records")
                if <uint64_t>total > U64_MAX - seq:  # this batch's first sequence number would wrap
                    raise OverflowError("sequence numbers would run past 2**64 - 1")
                body_size = BODY_HEADER_SIZE
                for i in range(n):
                    item = <object>PyTuple_GET_ITEM(recs, i)
                    if not PyBytes_Check(item):
                        raise TypeError(f"records must be bytes, got {type(item).__name__} at index {i}")
                    length = <size_t>PyBytes_GET_SIZE(item)
                    if length > MAX_RECORD:
                        raise OverflowError(f"record {i} is {length} bytes, too large for one token")
                    raw_size = TOKEN_PREFIX + _ciphertext_size(length) + MAC_SIZE
                    if raw_size > max_raw:
                        max_raw = raw_size
                    body_size += 4 + _b64_size(raw_size)
                    if body_size > U32_MAX:
                        raise OverflowError("batch body would exceed 2**32 - 1 bytes")
                out_size += BATCH_HEADER_SIZE + body_size
                if out_size > <uint64_t>PY_SSIZE_T_MAX:
                    raise OverflowError("the batches would exceed the largest bytes object")
                batch_array[b].first = <size_t>total
                batch_array[b].count = <size_t>n
                batch_array[b].body_size = <size_t>body_size
                total += n

            # One scratch block: the record table, the IVs, one raw token and one padded
            # plaintext (max_raw is more than the longest); the plaintext is wiped before free.
            work = <unsigned char *>malloc(<size_t>total * (sizeof(_Record) + IV_SIZE) + 2 * max_raw + 1)
            if work == NULL:
                raise MemoryError()
            rec_array = <_Record *>work
            ivs = work + <size_t>total * sizeof(_Record)
            scratch = ivs + <size_t>total * IV_SIZE
            plain = scratch + max_raw
            for b in range(nb):
                recs = <tuple>PyTuple_GET_ITEM(batches, b)
                first = batch_array[b].first
                for i in range(PyTuple_GET_SIZE(recs)):
                    item = <object>PyTuple_GET_ITEM(recs, i)
                    rec_array[first + i].data = <const unsigned char *>PyBytes_AS_STRING(item)
                    rec_array[first + i].length = <size_t>PyBytes_GET_SIZE(item)

            result = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>out_size)
            out = <unsigned char *>PyBytes_AS_STRING(result)
            with nogil:
                for b in range(nb):
                    first = batch_array[b].first
                    step = _frame_into(self._cipher_ctx, &self._mac, seq, cms, rec_array + first,
                                       batch_array[b].count, ivs + first * IV_SIZE, scratch, plain, out,
                                       batch_array[b].body_size)
                    if step != STEP_OK:
                        break
                    seq += batch_array[b].count
                    out += BATCH_HEADER_SIZE + batch_array[b].body_size
            if step != STEP_OK:
                if step == STEP_LENGTH:
                    raise RuntimeError("internal error: output size mismatch in BatchFramer.frame")
                raise _openssl_error(_STEP_NAMES[step])
            return result
        finally:
            if plain != NULL:
                OPENSSL_cleanse(plain, max_raw)
            free(work)
            free(batch_array)


# --- Decryption: the framer's reverse ---

cdef enum:
    B64_SKIP = 255              # not in the alphabet: ignored, as binascii does when not strict
    B64_PAD = 254
    MIN_RAW_TOKEN = TOKEN_PREFIX + MAC_SIZE   # 57: shorter tokens cannot hold an IV and a MAC
    REJECTED = -1

# Python's base64.urlsafe_b64decode maps "-" and "_" to "+" and "/" and then decodes
# leniently, so "+" and "/" are accepted as well; this table does both in one lookup.
cdef unsigned char _B64DEC[256]
for _i in range(256):
    _B64DEC[_i] = B64_SKIP
for _i in range(64):
    _B64DEC[<unsigned char>_B64URL[_i]] = _i
_B64DEC[<unsigned char>b"+"[0]] = 62
_B64DEC[<unsigned char>b"/"[0]] = 63
_B64DEC[<unsigned char>b"="[0]] = B64_PAD

# The same table four times, each value already shifted to its place in a quad's 24 bits, and
# anything that is not a plain alphabet character (pad, skipped) as a bit above them: OR-ing
# four lookups gives a quad's three bytes, or a value >= 2**24 that sends it to the exact rules.
cdef uint32_t _B64Q[4][256]
for _i in range(256):
    for _k in range(4):
        _B64Q[_k][_i] = (<uint32_t>_B64DEC[_i] << (18 - 6 * _k)) if _B64DEC[_i] < 64 else (1 << 24)


cdef extern from *:
    """
    #include <string.h>
    /* Six decoded bytes (a pair of quads, 48 bits) stored big-endian with one 8-byte store; the two
       bytes past them are overwritten by the next store or lie in the caller's 3 bytes of slack. */
    static inline void ts_put48(unsigned char *dst, uint64_t v) {
        v = __builtin_bswap64(v << 16);
        memcpy(dst, &v, 8);
    }
    """
    void _put48 "ts_put48"(unsigned char *dst, uint64_t v) noexcept nogil


cdef bint _b64_decode(const unsigned char *src, size_t n, unsigned char *dst, size_t *outlen) noexcept nogil:
    """Decode like CPython 3.11's binascii.a2b_base64(strict_mode=False); False where it raises.

    Same rules, step for step: characters outside the alphabet are skipped, a pad sequence
    that completes a quad ends the input (the rest is ignored), leftover bits are dropped,
    and a final partial quad without its padding is an error.
    """
    cdef size_t i = 0
    cdef size_t o = 0
    cdef int quad_pos = 0
    cdef int pads = 0
    cdef unsigned char v
    cdef unsigned char a, b, c, d
    cdef unsigned char left = 0
    cdef uint32_t q0, q1
    while i < n:
        # Fast path: eight alphabet characters at a quad boundary are two plain quads, so the
        # rules below reduce to this (pads is reset by any alphabet character). The 8-byte store
        # writes 2 bytes past the 6 decoded: `dst` needs room for n // 4 * 3 + 2 bytes.
        if quad_pos == 0 and i + 8 <= n:
            q0 = _B64Q[0][src[i]] | _B64Q[1][src[i + 1]] | _B64Q[2][src[i + 2]] | _B64Q[3][src[i + 3]]
            q1 = _B64Q[0][src[i + 4]] | _B64Q[1][src[i + 5]] | _B64Q[2][src[i + 6]] | _B64Q[3][src[i + 7]]
            if (q0 | q1) < (1 << 24):
                _put48(dst + o, (<uint64_t>q0 << 24) | q1)
                o += 6
                i += 8
                pads = 0
                continue
        if quad_pos == 0 and i + 4 <= n:
            a = _B64DEC[src[i]]
            b = _B64DEC[src[i + 1]]
            c = _B64DEC[src[i + 2]]
            d = _B64DEC[src[i + 3]]
            if (a | b | c | d) < 64:
                dst[o] = <unsigned char>((a << 2) | (b >> 4))
                dst[o + 1] = <unsigned char>((b << 4) | (c >> 2))
                dst[o + 2] = <unsigned char>((c << 6) | d)
                o += 3
                i += 4
                pads = 0
                continue
        v = _B64DEC[src[i]]
        i += 1
        if v == B64_PAD:
            if quad_pos >= 2:
                pads += 1
                if quad_pos + pads >= 4:
                    outlen[0] = o
                    return True
            continue
        if v == B64_SKIP:
            continue
        pads = 0
        if quad_pos == 0:
            quad_pos = 1
            left = v
        elif quad_pos == 1:
            quad_pos = 2
            dst[o] = <unsigned char>((left << 2) | (v >> 4))
            o += 1
            left = v & 0x0F
        elif quad_pos == 2:
            quad_pos = 3
            dst[o] = <unsigned char>((left << 4) | (v >> 2))
            o += 1
            left = v & 0x03
        else:
            quad_pos = 0
            dst[o] = <unsigned char>((left << 6) | v)
            o += 1
    outlen[0] = o
    return quad_pos == 0


ctypedef struct _Token:
    const unsigned char *data
    size_t length
    size_t out_offset
    size_t out_length
    int key                     # index of the key that authenticated it, or REJECTED


ctypedef struct _TimeWindow:
    bint check                  # a ttl was given
    bint empty                  # no timestamp can pass (the window lies outside 0..2**64-1)
    uint64_t low                # accept only low <= timestamp <= high
    uint64_t high


cdef inline Py_ssize_t _get_u32(const unsigned char *p) noexcept nogil:
    """A big-endian u32: a token's length in a batch body."""
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | p[3]


cdef inline uint64_t _get_u64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef int _mac_verifies(_Hmac *mac, const unsigned char *raw, size_t raw_len) noexcept nogil:
    """1 when a decoded token's HMAC-SHA256 verifies under `mac` (constant-time compare), 0 when it
    does not, -step when an OpenSSL call fails."""
    cdef unsigned char tag[MAC_SIZE]
    cdef int step = _hmac(mac, raw, raw_len - MAC_SIZE, tag)
    if step != STEP_OK:
        return -step
    return CRYPTO_memcmp(tag, raw + raw_len - MAC_SIZE, MAC_SIZE) == 0


cdef inline size_t _pkcs7_pad(const unsigned char *plain, size_t ct_len) noexcept nogil:
    """The PKCS7 pad length (1..16) of a decrypted ciphertext, 0 where the padding is bad."""
    cdef unsigned char pad = plain[ct_len - 1]
    cdef unsigned char bad = 0
    cdef size_t j
    if pad == 0 or pad > BLOCK:
        return 0
    for j in range(ct_len - pad, ct_len):
        bad |= plain[j] ^ pad
    return 0 if bad else pad


cdef int _decrypt_one(_Hmac *macs, EVP_CIPHER_CTX **ciphers, int first, int nkeys,
                      const unsigned char *raw, size_t raw_len, unsigned char *plain, _Token *tok) noexcept nogil:
    """Keys `first`.. in turn on one decoded token: the first whose HMAC, AES-128-CBC and padding
    all pass sets the token's key and plaintext length. Returns STEP_OK or the step that failed."""
    cdef size_t ct_len = raw_len - MIN_RAW_TOKEN
    cdef size_t pad
    cdef int outl = 0
    cdef int k
    cdef int verified
    for k in range(first, nkeys):
        verified = _mac_verifies(&macs[k], raw, raw_len)
        if verified < 0:
            return -verified
        if not verified:
            continue
        if EVP_DecryptInit_ex2(ciphers[k], NULL, NULL, raw + 9, NULL) != 1:
            return STEP_DECRYPT_INIT
        if EVP_DecryptUpdate(ciphers[k], plain, &outl, raw + TOKEN_PREFIX, <int>ct_len) != 1:
            return STEP_DECRYPT_UPDATE
        if <size_t>outl != ct_len:
            return STEP_LENGTH
        pad = _pkcs7_pad(plain, ct_len)
        if pad:
            tok.key = k
            tok.out_length = ct_len - pad
            return STEP_OK
    return STEP_OK


cdef int _decrypt_into(_Hmac *macs, EVP_CIPHER_CTX **ciphers, int nkeys, _TimeWindow window,
                       _Token *toks, size_t n, unsigned char *raw, unsigned char *work) noexcept nogil:
    """Authenticate and decrypt every token; set each one's key and plaintext place in `work`.

    Per token, in Fernet.decrypt's order: base64, version byte, the ttl window, then for each
    key in turn the HMAC (constant-time compare), AES-128-CBC and the PKCS7 padding; the first
    key that passes all three wins (MultiFernet). Returns STEP_OK or the OpenSSL step that failed.

    Tokens are decoded into `work` so that each authenticated token's IV starts where the one
    before it ends (its 9-byte header lies over the end of that token's MAC, already checked):
    every IV and ciphertext then sits on a block boundary, and one CBC decryption per run of
    tokens under the same key decrypts them all, in place, since each token's IV is the block
    just before its ciphertext (the IV and MAC blocks decrypt to garbage that is never read).
    One call per run instead of one per token: 0.03 against 0.29 µs per 150-byte record.
    `raw` (one token's size) is scratch for the rare token whose padding fails under the key
    that authenticated it, which is tried again with the keys after that one.
    """
    cdef size_t i
    cdef size_t j
    cdef size_t t
    cdef size_t raw_len = 0
    cdef size_t ct_len
    cdef size_t at = 2 * BLOCK  # where the next token's IV goes (room before it for the header)
    cdef size_t start
    cdef size_t stop
    cdef size_t pad
    cdef int k
    cdef int outl = 0
    cdef int verified
    cdef uint64_t ts
    cdef unsigned char *token
    for i in range(n):
        toks[i].key = REJECTED
        toks[i].out_offset = 0
        toks[i].out_length = 0
        token = work + at - 9
        if not _b64_decode(toks[i].data, toks[i].length, token, &raw_len):
            continue
        if raw_len < 9 or token[0] != 0x80:
            continue
        if window.check:
            ts = _get_u64(token + 1)
            if window.empty or ts < window.low or ts > window.high:
                continue
        # Fernet rejects these too: under 32 bytes the MAC cannot match; under 57 a MAC that
        # matched would leave no room for the IV (cryptography raises ValueError there).
        if raw_len < MIN_RAW_TOKEN:
            continue
        ct_len = raw_len - MIN_RAW_TOKEN
        # An empty or partial-block ciphertext fails for every key (bad length, then bad padding).
        if ct_len == 0 or ct_len % BLOCK != 0 or ct_len > <size_t>MAX_RECORD:
            continue
        for k in range(nkeys):
            verified = _mac_verifies(&macs[k], token, raw_len)
            if verified < 0:
                return -verified
            if verified:
                toks[i].key = k
                toks[i].out_offset = at + BLOCK
                toks[i].out_length = ct_len  # until the padding is checked
                at += BLOCK + ct_len + MAC_SIZE
                break
    i = 0
    while i < n:
        k = toks[i].key
        if k == REJECTED:
            i += 1
            continue
        # A run: tokens under key k (rejected ones between take no room), at most ~1 GiB at once
        # (EVP_DecryptUpdate takes an int length).
        start = toks[i].out_offset - BLOCK
        stop = toks[i].out_offset + toks[i].out_length
        j = i + 1
        while j < n and (toks[j].key == REJECTED or toks[j].key == k):
            if toks[j].key == k:
                if toks[j].out_offset + toks[j].out_length - start > (1 << 30):
                    break
                stop = toks[j].out_offset + toks[j].out_length
            j += 1
        if EVP_DecryptInit_ex2(ciphers[k], NULL, NULL, work + start, NULL) != 1:
            return STEP_DECRYPT_INIT
        if EVP_DecryptUpdate(ciphers[k], work + start, &outl, work + start, <int>(stop - start)) != 1:
            return STEP_DECRYPT_UPDATE
        if <size_t>outl != stop - start:
            return STEP_LENGTH
        for t in range(i, j):
            if toks[t].key == REJECTED:
                continue
            ct_len = toks[t].out_length
            pad = _pkcs7_pad(work + toks[t].out_offset, ct_len)
            if pad:
                toks[t].out_length = ct_len - pad
                continue
            # Bad padding under the key that authenticated it: MultiFernet goes on to the next keys.
            toks[t].key = REJECTED
            toks[t].out_length = 0
            if k + 1 < nkeys:
                _b64_decode(toks[t].data, toks[t].length, raw, &raw_len)
                verified = _decrypt_one(macs, ciphers, k + 1, nkeys, raw, raw_len, work + toks[t].out_offset,
                                        &toks[t])
                if verified != STEP_OK:
                    return verified
        i = j
    return STEP_OK


cdef _TimeWindow _time_window(object ttl, object now):
    """Fernet's ttl test `ts + ttl >= now and ts <= now + 60`, as bounds on the u64 timestamp."""
    cdef _TimeWindow w
    w.check = ttl is not None
    w.empty = False
    w.low = 0
    w.high = 0
    if not w.check:
        return w
    # operator.index: an int or nothing (a float ttl would round differently from Fernet's).
    current = int(time.time()) if now is None else operator.index(now)
    low = current - operator.index(ttl)
    high = current + 60  # cryptography's _MAX_CLOCK_SKEW
    if high < 0 or low > 0xFFFFFFFFFFFFFFFF or low > high:
        w.empty = True
        return w
    w.low = low if low > 0 else 0
    w.high = high if high < 0xFFFFFFFFFFFFFFFF else 0xFFFFFFFFFFFFFFFF
    return w


@cython.final
@cython.auto_pickle(False)  # never serialise the keys
cdef class BatchDecryptor:
    """Authenticates and decrypts Fernet tokens a batch at a time, trying every key in order.

    `keys` are raw 32-byte Fernet keys (signing key, then encryption key: what
    `base64.urlsafe_b64decode(fernet_key)` gives). `decrypt()` accepts and rejects exactly
    the tokens `MultiFernet.decrypt` does. Like BatchFramer: one thread at a time.
    """

    cdef _Hmac *_macs
    cdef EVP_CIPHER_CTX **_ciphers
    cdef int _nkeys
    cdef bint _busy

    def __cinit__(self):
        self._macs = NULL
        self._ciphers = NULL
        self._nkeys = 0
        self._busy = False

    def __init__(self, keys):
        cdef list key_list = list(keys)
        cdef const unsigned char[::1] view
        cdef int i
        if not key_list:
            raise ValueError("BatchDecryptor needs at least one key")
        for key in key_list:
            if len(key) != 2 * KEY_SIZE:
                raise ValueError("each key must be 32 raw bytes (signing key, then encryption key)")
        if self._busy:
            raise RuntimeError("BatchDecryptor re-initialised while decrypt() is running")
        self._free_contexts()
        self._macs = <_Hmac *>calloc(len(key_list), sizeof(_Hmac))
        self._ciphers = <EVP_CIPHER_CTX **>calloc(len(key_list), sizeof(EVP_CIPHER_CTX *))
        if self._macs == NULL or self._ciphers == NULL:
            self._free_contexts()
            raise MemoryError()
        self._nkeys = len(key_list)
        try:
            for i in range(self._nkeys):
                view = key_list[i]
                self._init_key(i, &view[0], &view[KEY_SIZE])
        except BaseException:
            self._free_contexts()
            raise

    cdef void _free_contexts(self) noexcept:
        cdef int i
        for i in range(self._nkeys):
            if self._macs != NULL:
                _hmac_free(&self._macs[i])
            if self._ciphers != NULL and self._ciphers[i] != NULL:
                EVP_CIPHER_CTX_free(self._ciphers[i])
        free(self._macs)
        free(self._ciphers)
        self._macs = NULL
        self._ciphers = NULL
        self._nkeys = 0

    cdef int _init_key(self, int i, const unsigned char *signing_key, const unsigned char *encryption_key) except -1:
        cdef EVP_CIPHER *cipher = NULL
        try:
            cipher = EVP_CIPHER_fetch(NULL, b"AES-128-CBC", NULL)
            if cipher == NULL:
                raise _openssl_error("EVP_CIPHER_fetch(AES-128-CBC)")
            self._ciphers[i] = EVP_CIPHER_CTX_new()
            if self._ciphers[i] == NULL:
                raise _openssl_error("EVP_CIPHER_CTX_new")
            # Decryption key schedule once per key; each run of tokens only sets an IV.
            if EVP_DecryptInit_ex2(self._ciphers[i], cipher, encryption_key, NULL, NULL) != 1:
                raise _openssl_error("EVP_DecryptInit_ex2")
            if EVP_CIPHER_CTX_set_padding(self._ciphers[i], 0) != 1:
                raise _openssl_error("EVP_CIPHER_CTX_set_padding")
            if not _hmac_init(&self._macs[i], signing_key):
                raise _openssl_error("HMAC-SHA256 key setup")
        finally:
            EVP_CIPHER_free(cipher)
        return 0

    def __dealloc__(self):
        self._free_contexts()

    def __repr__(self) -> str:
        return f"<telemetry_sink._speedups.BatchDecryptor keys={self._nkeys}>"  # never show key material

    def decrypt(self, tokens, ttl=None, now=None) -> list:
        """Plaintext of each token, or None where no key accepts it (MultiFernet.decrypt's rules).

        With `ttl` (seconds), tokens older than ttl or more than 60 s in the future (against
        `now`, default the current time) are rejected, as `decrypt(token, ttl)` does.
        """
        return self._run(tokens, ttl, now, False)

    def decrypt_keyed(self, tokens, ttl=None, now=None) -> tuple:
        """(plaintexts, key indices): as decrypt(), plus which key accepted each token (-1: none)."""
        return self._run(tokens, ttl, now, True)

    def decrypt_span(self, image, Py_ssize_t pos, Py_ssize_t count, ttl=None, now=None) -> tuple:
        """(decrypt() of the `count` length-prefixed tokens laid out in `image` from `pos`, the
        position after them): the tokens split_tokens would copy out, read where they lie."""
        cdef const unsigned char[::1] view = image  # held (exported) until this call returns
        return self._run_span(view, pos, count, _time_window(ttl, now))

    cdef object _run(self, object tokens, object ttl, object now, bint keyed):
        cdef tuple toks = tuple(tokens)  # keeps every token alive while the GIL is released
        return self._run_tokens(toks, None, 0, PyTuple_GET_SIZE(toks), _time_window(ttl, now), keyed)

    cdef object _run_span(self, const unsigned char[::1] view, Py_ssize_t pos, Py_ssize_t count,
                          _TimeWindow window):
        if pos < 0 or count < 0:
            raise ValueError("decrypt_span: negative position or count")
        return self._run_tokens(None, view, pos, count, window, False)

    cdef object _run_tokens(self, tuple toks, const unsigned char[::1] view, Py_ssize_t pos, Py_ssize_t n,
                            _TimeWindow window, bint keyed):
        """Pass 1 (GIL held): record each token's place, from `toks` (bytes, type-checked) or, when
        it is None, from the tokens laid out in `view` from `pos` (the layout checked again here);
        then decrypt. Returns decrypt()'s answer, plus the position after the span for a view."""
        cdef Py_ssize_t size = 0
        cdef const unsigned char *p = NULL
        cdef Py_ssize_t i
        cdef Py_ssize_t length
        cdef object item
        cdef _Token *tok_array
        if toks is None and view.shape[0] > 0:
            size = view.shape[0]
            p = &view[0]
        self._enter()
        try:
            tok_array = <_Token *>malloc(<size_t>n * sizeof(_Token) + 1)
            if tok_array == NULL:
                raise MemoryError()
            try:
                for i in range(n):
                    if toks is not None:
                        item = <object>PyTuple_GET_ITEM(toks, i)
                        if not PyBytes_Check(item):
                            raise TypeError(f"tokens must be bytes, got {type(item).__name__} at index {i}")
                        tok_array[i].data = <const unsigned char *>PyBytes_AS_STRING(item)
                        tok_array[i].length = <size_t>PyBytes_GET_SIZE(item)
                        continue
                    if pos + 4 > size:
                        raise ValueError("decrypt_span: a token runs past the buffer")
                    length = _get_u32(p + pos)
                    pos += 4
                    if pos + length > size:
                        raise ValueError("decrypt_span: a token runs past the buffer")
                    tok_array[i].data = p + pos
                    tok_array[i].length = <size_t>length
                    pos += length
                result = self._decrypt(tok_array, n, window, keyed)
                return result if toks is not None else (result, pos)
            finally:
                free(tok_array)
        finally:
            self._busy = False

    cdef int _enter(self) except -1:
        if self._nkeys == 0:
            raise RuntimeError("BatchDecryptor.__init__ was not called")
        if self._busy:
            raise RuntimeError("BatchDecryptor.decrypt() called from two threads at once; "
                               "use one decryptor per thread")
        self._busy = True
        return 0

    cdef object _decrypt(self, _Token *tok_array, Py_ssize_t n, _TimeWindow window, bint keyed):
        """Decrypt the `n` tokens whose places pass 1 recorded (kept alive by the caller)."""
        cdef Py_ssize_t i
        cdef size_t length
        cdef size_t max_len = 0
        cdef size_t out_size = 0
        cdef unsigned char *raw = NULL
        cdef unsigned char *out = NULL
        cdef int step
        cdef list plaintexts
        cdef list key_ids
        # Size the work area: a token of L characters decodes to at most 3L/4 bytes, laid out after
        # the 2 blocks _decrypt_into leaves before the first (each token after overlaps the one before).
        out_size = 2 * BLOCK
        for i in range(n):
            length = tok_array[i].length
            if length > max_len:
                max_len = length
            out_size += length // 4 * 3 + 3
        try:
            raw = <unsigned char *>malloc(max_len // 4 * 3 + 3)
            out = <unsigned char *>malloc(out_size + 1)
            if raw == NULL or out == NULL:
                raise MemoryError()
            with nogil:
                step = _decrypt_into(self._macs, self._ciphers, self._nkeys, window, tok_array, <size_t>n,
                                     raw, out)
            if step != STEP_OK:
                ERR_clear_error()
                if step == STEP_LENGTH:
                    raise RuntimeError("internal error: output size mismatch in BatchDecryptor.decrypt")
                raise _openssl_error(_STEP_NAMES[step])
            plaintexts = [None] * n
            for i in range(n):
                if tok_array[i].key != REJECTED:
                    plaintexts[i] = PyBytes_FromStringAndSize(<char *>out + tok_array[i].out_offset,
                                                              <Py_ssize_t>tok_array[i].out_length)
            if not keyed:
                return plaintexts
            key_ids = [tok_array[i].key for i in range(n)]
            return plaintexts, key_ids
        finally:
            # The work area held plaintext (and raw, a token): wipe before freeing.
            if out != NULL:
                OPENSSL_cleanse(out, out_size + 1)
            if raw != NULL:
                OPENSSL_cleanse(raw, max_len // 4 * 3 + 3)
            free(out)
            free(raw)


# -- records of one request (records.encode_records) --


def check_records(list values, double received_at, Py_ssize_t max_node_id_chars):
    """Validate each record (a dict; `node_id` a str of 1..max_node_id_chars characters; `ts`
    an int or float, or absent: then set to `received_at`). Return -1 when all are valid, else
    the index of the first invalid one (records.py words the error)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t n = len(values)
    cdef Py_ssize_t length
    cdef PyObject *found
    cdef object record
    cdef object value
    cdef object ts = None
    for i in range(n):
        record = values[i]
        if type(record) is not dict:
            return i
        found = PyDict_GetItem(record, "node_id")
        if found is NULL:
            return i
        value = <object>found
        if type(value) is not str:
            return i
        length = len(<str>value)
        if length < 1 or length > max_node_id_chars:
            return i
        found = PyDict_GetItem(record, "ts")
        if found is NULL:
            if ts is None:
                ts = received_at
            PyDict_SetItem(record, "ts", ts)
        else:
            value = <object>found
            if type(value) is not float and type(value) is not int:
                return i
    return -1


cdef unsigned char _JSON_SPECIAL[256]
for _c in (34, 123, 125, 91, 93, 44, 92):  # " { } [ ] , \\
    _JSON_SPECIAL[_c] = 1


def dump_records(list values):
    """orjson.dumps of each record, as exact-size bytes: one dumps of the whole list, split at
    its top-level commas (orjson's output is compact: no whitespace outside strings)."""
    cdef bytes blob = _dumps(values)
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(blob)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(blob) - 1  # the closing "]"
    cdef Py_ssize_t i = 1
    cdef Py_ssize_t start = 1
    cdef Py_ssize_t depth = 0
    cdef bint in_string = False
    cdef unsigned char c
    cdef list out = []
    if n <= 1:  # "[]"
        return out
    while i < n:
        c = s[i]
        i += 1
        if not _JSON_SPECIAL[c]:
            continue
        if in_string:
            if c == 92:  # backslash: skip the escaped byte
                i += 1
            elif c == 34:
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 123 or c == 91:
            depth += 1
        elif c == 125 or c == 93:
            depth -= 1
        elif c == 44 and depth == 0:
            out.append(PyBytes_FromStringAndSize(<const char *>s + start, i - 1 - start))
            start = i
    out.append(PyBytes_FromStringAndSize(<const char *>s + start, n - start))
    return out


def record_span(list values):
    """(lowest ts, highest ts, set of node ids) of validated records: dicts each holding a str
    `node_id` and a number `ts`. What the segment index of the records' segment must cover."""
    cdef double lo = INFINITY, hi = -INFINITY, t
    cdef dict record
    nodes = set()
    for record in values:
        t = record["ts"]
        if t < lo:
            lo = t
        if t > hi:
            hi = t
        nodes.add(record["node_id"])
    return lo, hi, nodes


def has_digit_run(bytes data not None, Py_ssize_t run):
    """Whether `data` holds `run` (at least 1) or more consecutive ASCII digits. Looks at the last
    byte of each window of `run` bytes first: a non-digit there rules the whole window out, so
    ordinary text costs about one look per `run` bytes. (bytes, not a buffer: a memoryview's set-up
    cost more than the whole scan of a single record.)"""
    cdef const unsigned char *data_ = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = run - 1
    cdef Py_ssize_t start
    if run < 1:
        raise ValueError("has_digit_run: run must be at least 1")
    while i < n:
        if <unsigned char>(data_[i] - 48) >= 10:
            i += run
            continue
        start = i  # a digit: how far back does its run reach (up to a whole window)?
        while start > i - run + 1 and <unsigned char>(data_[start - 1] - 48) < 10:
            start -= 1
        i += 1
        while i < n and i - start < run and <unsigned char>(data_[i] - 48) < 10:
            i += 1
        if i - start >= run:
            return True
        i += run  # data[i] is no digit (or the end): the next window ends `run` bytes on
    return False


# -- a whole, plain POST request in one read (fast_lane.FastLaneProtocol) --


cdef unsigned char _TCHAR[256]  # RFC 9110 token characters: what a header name is made of
for _c in list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    _TCHAR[_c] = 1
cdef unsigned char _VCHAR[256]  # header value bytes taken here: visible ASCII, space, tab
for _c in range(0x21, 0x7F):
    _VCHAR[_c] = 1
_VCHAR[32] = 1
_VCHAR[9] = 1
# Headers that make a request anything but plain: the parser (httptools) decides those.
from ._protocols import NOT_PLAIN_HEADERS as _NOT_PLAIN


cdef inline bint _is_ows(unsigned char c) noexcept:
    return c == 32 or c == 9


# -- canonical records straight from the body (records.encode_body) --
#
# orjson.loads + check_records + dump_records + record_span, for the bodies where the result can be
# read off the body's bytes: every value in the subset below is already written exactly as
# orjson.dumps writes it, so a record's plaintext is its own bytes (less any whitespace between
# tokens, plus `"ts":<receive time>` where it has none). Anything outside the subset, and anything
# invalid, is declined (None): the caller then takes the orjson path, which is the reference.

cdef unsigned char _PLAIN_STR[256]  # bytes a string may hold as they are: visible ASCII and space, no " or \
for _c in range(0x20, 0x7f):
    _PLAIN_STR[_c] = 1
_PLAIN_STR[34] = 0
_PLAIN_STR[92] = 0

cdef double _POW10[19]
for _c in range(19):
    _POW10[_c] = 10.0 ** _c

cdef enum:
    _CANON_MAX_DEPTH = 16       # deeper records are rare: declined
    _CANON_MAX_KEYS = 64        # keys of one object, for the duplicate check

ctypedef struct _Canon:
    const unsigned char *s
    Py_ssize_t i
    Py_ssize_t n
    bint ndjson                 # a newline ends a record, so it is not whitespace
    bint spaced                 # whitespace skipped inside the current record
    Py_ssize_t max_node_id
    Py_ssize_t node_at          # the current record's node_id (its characters), or -1
    Py_ssize_t node_len
    bint has_ts
    double ts


cdef inline void _canon_ws(_Canon *c) noexcept nogil:
    cdef unsigned char ch
    while c.i < c.n:
        ch = c.s[c.i]
        if ch == 32 or ch == 9 or ch == 13 or (ch == 10 and not c.ndjson):
            c.i += 1
            c.spaced = True
        else:
            return


cdef inline Py_ssize_t _canon_string(_Canon *c) noexcept nogil:
    """At a '"': skip a string of plain bytes; return where its characters start, or -1."""
    cdef Py_ssize_t start = c.i + 1
    cdef Py_ssize_t j = start
    while j < c.n and _PLAIN_STR[c.s[j]]:
        j += 1
    if j >= c.n or c.s[j] != 34:
        return -1
    c.i = j + 1
    return start


cdef inline bint _digit(unsigned char ch) noexcept nogil:
    return <unsigned char>(ch - 48) < 10


cdef bint _canon_number(_Canon *c, double *value) noexcept nogil:
    """A number as orjson writes it: an integer of at most 18 digits (not -0), or a decimal fraction
    with no exponent, at most 15 significant digits, no trailing zero after the first fractional
    digit, at least 1e-4 and below 1e15 in magnitude (orjson writes those in positional notation,
    and a decimal of at most 15 digits is the shortest that reads back as its double). `value`: its
    double, correctly rounded (Clinger's fast path: mantissa < 2**53, exact power of ten)."""
    cdef const unsigned char *s = c.s
    cdef Py_ssize_t i = c.i
    cdef Py_ssize_t n = c.n
    cdef Py_ssize_t int_start
    cdef Py_ssize_t int_digits
    cdef Py_ssize_t frac_start
    cdef Py_ssize_t frac_len
    cdef Py_ssize_t lead = 0
    cdef Py_ssize_t sig
    cdef bint neg = s[i] == 45
    cdef uint64_t m = 0
    if neg:
        i += 1
    int_start = i
    if i >= n or not _digit(s[i]):
        return False
    if s[i] == 48:
        i += 1
    else:
        while i < n and _digit(s[i]):
            m = m * 10 + (s[i] - 48)
            i += 1
            if i - int_start > 18:
                return False
    int_digits = i - int_start
    if i < n and (s[i] == 101 or s[i] == 69 or _digit(s[i])):  # an exponent, or a leading zero
        return False
    if i >= n or s[i] != 46:
        if neg and m == 0:
            return False  # -0: orjson reads the integer 0 and writes "0"
        value[0] = -<double><int64_t>m if neg else <double><int64_t>m
        c.i = i
        return True
    i += 1
    frac_start = i
    while i < n and _digit(s[i]):
        i += 1
    frac_len = i - frac_start
    if frac_len == 0 or (i < n and (s[i] == 101 or s[i] == 69)):
        return False
    if frac_len == 1 and s[frac_start] == 48:  # "X.0"
        if int_digits > 15:
            return False
        value[0] = -<double><int64_t>m if neg else <double><int64_t>m
        c.i = i
        return True
    if s[i - 1] == 48:  # a trailing zero: orjson would not write it
        return False
    if m == 0:
        while s[frac_start + lead] == 48:
            lead += 1
        if lead > 3:  # below 1e-4
            return False
        sig = frac_len - lead
    else:
        if int_digits > 15:
            return False
        sig = int_digits + frac_len
    if sig > 15:
        return False
    for int_start in range(frac_start, i):
        m = m * 10 + (s[int_start] - 48)
    value[0] = <double>m / _POW10[frac_len]  # frac_len <= 18: exact powers
    if neg:
        value[0] = -value[0]
    c.i = i
    return True


cdef bint _canon_literal(_Canon *c, const char *word, Py_ssize_t length) noexcept nogil:
    if c.i + length > c.n or memcmp(c.s + c.i, word, length) != 0:
        return False
    c.i += length
    return True


cdef bint _canon_value(_Canon *c, int depth) noexcept nogil:
    cdef unsigned char ch
    cdef double ignored
    if c.i >= c.n or depth > _CANON_MAX_DEPTH:
        return False
    ch = c.s[c.i]
    if ch == 34:
        return _canon_string(c) >= 0
    if ch == 123:
        return _canon_object(c, depth, False)
    if ch == 91:
        return _canon_array(c, depth)
    if ch == 116:
        return _canon_literal(c, "true", 4)
    if ch == 102:
        return _canon_literal(c, "false", 5)
    if ch == 110:
        return _canon_literal(c, "null", 4)
    if ch == 45 or _digit(ch):
        return _canon_number(c, &ignored)
    return False


cdef inline bint _canon_opens_empty(_Canon *c, unsigned char close) noexcept nogil:
    """Past the opening bracket: whether `close` follows at once (then past it too)."""
    c.i += 1
    _canon_ws(c)
    if c.i < c.n and c.s[c.i] == close:
        c.i += 1
        return True
    return False


cdef inline int _canon_after_member(_Canon *c, unsigned char close) noexcept nogil:
    """After a member of an array or object: 1 past `close` (the end), 0 past a comma (another
    member follows), -1 anything else."""
    _canon_ws(c)
    if c.i >= c.n:
        return -1
    if c.s[c.i] == close:
        c.i += 1
        return 1
    if c.s[c.i] != 44:
        return -1
    c.i += 1
    _canon_ws(c)
    return 0


cdef bint _canon_array(_Canon *c, int depth) noexcept nogil:
    cdef int after
    if _canon_opens_empty(c, 93):
        return True
    while True:
        if not _canon_value(c, depth + 1):
            return False
        after = _canon_after_member(c, 93)
        if after != 0:
            return after == 1


cdef bint _canon_object(_Canon *c, int depth, bint record) noexcept nogil:
    """An object without duplicate keys (orjson keeps only the last of them); for a `record`, also
    note its node_id (a string of 1..max_node_id characters) and ts (a number)."""
    cdef Py_ssize_t key_at[_CANON_MAX_KEYS]
    cdef Py_ssize_t key_len[_CANON_MAX_KEYS]
    cdef Py_ssize_t keys = 0
    cdef Py_ssize_t k
    cdef Py_ssize_t at
    cdef Py_ssize_t length
    cdef unsigned char ch
    cdef int after
    if _canon_opens_empty(c, 125):
        return True
    while True:
        if c.i >= c.n or c.s[c.i] != 34 or keys == _CANON_MAX_KEYS:
            return False
        at = _canon_string(c)
        if at < 0:
            return False
        length = c.i - 1 - at
        for k in range(keys):
            if key_len[k] == length and memcmp(c.s + key_at[k], c.s + at, length) == 0:
                return False
        key_at[keys] = at
        key_len[keys] = length
        keys += 1
        _canon_ws(c)
        if c.i >= c.n or c.s[c.i] != 58:
            return False
        c.i += 1
        _canon_ws(c)
        if c.i >= c.n:
            return False
        ch = c.s[c.i]
        if record and length == 7 and memcmp(c.s + at, "node_id", 7) == 0:
            if ch != 34:
                return False
            at = _canon_string(c)
            if at < 0 or c.i - 1 - at < 1 or c.i - 1 - at > c.max_node_id:
                return False
            c.node_at, c.node_len = at, c.i - 1 - at
        elif record and length == 2 and c.s[at] == 116 and c.s[at + 1] == 115:  # "ts"
            if not (ch == 45 or _digit(ch)) or not _canon_number(c, &c.ts):
                return False
            c.has_ts = True
        elif not _canon_value(c, depth + 1):
            return False
        after = _canon_after_member(c, 125)
        if after != 0:
            return after == 1


cdef bytes _canon_plaintext(const unsigned char *s, Py_ssize_t start, Py_ssize_t end, bint spaced,
                            bytes stamp):
    """The record s[start:end] as orjson.dumps writes it: without whitespace between tokens (its
    strings hold none of '"' or '\\', so quotes alone tell what is inside one), and with
    ,"ts":<stamp> before its closing brace when `stamp` is given."""
    cdef Py_ssize_t size = end - start
    cdef Py_ssize_t j
    cdef Py_ssize_t o = 0
    cdef bint inside = False
    cdef unsigned char ch
    cdef bytes out
    cdef unsigned char *p
    if not spaced and stamp is None:
        return PyBytes_FromStringAndSize(<const char *>s + start, size)
    if spaced:
        size = 0
        for j in range(start, end):
            ch = s[j]
            if ch == 34:
                inside = not inside
            if inside or not (ch == 32 or ch == 9 or ch == 10 or ch == 13):
                size += 1
    if stamp is not None:
        size += 6 + PyBytes_GET_SIZE(stamp)  # less "}", plus ,"ts": (6), the stamp and "}"
    out = PyBytes_FromStringAndSize(NULL, size)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    if spaced:
        inside = False
        for j in range(start, end):
            ch = s[j]
            if ch == 34:
                inside = not inside
            if inside or not (ch == 32 or ch == 9 or ch == 10 or ch == 13):
                p[o] = ch
                o += 1
    else:
        memcpy(p, s + start, end - start)
        o = end - start
    if stamp is not None:
        o -= 1  # the closing brace
        memcpy(p + o, b',"ts":', 6)
        o += 6
        memcpy(p + o, PyBytes_AS_STRING(stamp), PyBytes_GET_SIZE(stamp))
        o += PyBytes_GET_SIZE(stamp)
        p[o] = 125
    return out


def encode_json(bytes body not None, bint ndjson, double received_at, Py_ssize_t max_records,
                Py_ssize_t max_node_id):
    """(plaintexts, their total size, (lowest ts, highest ts, node ids)) of a JSON (object or array
    of objects) or NDJSON body: what parse_body, check_records (ts = `received_at` where absent),
    dump_records and record_span give, read straight off the body. None when the body is not in the
    subset this reads (docs/speedups.md), or holds no records, or more than `max_records`, or any
    record those would refuse: the caller then takes that path, which also words any error."""
    cdef _Canon c
    cdef Py_ssize_t start
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t last_node_at = -1
    cdef Py_ssize_t last_node_len = 0
    cdef double lo = INFINITY
    cdef double hi = -INFINITY
    cdef double t
    cdef bint array = False
    cdef bytes stamp = None
    cdef bytes text
    cdef list plaintexts = []
    cdef set nodes = set()
    c.s = <const unsigned char *>PyBytes_AS_STRING(body)
    c.n = PyBytes_GET_SIZE(body)
    c.i = 0
    c.ndjson = ndjson
    c.max_node_id = max_node_id
    _canon_ws(&c)
    if not ndjson and c.i < c.n and c.s[c.i] == 91:
        array = True
        c.i += 1
        _canon_ws(&c)
    while True:
        if ndjson:
            while c.i < c.n and c.s[c.i] == 10:  # blank lines
                c.i += 1
                _canon_ws(&c)
            if c.i >= c.n:
                break
        if c.i >= c.n or c.s[c.i] != 123:
            return None
        count += 1
        if count > max_records:
            return None
        start = c.i
        c.spaced = c.has_ts = False
        c.node_at = -1
        if not _canon_object(&c, 1, True) or c.node_at < 0:
            return None
        if c.has_ts:
            t = c.ts
        else:
            t = received_at
            if stamp is None:
                stamp = _dumps(received_at)
        text = _canon_plaintext(c.s, start, c.i, c.spaced, None if c.has_ts else stamp)
        plaintexts.append(text)
        total += PyBytes_GET_SIZE(text)
        if t < lo:
            lo = t
        if t > hi:
            hi = t
        if c.node_len != last_node_len or memcmp(c.s + c.node_at, c.s + last_node_at, c.node_len) != 0:
            nodes.add(PyUnicode_DecodeASCII(<const char *>c.s + c.node_at, c.node_len, NULL))
            last_node_at, last_node_len = c.node_at, c.node_len
        _canon_ws(&c)
        if ndjson:
            if c.i < c.n and c.s[c.i] != 10:
                return None
            continue
        if not array:
            break
        if c.i < c.n and c.s[c.i] == 44:
            c.i += 1
            _canon_ws(&c)
            continue
        if c.i < c.n and c.s[c.i] == 93:
            c.i += 1
            _canon_ws(&c)
            break
        return None
    if c.i != c.n or count == 0:
        return None
    return plaintexts, total, (lo, hi, nodes)


def parse_plain_post(bytes data not None, bytes path not None, Py_ssize_t max_head, Py_ssize_t max_body):
    """A whole `POST <path> HTTP/1.1` request at the start of `data`, in the strict subset described
    in _protocols.PlainPost: (bytes used, [(lower-case name, value)], body, keep-alive) or None."""
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(path)
    cdef Py_ssize_t pos = 5 + plen + 11
    cdef Py_ssize_t start, name_end, vstart, vend, i, length = -1
    cdef bint keep_alive = True
    cdef bytes name
    cdef char *lower
    cdef list headers = []
    if (n < pos or memcmp(s, b"POST ", 5) != 0 or memcmp(s + 5, PyBytes_AS_STRING(path), plen) != 0
            or memcmp(s + 5 + plen, b" HTTP/1.1\r\n", 11) != 0):
        return None
    while True:
        if pos + 2 > n or pos > max_head:
            return None
        if s[pos] == 13:
            if s[pos + 1] != 10:
                return None
            pos += 2
            break
        start = pos
        while pos < n and _TCHAR[s[pos]]:
            pos += 1
        if pos == start or pos >= n or s[pos] != 58:  # a name, then ':'
            return None
        name_end = pos
        pos += 1
        while pos < n and _is_ows(s[pos]):
            pos += 1
        vstart = pos
        while pos < n and _VCHAR[s[pos]]:
            pos += 1
        vend = pos
        if pos + 1 >= n or s[pos] != 13 or s[pos + 1] != 10 or (vend > vstart and _is_ows(s[vend - 1])):
            return None
        pos += 2
        # A fresh object to lower-case into (given a source, CPython would hand back its shared
        # one-byte bytes object, which must never be written).
        name = PyBytes_FromStringAndSize(NULL, name_end - start)
        lower = PyBytes_AS_STRING(name)
        for i in range(name_end - start):
            lower[i] = s[start + i] + 32 if 65 <= s[start + i] <= 90 else s[start + i]
        value = PyBytes_FromStringAndSize(<const char *>s + vstart, vend - vstart)
        if name == b"content-length":
            if length >= 0 or vend == vstart or vend - vstart > 9:
                return None
            length = 0
            for i in range(vstart, vend):
                if <unsigned char>(s[i] - 48) >= 10:
                    return None
                length = length * 10 + (s[i] - 48)
            if length > max_body:
                return None
        elif name == b"connection":
            lowered = value.lower()
            if lowered == b"close":
                keep_alive = False
            elif lowered != b"keep-alive":
                return None
        elif name in _NOT_PLAIN:
            return None
        headers.append((name, value))
    if pos > max_head or length < 0 or pos + length > n:
        return None
    return pos + length, headers, data[pos:pos + length], keep_alive


# -- the length-prefixed tokens of a batch body (segment_format._parse_at and Batch) --


def scan_tokens(const unsigned char[::1] body, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t count):
    """The position after `count` tokens (u32 big-endian length, then that many bytes) laid out
    from `pos`, all inside [pos, end): or -1 when a length would run past `end`, -2 when a token would."""
    if end > body.shape[0] or pos < 0 or count < 0:
        raise ValueError("scan_tokens: range outside the buffer")
    cdef const unsigned char *p = &body[0] if body.shape[0] else NULL
    cdef Py_ssize_t i
    cdef Py_ssize_t length
    for i in range(count):
        if pos + 4 > end:
            return -1
        length = _get_u32(p + pos)
        pos += 4 + length
        if pos > end:
            return -2
    return pos


def split_tokens(const unsigned char[::1] image, Py_ssize_t pos, Py_ssize_t count):
    """(`count` tokens laid out from `pos` as bytes copies, the position after them); the
    layout was checked by scan_tokens (ValueError if it runs past the buffer all the same)."""
    cdef Py_ssize_t size = image.shape[0]
    cdef const unsigned char *p = &image[0] if size else NULL
    cdef Py_ssize_t i
    cdef Py_ssize_t length
    cdef list out = []
    if pos < 0 or count < 0:
        raise ValueError("split_tokens: negative position or count")
    for i in range(count):
        if pos + 4 > size:
            raise ValueError("split_tokens: a token runs past the buffer")
        length = _get_u32(p + pos)
        pos += 4
        if pos + length > size:
            raise ValueError("split_tokens: a token runs past the buffer")
        out.append(PyBytes_FromStringAndSize(<const char *>p + pos, length))
        pos += length
    return out, pos



# -- export: JSON records straight to typed columns (columns.ColumnPlan.compiled) --
#
# One pass over each record's bytes fills the plan's columns. Anything this path does not handle
# the way the record-by-record path would (a key or a type outside the plan, an escape in a string,
# an array, duplicate keys, a number it cannot place exactly) makes it give up on the whole slice:
# it returns None and pyarrow's reader, then the exact path, decide. So it is only ever faster.

cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception)

cdef enum:
    COL_BOOL = 0
    COL_INT = 1
    COL_FLOAT = 2
    COL_STR = 3
    COL_TS = 4   # a number of seconds within [ts_low, ts_high), kept as int64 microseconds
    NULL_ONLY = -1

cdef struct _Column:
    int kind
    unsigned char *valid      # a byte a row (packed into Arrow's bitmap at the end)
    unsigned char *values     # 8 bytes a row (int64, double), 1 (bool)
    int32_t *offsets          # str: rows + 1
    unsigned char *data       # str: the bytes
    size_t data_len
    size_t data_cap

cdef struct _Entry:
    const unsigned char *key
    Py_ssize_t key_len
    int target                # a column, NULL_ONLY, or <= -2: the child node -2 - target
    Py_ssize_t seen           # the last row that had this key (a second time: duplicate keys)

cdef struct _Node:
    int start
    int count

cdef struct _Parse:
    _Entry *entries
    _Node *nodes
    _Column *cols
    Py_ssize_t row
    double ts_low
    double ts_high
    bint nomem


cdef inline const unsigned char *_skip_ws(const unsigned char *p, const unsigned char *end) noexcept:
    while p < end and (p[0] == 32 or p[0] == 10 or p[0] == 13 or p[0] == 9):
        p += 1
    return p


cdef inline bint _literal(const unsigned char *p, const unsigned char *end, const char *word, Py_ssize_t n) noexcept:
    return end - p >= n and memcmp(p, word, n) == 0


cdef inline const unsigned char *_string_end(const unsigned char *p, const unsigned char *end) noexcept:
    """`p` just after an opening quote: the closing quote, or NULL for an escape, a control
    character or no closing quote (an escape is pyarrow's to decode)."""
    cdef unsigned char c
    while p < end:
        c = p[0]
        if c == 34:
            return p
        if c == 92 or c < 32:
            return NULL
        p += 1
    return NULL


cdef const unsigned char *_number(const unsigned char *p, const unsigned char *end, bint *integral) noexcept:
    """The end of the JSON number at `p` (RFC 8259's grammar), or NULL."""
    integral[0] = True
    if p < end and p[0] == 45:
        p += 1
    if p >= end:
        return NULL
    if p[0] == 48:
        p += 1
    elif 49 <= p[0] <= 57:
        while p < end and 48 <= p[0] <= 57:
            p += 1
    else:
        return NULL
    if p < end and p[0] == 46:
        integral[0] = False
        p += 1
        if p >= end or not (48 <= p[0] <= 57):
            return NULL
        while p < end and 48 <= p[0] <= 57:
            p += 1
    if p < end and (p[0] == 101 or p[0] == 69):
        integral[0] = False
        p += 1
        if p < end and (p[0] == 43 or p[0] == 45):
            p += 1
        if p >= end or not (48 <= p[0] <= 57):
            return NULL
        while p < end and 48 <= p[0] <= 57:
            p += 1
    return p


cdef bint _int64(const unsigned char *p, const unsigned char *q, int64_t *out) noexcept:
    """The integer literal [p, q) as int64; False when it does not fit."""
    cdef bint negative = p[0] == 45
    cdef uint64_t v = 0
    cdef uint64_t limit
    if negative:
        p += 1
    if q - p > 19:
        return False
    limit = (<uint64_t>1 << 63) if negative else ((<uint64_t>1 << 63) - 1)
    while p < q:
        if v > (limit - (p[0] - 48)) // 10:
            return False
        v = v * 10 + (p[0] - 48)
        p += 1
    out[0] = <int64_t>(0 - v) if negative else <int64_t>v
    return True


# Powers of ten a double holds exactly (10**22 is the last one).
cdef double _EXACT_POW10[23]
_EXACT_POW10[0] = 1.0
for _i in range(1, 23):
    _EXACT_POW10[_i] = _EXACT_POW10[_i - 1] * 10.0  # exact: 5**22 < 2**53


cdef bint _exact_double(const unsigned char *p, const unsigned char *q, double *out) noexcept:
    """The JSON number [p, q) as the nearest double when that takes one IEEE operation
    (Clinger's fast path: at most 2**53 as an integer of its digits, a power of ten up to 10**22,
    both exact, so one multiplication or division rounds correctly); False otherwise, for
    PyOS_string_to_double to decide. Five times faster on the readings sensors send."""
    cdef bint negative = p[0] == 45
    cdef uint64_t m = 0
    cdef int digits = 0
    cdef int scale = 0
    cdef int e = 0
    cdef bint e_negative = False
    cdef double d
    if negative:
        p += 1
    while p < q and 48 <= p[0] <= 57:
        if digits or p[0] != 48:
            digits += 1
        m = m * 10 + (p[0] - 48)
        p += 1
        if digits > 19:
            return False
    if p < q and p[0] == 46:
        p += 1
        while p < q and 48 <= p[0] <= 57:
            if digits or p[0] != 48:
                digits += 1
            m = m * 10 + (p[0] - 48)
            scale -= 1
            p += 1
            if digits > 19:
                return False
    if p < q:  # an exponent (the grammar was checked by _number)
        p += 1
        if p[0] == 43 or p[0] == 45:
            e_negative = p[0] == 45
            p += 1
        while p < q:
            e = e * 10 + (p[0] - 48)
            p += 1
            if e > 1000:
                return False
        scale += -e if e_negative else e
    if m > (<uint64_t>1 << 53) or scale < -22 or scale > 22:
        return False
    d = <double>m
    d = d * _EXACT_POW10[scale] if scale >= 0 else d / _EXACT_POW10[-scale]
    out[0] = -d if negative else d
    return True


cdef const unsigned char *_leaf(_Parse *st, int col, const unsigned char *p, const unsigned char *end) noexcept:
    """Parse the value at `p` into column `col` at the current row; its end, or NULL."""
    cdef _Column *c = &st.cols[col]
    cdef Py_ssize_t row = st.row
    cdef const unsigned char *q
    cdef bint integral
    cdef int64_t i
    cdef double d
    cdef char *stop
    cdef size_t n
    cdef size_t cap
    cdef unsigned char *grown
    if p[0] == 110:  # n
        return p + 4 if _literal(p, end, b"null", 4) else NULL
    if c.kind == COL_STR:
        if p[0] != 34:
            return NULL
        q = _string_end(p + 1, end)
        if q == NULL:
            return NULL
        n = <size_t>(q - p - 1)
        if c.data_len + n > c.data_cap:
            cap = 2 * c.data_cap + n + 64
            if cap > 0x7FFFFFFF:  # int32 offsets: a slice that big is pyarrow's to split
                return NULL
            grown = <unsigned char *>realloc(c.data, cap)
            if grown == NULL:
                st.nomem = True
                return NULL
            c.data, c.data_cap = grown, cap
        memcpy(c.data + c.data_len, p + 1, n)
        c.data_len += n
        c.valid[row] = 1
        return q + 1
    if c.kind == COL_BOOL:
        if _literal(p, end, b"true", 4):
            c.values[row] = 1
            c.valid[row] = 1
            return p + 4
        if _literal(p, end, b"false", 5):
            c.values[row] = 0
            c.valid[row] = 1
            return p + 5
        return NULL
    q = _number(p, end, &integral)
    if q == NULL:
        return NULL
    if c.kind == COL_INT:
        if not integral or not _int64(p, q, &i):
            return NULL
        (<int64_t *>c.values)[row] = i
        c.valid[row] = 1
        return q
    if integral:
        # As the exact path does, float(int): an int64 converts to the nearest double. Longer
        # literals are left to the exact path (orjson's integers end at 64 bits).
        if not _int64(p, q, &i):
            return NULL
        d = <double>i
    elif not _exact_double(p, q, &d):
        d = PyOS_string_to_double(<const char *>p, &stop, NULL)
        if PyErr_Occurred() != NULL:
            PyErr_Clear()
            return NULL
        if <const unsigned char *>stop != q or isinf(d):
            return NULL
    if c.kind == COL_TS:
        if not (st.ts_low <= d < st.ts_high):
            return NULL
        # Microseconds, rounded half to even: what columns._timestamps computes from the seconds.
        (<int64_t *>c.values)[row] = <int64_t>rint(d * 1e6)
    else:
        (<double *>c.values)[row] = d
    c.valid[row] = 1
    return q


cdef const unsigned char *_object(_Parse *st, int node, const unsigned char *p, const unsigned char *end) noexcept:
    """Parse the object at `p` (its "{") against plan node `node`; its end, or NULL."""
    cdef _Node nd = st.nodes[node]
    cdef int guess = nd.start
    cdef int e
    cdef int j
    cdef int target
    cdef const unsigned char *k
    cdef const unsigned char *q
    cdef Py_ssize_t klen
    cdef _Entry *entry
    p = _skip_ws(p + 1, end)
    if p < end and p[0] == 125:
        return p + 1
    while True:
        if p >= end or p[0] != 34:
            return NULL
        k = p + 1
        q = _string_end(k, end)
        if q == NULL:
            return NULL
        klen = q - k
        e = -1
        # Records of one export mostly keep the sample's key order: try the next key first.
        if guess < nd.start + nd.count and st.entries[guess].key_len == klen and \
                memcmp(st.entries[guess].key, k, klen) == 0:
            e = guess
        else:
            for j in range(nd.start, nd.start + nd.count):
                if st.entries[j].key_len == klen and memcmp(st.entries[j].key, k, klen) == 0:
                    e = j
                    break
        if e < 0:
            return NULL  # a key outside the plan: `extra`, the exact path's to fill
        entry = &st.entries[e]
        if entry.seen == st.row:
            return NULL  # duplicate keys
        entry.seen = st.row
        guess = e + 1
        p = _skip_ws(q + 1, end)
        if p >= end or p[0] != 58:
            return NULL
        p = _skip_ws(p + 1, end)
        if p >= end:
            return NULL
        target = entry.target
        if target >= 0:
            p = _leaf(st, target, p, end)
        elif p[0] == 110:  # null fits a null-only leaf and any object (all its leaves null)
            p = p + 4 if _literal(p, end, b"null", 4) else NULL
        elif target == NULL_ONLY or p[0] != 123:
            return NULL
        else:
            p = _object(st, -2 - target, p, end)
        if p == NULL:
            return NULL
        p = _skip_ws(p, end)
        if p >= end:
            return NULL
        if p[0] == 44:
            p = _skip_ws(p + 1, end)
            continue
        if p[0] == 125:
            return p + 1
        return NULL


cdef bytes _bitmap(const unsigned char *flags, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, (n + 7) // 8)
    cdef unsigned char *b = <unsigned char *>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    memset(b, 0, (n + 7) // 8)
    for i in range(n):
        if flags[i]:
            b[i >> 3] |= <unsigned char>(1 << (i & 7))
    return out


def json_columns(list lines, list keys, list targets, list nodes, list kinds, double ts_low, double ts_high):
    """The plan's columns from `lines` (one JSON object each), or None where the exact path must decide.

    The plan, flattened: `nodes` [(first entry, entries)] (node 0: the record), entry i
    `keys[i]` (bytes) -> `targets[i]` (a column, -1: a key only ever null, <= -2: child node
    -2 - target); `kinds[c]` 0 bool, 1 int64, 2 float64, 3 str, 4 ts (seconds in [ts_low, ts_high), given
    as int64 microseconds).
    Per column: (validity bitmap, or None when nothing is null; values; str offsets or None)."""
    cdef Py_ssize_t n = len(lines)
    cdef int ncols = len(kinds)
    cdef int nentries = len(keys)
    cdef int nnodes = len(nodes)
    cdef _Parse st
    cdef _Column *c
    cdef Py_ssize_t row
    cdef Py_ssize_t width
    cdef Py_ssize_t valid_count
    cdef int i
    cdef bytes line
    cdef const unsigned char *p
    cdef const unsigned char *end
    cdef list out
    cdef bint ok = True
    if len(targets) != nentries or nnodes < 1:
        raise ValueError("json_columns: keys, targets and nodes do not describe a plan")
    st.row = -1
    st.ts_low, st.ts_high = ts_low, ts_high
    st.nomem = False
    st.entries = <_Entry *>calloc(nentries + 1, sizeof(_Entry))
    st.nodes = <_Node *>calloc(nnodes, sizeof(_Node))
    st.cols = <_Column *>calloc(ncols + 1, sizeof(_Column))
    try:
        if st.entries == NULL or st.nodes == NULL or st.cols == NULL:
            raise MemoryError()
        for i in range(nentries):
            key = keys[i]
            if not PyBytes_Check(key):
                raise TypeError("json_columns: keys must be bytes")
            st.entries[i].key = <const unsigned char *>PyBytes_AS_STRING(key)
            st.entries[i].key_len = PyBytes_GET_SIZE(key)
            st.entries[i].target = targets[i]
            st.entries[i].seen = -1
            if st.entries[i].target >= ncols or -2 - st.entries[i].target >= nnodes:
                raise ValueError("json_columns: an entry points outside the plan")
        for i in range(nnodes):
            st.nodes[i].start, st.nodes[i].count = nodes[i]
            if st.nodes[i].start < 0 or st.nodes[i].count < 0 or st.nodes[i].start + st.nodes[i].count > nentries:
                raise ValueError("json_columns: a node points outside the entries")
        for i in range(ncols):
            c = &st.cols[i]
            c.kind = kinds[i]
            if c.kind < COL_BOOL or c.kind > COL_TS:
                raise ValueError(f"json_columns: unknown column kind {c.kind}")
            width = 1 if c.kind == COL_BOOL else (0 if c.kind == COL_STR else 8)
            c.valid = <unsigned char *>calloc(n + 1, 1)
            c.values = <unsigned char *>calloc(n * width + 1, 1)
            if c.kind == COL_STR:
                c.offsets = <int32_t *>calloc(n + 1, sizeof(int32_t))
                if c.offsets == NULL:
                    raise MemoryError()
            if c.valid == NULL or c.values == NULL:
                raise MemoryError()
        for row in range(n):
            line = lines[row]
            p = <const unsigned char *>PyBytes_AS_STRING(line)
            end = p + PyBytes_GET_SIZE(line)
            st.row = row
            p = _skip_ws(p, end)
            if p >= end or p[0] != 123:
                ok = False
                break
            p = _object(&st, 0, p, end)
            if p == NULL or _skip_ws(p, end) != end:
                ok = False
                break
            for i in range(ncols):
                if st.cols[i].kind == COL_STR:
                    st.cols[i].offsets[row + 1] = <int32_t>st.cols[i].data_len
        if st.nomem:
            raise MemoryError()
        if not ok:
            return None
        out = []
        for i in range(ncols):
            c = &st.cols[i]
            valid_count = 0
            for row in range(n):
                valid_count += c.valid[row]
            validity = None if valid_count == n else _bitmap(c.valid, n)
            if c.kind == COL_STR:
                out.append((validity, PyBytes_FromStringAndSize(<char *>c.data, c.data_len),
                            PyBytes_FromStringAndSize(<char *>c.offsets, (n + 1) * sizeof(int32_t))))
            elif c.kind == COL_BOOL:
                out.append((validity, _bitmap(c.values, n), None))
            else:
                out.append((validity, PyBytes_FromStringAndSize(<char *>c.values, n * 8), None))
        return out
    finally:
        if st.cols != NULL:
            for i in range(ncols):
                free(st.cols[i].valid)
                free(st.cols[i].values)
                free(st.cols[i].offsets)
                free(st.cols[i].data)
        free(st.cols)
        free(st.nodes)
        free(st.entries)
