"""The Python API: count and export, on any nn.Module."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from relu_opt.export import DEFAULT_OPSET, ExportResult
from relu_opt.export import export as _export
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.census import Census, census
from relu_opt.plan import load

__all__ = ["count", "export", "load"]


def count(model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), name: str = "") -> Census:
    """Return the Census (every non-linear site and its elements per sample) of `model` on `example`."""
    gm = propagate_shapes(trace(model, leaf), example)
    return census(gm, name or type(model).__name__, tuple(example.shape))


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    leaf: Iterable[str | type] = (),
) -> ExportResult:
    """Return the ExportResult of writing `model` to ONNX at `path`, verified against PyTorch and census."""
    totals = count(model, example, leaf).totals_by_kind
    return _export(model, example, path, opset=opset, census_totals=totals)
