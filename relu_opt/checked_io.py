"""Checked reads of every file relu-opt reads back: JSON with its required keys, torch checkpoints.

A user's file that is truncated or malformed is a CorruptFileError naming the file; a cache that is
damaged is removed (with a note) and rebuilt, so a bad cache never stops a rerun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from relu_opt.errors import CorruptFileError, first_line


def read_json(path: str | os.PathLike, keys: Iterable[str] = (), what: str = "file", fix: str = "") -> dict:
    """Return the JSON object in `path`; raise CorruptFileError naming the file unless it parses as an
    object holding every key in `keys`."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CorruptFileError(f"cannot read {what} '{path}': {first_line(exc)}{hint}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise CorruptFileError(f"{what} '{path}' is not valid JSON ({first_line(exc)}){hint}") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{what} '{path}' holds a {type(obj).__name__}, not a JSON object{hint}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CorruptFileError(f"{what} '{path}' lacks the keys {', '.join(missing)}{hint}")
    return obj


def load_torch(path: str | os.PathLike, what: str = "file", fix: str = "", keys: Iterable[str] = ()) -> Any:
    """Return torch.load(path) (weights only, on the CPU); raise CorruptFileError naming the file when
    it is truncated, not a torch file, or (for a dict) lacks a key in `keys`."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptFileError(f"{what} '{path}' does not exist{hint}") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors...
        why = first_line(exc)
        why = "not a weights-only torch file" if "weights_only" in why else why  # not torch's unsafe advice
        raise CorruptFileError(f"{what} '{path}' is truncated or not a torch file ({why}){hint}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CorruptFileError(f"{what} '{path}' lacks the entries {', '.join(missing)}{hint}")
    return obj


def load_cache(
    path: str | os.PathLike,
    reader: Callable[[Path], Any],
    note: Callable[[str], None] | None = None,
) -> Any | None:
    """Return reader(path) for a cache file, or None when it is missing or damaged; a damaged file is
    removed (and `note` told) so the caller rebuilds it."""
    from relu_opt import distributed

    path = Path(path)

    def read() -> Any | None:
        if not path.is_file():
            return None
        try:
            return reader(path)
        except (CorruptFileError, KeyError, TypeError, ValueError) as exc:
            path.unlink(missing_ok=True)
            if note is not None:
                note(f"note: removed a damaged cache file and rebuilding it ({exc})")
            return None

    return distributed.on_main(read)  # with several ranks, what rank 0 (the one that writes) has
