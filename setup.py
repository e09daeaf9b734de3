"""Build script: compiles telemetry_sink/_speedups.pyx when it can (see docs/speedups.md).

Metadata lives in pyproject.toml (it needs setuptools >= 77); this file only adds the optional C
extension. Like markupsafe's setup.py, a failed or impossible build never fails the install or
`setup.py build_ext --inplace`: it prints one loud warning line saying what is missing and how to
get it, removes any binary of an earlier build (so a stale `.so` is never installed or imported),
exits 0, and the package runs on the pure-Python twin (`_speedups_py`).
Set TELEMETRY_SINK_NO_EXTENSIONS=1 to skip compiling altogether.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXT_NAME = "telemetry_sink._speedups"
ROOT = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join("telemetry_sink", "_speedups.pyx")
HEADERS_HINT = "install the OpenSSL >= 3.0 and zlib headers (Debian: apt-get install libssl-dev zlib1g-dev)"
COMPILER_HINT = "install a C compiler (Debian: apt-get install gcc) or point CC at one"
CYTHON_HINT = "pip install 'cython>=3.0' 'setuptools>=77'"
REBUILD = "then rerun: python setup.py build_ext --inplace (or pip install .)"

if tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit()) < (77, 0):
    # pyproject.toml's SPDX `license` needs setuptools >= 77; older ones fail with a long traceback.
    sys.exit(f"setup.py needs setuptools >= 77 (found {setuptools.__version__}): "
             f"{CYTHON_HINT}, or install with `pip install .`, which fetches its own build tools")


def _warn(reason: str, hint: str) -> None:
    """Print the one line that says the extension is missing, why, and how to get it."""
    print(f"\n*** WARNING: {EXT_NAME} not compiled: {reason}; running on the pure-Python twin "
          f"(about 10x slower framing). To get the compiled path: {hint}, {REBUILD} ***\n",
          file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


class OptionalBuildExt(build_ext):
    """build_ext that Cythonizes lazily and turns every build failure into one warning line."""

    def run(self) -> None:
        # setuptools clears `inplace` while it builds; remember whether the in-place copy is ours.
        self.wants_inplace = bool(self.inplace or self.editable_mode)
        try:
            super().run()
        except Exception as exc:  # no usable compiler class at all (PlatformError), and the like
            self._give_up(self.extensions, f"the build could not start ({_first_line(exc)})", COMPILER_HINT)

    def build_extension(self, ext: Extension) -> None:
        try:
            from Cython.Build import cythonize
        except ImportError:
            self._give_up([ext], "Cython is not installed", CYTHON_HINT)
            return
        try:
            # Cythonize here, not at import time, so a missing Cython is a warning, not a crash.
            ext.sources = cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True,
                                    force=bool(self.force))[0].sources
        except Exception as exc:  # Cython's CompileError and friends
            self._give_up([ext], f"Cython failed ({_first_line(exc)})", CYTHON_HINT)
            return
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a compiler that cannot run, ...
            self._give_up([ext], *self._diagnose(exc))

    def _diagnose(self, exc: BaseException) -> tuple[str, str]:
        """Why the C build failed, found by compiling two tiny probes with the same compiler."""
        if not self._compiles(""):
            compiler = getattr(self.compiler, "compiler_so", None) or ["?"]
            return f"no working C compiler (tried {compiler[0]!r})", COMPILER_HINT
        if not self._compiles("#include <openssl/evp.h>\n#include <zlib.h>\n"):
            return "the OpenSSL or zlib headers are missing", HEADERS_HINT
        return (f"the C compiler failed, see its output above (OpenSSL older than 3.0?): {_first_line(exc)}",
                HEADERS_HINT)

    def _compiles(self, source: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source + "int main(void) { return 0; }\n")
            try:
                self.compiler.compile([path], output_dir=tmp)
            except Exception:
                return False
        return True

    def _give_up(self, exts: list[Extension], reason: str, hint: str) -> None:
        """Warn once per extension and remove every binary an earlier build left for it."""
        for ext in exts:
            ext.optional = True  # copy_extensions_to_source then skips it when its build output is absent
            for path in self._binaries(ext):
                if os.path.exists(path):
                    os.remove(path)
                    print(f"removed the stale {os.path.relpath(path, ROOT)}", file=sys.stderr)
        _warn(reason, hint)

    def _binaries(self, ext: Extension) -> list[str]:
        """The build output, and the in-place copy when building in place, with every suffix this
        Python would import (`pip install .` leaves a checkout's own in-place build alone)."""
        stem = os.path.join(*ext.name.split("."))
        build_lib = self.build_lib if os.path.isabs(self.build_lib) else os.path.join(ROOT, self.build_lib)
        bases = [build_lib, ROOT] if getattr(self, "wants_inplace", True) else [build_lib]
        return [os.path.join(base, stem + suffix) for base in bases for suffix in EXTENSION_SUFFIXES]


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
