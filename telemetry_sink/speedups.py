"""The hot path's implementation: the compiled `_speedups` extension when it is importable, else
its pure-Python twin `_speedups_py` (same behaviour, slower). `TELEMETRY_SINK_NO_EXTENSIONS=1`
forces the twin. The interface both satisfy is described once, in `_protocols.py`.

When the twin is in use, FALLBACK_REASON says why and HOW_TO_COMPILE how to get the compiled
path (`serve` logs both as a warning, `info` prints them).
"""

from __future__ import annotations

import os

from ._protocols import (
    BatchDecryptorProtocol,
    BatchFramerProtocol,
    DigitRun,
    EncodeJson,
    JsonColumns,
    PlainPost,
    RecordSpan,
    ScanTokens,
    SplitTokens,
    TokenBucketProtocol,
)

NO_EXTENSIONS = bool(os.environ.get("TELEMETRY_SINK_NO_EXTENSIONS"))
FALLBACK_REASON: str | None = None

try:
    if NO_EXTENSIONS:
        raise ImportError("TELEMETRY_SINK_NO_EXTENSIONS is set")
    from ._speedups import (
        IMPLEMENTATION,
        BatchDecryptor,
        BatchFramer,
        TokenBucket,
        check_records,
        dump_records,
        encode_json,
        has_digit_run,
        json_columns,
        parse_plain_post,
        record_span,
        scan_tokens,
        split_tokens,
    )
except ImportError as exc:  # not compiled: the twin behaves the same, only slower
    FALLBACK_REASON = str(exc) if NO_EXTENSIONS else f"the extension is not built ({exc})"
    from ._speedups_py import (  # type: ignore[assignment]
        IMPLEMENTATION,
        BatchDecryptor,
        BatchFramer,
        TokenBucket,
        check_records,
        dump_records,
        encode_json,
        has_digit_run,
        json_columns,
        parse_plain_post,
        record_span,
        scan_tokens,
        split_tokens,
    )

HOW_TO_COMPILE = "unset TELEMETRY_SINK_NO_EXTENSIONS" if NO_EXTENSIONS else (
    "install a C compiler and the OpenSSL >= 3.0 and zlib headers (Debian: apt-get install gcc libssl-dev "
    "zlib1g-dev), then reinstall with `pip install .` (or, in a source checkout with `pip install cython "
    "'setuptools>=77'`, run `python setup.py build_ext --inplace`); see docs/speedups.md"
)

# Both implementations must satisfy the one interface (checked by mypy, here and in the twin).
_framer: type[BatchFramerProtocol] = BatchFramer
_bucket: type[TokenBucketProtocol] = TokenBucket
_decryptor: type[BatchDecryptorProtocol] = BatchDecryptor
_span: RecordSpan = record_span
_encode: EncodeJson = encode_json
_scan: ScanTokens = scan_tokens
_digits: DigitRun = has_digit_run
_plain: PlainPost = parse_plain_post
_split: SplitTokens = split_tokens
_columns: JsonColumns = json_columns

__all__ = ["FALLBACK_REASON", "HOW_TO_COMPILE", "IMPLEMENTATION", "NO_EXTENSIONS", "BatchDecryptor", "BatchFramer",
           "TokenBucket", "check_records", "dump_records", "encode_json", "has_digit_run", "json_columns",
           "parse_plain_post", "record_span", "scan_tokens", "split_tokens"]
