"""Private temporary folders for what must not leak: the owner's weights (ONNX) and the inputs.

Each folder lives under one per-user root (`$TMPDIR/relu-opt-<uid>`, mode 0700), is itself 0700, is
removed on every exit the process sees (return, error, Ctrl-C, SIGTERM through the CLI), and carries
its process id in its name, so the next use removes folders whose process was killed outright.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from relu_opt.atomic import pid_alive
from relu_opt.errors import ReluOptError

_NAME = re.compile(r"^(?P<prefix>[a-z-]+)-(?P<pid>\d+)-")


def private_root() -> Path:
    """Return this user's 0700 root for private temporary folders, creating it (and checking it)."""
    root = Path(tempfile.gettempdir()) / f"relu-opt-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ReluOptError(f"'{root}' is not a folder owned by you; remove it so relu-opt can keep temp files private")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root


def clear_stale(root: Path | None = None) -> list[Path]:
    """Remove private folders whose process no longer runs; returns the folders removed."""
    root = root or private_root()
    removed = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and not pid_alive(int(m["pid"])):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def private_dir(prefix: str = "bench") -> Iterator[Path]:
    """Yield a fresh 0700 folder only this user can read, removed when the block exits however it exits."""
    root = private_root()
    clear_stale(root)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
