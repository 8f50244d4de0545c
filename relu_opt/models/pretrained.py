"""Pretrained weights shipped with the package: one record per (model, dataset), checked on load.

Each weight file `relu_opt/models/weights/<model>_<dataset>.pt` has a JSON record beside it saying how it
was made (the exact `relu-opt train` command and seed), what it scores, and its sha256, which every load
checks, so a truncated or swapped file is refused instead of silently giving another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import torch
from torch import nn

from relu_opt.errors import ModelSpecError, WeightsError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class PretrainedWeights:
    """One shipped weight file and how it was made."""

    model: str
    dataset: str
    file: str
    sha256: str
    num_classes: int
    input_shape: tuple[int, ...]
    val_accuracy: float
    test_accuracy: float
    command: str
    seed: int
    trained_on: str = ""
    notes: str = ""

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    @property
    def in_channels(self) -> int:
        return self.input_shape[1]


@cache
def _records() -> dict[tuple[str, str], PretrainedWeights]:
    names = {f.name for f in fields(PretrainedWeights)}
    out = {}
    for path in sorted(WEIGHTS_DIR.glob("*.json")):
        d = {k: v for k, v in json.loads(path.read_text()).items() if k in names}
        rec = PretrainedWeights(**{**d, "input_shape": tuple(d["input_shape"])})
        out[(rec.model, rec.dataset)] = rec
    return out


def list_pretrained(model: str | None = None) -> list[PretrainedWeights]:
    """Return the shipped weight records, for one model or all."""
    return [r for (m, _), r in sorted(_records().items()) if model is None or m == model]


def get_pretrained(model: str, dataset: str | bool | None = True) -> PretrainedWeights:
    """Return the record for `model` on `dataset` (True: its only or first dataset); raise ModelSpecError."""
    recs = list_pretrained(model)
    shipped = ", ".join(f"{r.model} ({r.dataset})" for r in list_pretrained()) or "none"
    if not recs:
        raise ModelSpecError(
            f"no pretrained weights ship for '{model}'; shipped: {shipped}. "
            "Train one with `relu-opt train` and pass --weights FILE"
        )
    if dataset is True or dataset is None:
        return recs[0]
    for r in recs:
        if r.dataset == dataset:
            return r
    raise ModelSpecError(
        f"'{model}' has no pretrained weights for '{dataset}'; shipped: {shipped}. "
        "Train one with `relu-opt train` and pass --weights FILE"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pretrained(model: nn.Module, record: PretrainedWeights) -> nn.Module:
    """Load `record`'s weights into `model` in place after checking the file's sha256; returns `model`."""
    if not record.path.is_file():
        raise WeightsError(f"pretrained file '{record.path}' is missing; reinstall relu-opt")
    digest = _sha256(record.path)
    if digest != record.sha256:
        raise WeightsError(
            f"pretrained file '{record.path}' has sha256 {digest[:12]}…, not the recorded "
            f"{record.sha256[:12]}…: it is damaged or was replaced; reinstall relu-opt"
        )
    model.load_state_dict(torch.load(record.path, map_location="cpu", weights_only=True))
    return model
