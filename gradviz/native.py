"""gradviz's native recorder (gradviz/native.cpp): build it once, load it fast.

The recorder in gradviz.capture is Python; on a small model its forward hooks, its backward
hooks and torch's norm op called per gradient cost about a fifth of a step. native.cpp does
the backward half in C++ for steps whose autograd graph has a shape the Python recorder has
learnt (see capture.Recorder._native_*), and the forward statistics, called from one slim
forward hook per layer: the Python recorder still records every new shape.

It is compiled with torch's cpp_extension (a C++ compiler and ninja) into a folder under
``$XDG_CACHE_HOME/gradviz`` (default ``~/.cache/gradviz``) named after the torch and Python
versions and the source's hash, so a new gradviz or torch builds afresh. Building takes
20-60 s, so gradviz.record never builds it on its own: ``python -m gradviz.native`` (or
extract.py, or ``record(..., native=True)``) does; afterwards every recorder loads it in
milliseconds. Without a compiler gradviz records in Python, as before.
``GRADVIZ_NATIVE=0`` turns it off everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).resolve().parent / "native.cpp"
STALE_LOCK_S = 600  # a build lock this old was left by a build that was killed

_lock = threading.Lock()
_module: Any = None  # the loaded module, once loaded
_why: str | None = None  # why loading or building it failed
_build_failed = False  # a build failed: not tried again in this process


class BuildError(Exception):
    """A C++ source did not build: the compiler's first error, and where it built."""


def disabled() -> bool:
    """GRADVIZ_NATIVE=0 (or off, no, false): record in Python only."""
    return os.environ.get("GRADVIZ_NATIVE", "").strip().lower() in ("0", "off", "no", "false")


def folder_for(stem: str, source: Path) -> tuple[str, Path]:
    """The module name and build folder for a source under this torch and Python."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}_{digest}"
    tag = "".join(c if c.isalnum() else "_" for c in tag)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return f"gradviz_{stem}_{tag}", cache / "gradviz" / f"{stem}-{tag}"


def build(stem: str, source: Path) -> Any:
    """Compile a C++ source with torch's cpp_extension (once: later calls load it).

    Raises BuildError with the compiler's first error, or the first line of whatever
    cpp_extension raised (no compiler, no ninja).
    """
    from torch.utils import cpp_extension

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.CRITICAL)
    name, folder = folder_for(stem, source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the build folder {folder}: {e.strerror}") from e
    lock = folder / "lock"  # cpp_extension waits forever on a lock a killed build left
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    # pip's ninja lives beside this Python, which a venv's python does not put on PATH
    os.environ["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), *filter(None, [os.environ.get("PATH")])])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return cpp_extension.load(name=name, sources=[str(source)],
                                      build_directory=str(folder), extra_cflags=["-O3"])
    except Exception as e:
        lines = [line.strip() for line in f"{out.getvalue()}\n{e}".splitlines()]
        # the compiler's first diagnostic, else the exception's own first line
        why = next((line for line in lines if "error:" in line),
                   f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise BuildError(f"{why[:300]} (build folder {folder})") from e


def _load_built(name: str, folder: Path) -> Any:
    """The module if it was built already (no compiler, no ninja: an import), else None."""
    path = folder / f"{name}.so"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(build_if_missing: bool = False) -> Any:
    """The native recorder's module, or None: off, not built yet, or does not build.

    build_if_missing=True compiles it when it is not built yet (20-60 s, once); else only a
    module built before is loaded. why_not() says why the answer was None.
    """
    global _module, _why, _build_failed
    if disabled():
        return None
    with _lock:
        if _module is not None:
            return _module
        try:
            _module = _load_built(*folder_for("native", SOURCE))
        except (ImportError, OSError) as e:  # a broken or foreign build: build it again
            _module = None
            _why = f"{type(e).__name__}: {e}"
        if _module is None and build_if_missing and not _build_failed:
            try:
                _module = build("native", SOURCE)
                _why = None
            except BuildError as e:
                _why, _build_failed = str(e), True  # (not tried again in this process)
        return _module


def why_not() -> str:
    """Why load() gave None, in a few words."""
    if disabled():
        return "GRADVIZ_NATIVE=0"
    if _module is not None:
        return ""
    return _why or "not built yet: python -m gradviz.native builds it"


def main(argv: list[str] | None = None) -> int:
    """python -m gradviz.native: build the native recorder (once per torch and gradviz)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m gradviz.native",
        description="Build gradviz's native recorder (gradviz/native.cpp) once, with a C++ "
                    "compiler and ninja, into ~/.cache/gradviz. Recording uses it from then "
                    "on; without it gradviz records in Python, with more overhead.")
    p.parse_args(argv)
    if disabled():
        print("gradviz: GRADVIZ_NATIVE=0 is set, so the native recorder is off; unset it "
              "to build and use it", file=sys.stderr)
        return 2
    name, folder = folder_for("native", SOURCE)
    if _load_built(name, folder) is not None:
        print(f"gradviz: the native recorder is built already ({folder})", file=sys.stderr)
        return 0
    print("gradviz: building the native recorder (once, 20-60 s)...", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        build("native", SOURCE)
    except BuildError as e:
        print(f"gradviz: the native recorder did not build: {e}; gradviz records in Python "
              "without it (install a C++ compiler and ninja to build it)", file=sys.stderr)
        return 1
    print(f"gradviz: built the native recorder in {time.perf_counter() - t0:.0f} s "
          f"({folder})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
