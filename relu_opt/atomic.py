"""Atomic file writes: a temporary file in the target's folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from relu_opt.errors import ConfigError


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path. A crash leaves the old file or none. Of several
    ranks (relu_opt.distributed) only rank 0 writes, unless a rank works alone on work of its own."""
    from relu_opt import distributed

    path = Path(path)
    if not distributed.writes():
        return path
    if path.exists() and not path.is_file():  # never rename over a device (/dev/null), pipe or folder
        raise ConfigError(f"'{path}' exists and is not a regular file; write to a file path instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically; returns the path."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented JSON atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` atomically; returns the path."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def _clear_stale(path: Path) -> None:
    """Remove temporary files a killed writer of `path` left (their process id is in the name)."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Return whether a process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
