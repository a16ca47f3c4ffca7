"""Building kvferry's C sources at first use, the way Triton builds its launchers: compiled with
the host's C compiler (`CC`, else `cc`) and cached under `$KVFERRY_CACHE/native` (default
`~/.cache/kvferry`, where converted checkpoints go too) by a hash of the source, the flags and
the compiler. `NativeUnavailable` says why a library cannot be had here; its users then take
their Python path instead."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


class NativeUnavailable(RuntimeError):
    """A native library cannot be built or loaded here (the reason is the message)."""


def cached_library(source: Path, flags: Sequence[str] = ()) -> Path:
    """The shared library of `source` compiled with `flags` (include paths, libraries), built
    first if the cache lacks it. Raises NativeUnavailable."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeUnavailable("no C compiler (set CC, or install cc)")
    key = hashlib.sha256(source.read_bytes() + "\0".join([compiler, *flags]).encode())
    cache = Path(os.environ.get("KVFERRY_CACHE") or Path.home() / ".cache" / "kvferry")
    target = cache / "native" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            _compile(compiler, source, flags, target)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return target


def _compile(compiler: str, source: Path, flags: Sequence[str], target: Path) -> None:
    """Compile into a file of its own, then rename it into place: ranks starting together each
    build, and none ever loads a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        compiler,
        "-O2",
        "-std=gnu11",
        "-shared",
        "-fPIC",
        str(source),
        *flags,
        "-o",
        scratch,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise NativeUnavailable(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
