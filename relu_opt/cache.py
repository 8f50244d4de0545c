"""The one cache folder of relu-opt, and content hashes to key cached work on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """Return relu-opt's cache folder: $RELU_OPT_CACHE, else ~/.cache/relu-opt."""
    return Path(os.environ.get("RELU_OPT_CACHE") or Path.home() / ".cache" / "relu-opt")


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """Return the first `length` hex digits of the SHA-256 of a file's bytes (not its timestamps)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def state_digest(*modules, extra: str = "", length: int = 10) -> str:
    """Return a short SHA-256 of the modules' state dicts (names, dtypes, shapes, values) and `extra`:
    a key for cached work that changes exactly when the weights do."""
    import torch

    h = hashlib.sha256(extra.encode())
    for module in modules:
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]
