"""setup.py: a failed extension build never fails the set-up and never leaves a stale binary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SO_NAME = "_speedups" + EXTENSION_SUFFIXES[0]
# The venv's editable install resolves telemetry_sink._speedups in the real checkout when the copy
# has none; drop its finder so the copy's own files decide what is imported.
IMPLEMENTATION_IN_COPY = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
    "from telemetry_sink import speedups; print(speedups.IMPLEMENTATION, speedups.__file__)"
)
INFO_IN_COPY = IMPLEMENTATION_IN_COPY.split("from telemetry_sink")[0] + (
    "from telemetry_sink.cli import main; sys.exit(main(['info']))")


def _copy_tree(dest: Path) -> Path:
    """The package sources, setup.py and pyproject.toml, plus the stale binaries of an earlier build."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "telemetry_sink", dest / "telemetry_sink",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.html"))
    build_lib = dest / "build" / "lib.old" / "telemetry_sink"
    build_lib.mkdir(parents=True)
    for stale in (dest / "telemetry_sink" / SO_NAME, build_lib / SO_NAME):
        stale.write_bytes(b"an old build")
        os.utime(stale, (946684800, 946684800))  # 2000: older than the sources, so not up to date
    return dest


@pytest.mark.parametrize(("case", "hint"), [("no-compiler", "install a C compiler"),
                                             ("no-cython", "pip install 'cython")])
def test_failed_build_warns_once_exits_0_and_leaves_no_binary(tmp_path: Path, case: str, hint: str) -> None:
    tree = _copy_tree(tmp_path / "tree")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if case == "no-compiler":
        env["CC"] = "false"  # a compiler that fails on every input
    else:
        # Cython cannot be uninstalled from the shared venv: shadow it with a package that fails to import.
        shadow = tmp_path / "shadow" / "Cython"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('Cython is not installed (test)')\n")
        env["PYTHONPATH"] = str(shadow.parent)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-lib", "build/lib.old"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "not compiled" in warnings[0] and hint in warnings[0] and "pure-Python twin" in warnings[0], warnings[0]
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.so")) == []
    used = subprocess.run([sys.executable, "-c", IMPLEMENTATION_IN_COPY], cwd=tree, capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()
    assert used == ["pure-python", str(tree / "telemetry_sink" / "speedups.py")]
    info = subprocess.run([sys.executable, "-c", INFO_IN_COPY], cwd=tree, capture_output=True, text=True,
                          timeout=60, check=True).stdout
    rows = dict(line.split(": ", 1) for line in info.splitlines())
    assert rows["compiled_path"].startswith("not in use: the extension is not built"), rows
    assert "apt-get install gcc libssl-dev zlib1g-dev" in rows["compiled_path"], rows
