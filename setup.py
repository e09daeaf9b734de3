"""Build script: compiles telemetry_sink/_speedups.pyx when it can (see docs/speedups.md).

Metadata lives in pyproject.toml; this file only adds the optional C extension. Like
markupsafe's setup.py, a failed or impossible build never fails the install: it prints
one loud warning and the package runs on the pure-Python twin (`_speedups_py`).
Set TELEMETRY_SINK_NO_EXTENSIONS=1 to skip compiling altogether.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

EXT_NAME = "telemetry_sink._speedups"
PYX = os.path.join("telemetry_sink", "_speedups.pyx")
HINT = "Install a C compiler, libssl-dev and zlib1g-dev (Debian) to build it."


def _warn(reason: str) -> None:
    """Print the one line that says the extension is missing and why."""
    line = f"WARNING: {EXT_NAME} not compiled ({reason}); running on the pure-Python twin. {HINT}"
    bar = "*" * min(len(line), 100)
    print(f"\n{bar}\n{line}\n{bar}\n", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    """First line of an exception, short enough for the warning line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200]


class OptionalBuildExt(build_ext):
    """build_ext that Cythonizes lazily and downgrades every build failure to a warning."""

    def run(self) -> None:
        try:
            super().run()
        except PlatformError as exc:  # no usable compiler at all
            _warn(f"no C compiler: {_reason(exc)}")

    def build_extension(self, ext: Extension) -> None:
        try:
            from Cython.Build import cythonize
        except ImportError:
            _warn("Cython is not installed")
            return
        try:
            # Cythonize here, not at import time, so a missing Cython is a warning, not a crash.
            ext.sources = cythonize(
                [ext],
                compiler_directives={"language_level": "3"},
                quiet=True,
                force=bool(self.force),
            )[0].sources
        except Exception as exc:  # Cython's CompileError and friends
            _warn(f"Cython failed: {_reason(exc)}")
            return
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, ValueError) as exc:
            # Most often: openssl/evp.h or zlib.h missing, or OpenSSL older than 3.0; the
            # compiler's own output above says which, the exception only repeats the command.
            if str(exc).startswith("Command '"):
                _warn("the C compiler failed, see its output above: missing openssl/evp.h or zlib.h?")
            else:
                _warn(f"C compilation failed: {_reason(exc)}")


def _extensions() -> list[Extension]:
    if os.environ.get("TELEMETRY_SINK_NO_EXTENSIONS"):
        print(f"TELEMETRY_SINK_NO_EXTENSIONS is set: not compiling {EXT_NAME}.", file=sys.stderr)
        return []
    compile_args: list[str] = []
    if sys.platform != "win32":
        # No fused multiply-add: TokenBucket must round exactly like the Python twin
        # (gcc contracts a + b * c into one FMA on aarch64 by default).
        compile_args += ["-ffp-contract=off"]
    return [
        Extension(
            EXT_NAME,
            sources=[PYX],
            libraries=["crypto", "z"],
            extra_compile_args=compile_args,
            # Fail at compile time, not import time, on the OpenSSL 1.x-only APIs.
            define_macros=[("OPENSSL_API_COMPAT", "30000"), ("OPENSSL_NO_DEPRECATED", "1")],
        )
    ]


options: dict[str, Any] = {"ext_modules": _extensions(), "cmdclass": {"build_ext": OptionalBuildExt}}
setup(**options)
