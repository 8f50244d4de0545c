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

__all__ = ["count", "export", "load", "optimize"]


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
    public_coeffs: bool = False,
) -> ExportResult:
    """Return the ExportResult of writing `model` to ONNX at `path`, verified against PyTorch and census;
    with `public_coeffs`, every polynomial's coefficients are ONNX Constants (CrypTen keeps them public)."""
    if public_coeffs:
        from relu_opt.passes.public_poly import publicize_polys

        model, leaf = publicize_polys(trace(model, leaf)), ()
    totals = count(model, example, leaf).totals_by_kind
    return _export(model, example, path, opset=opset, census_totals=totals)


def optimize(
    model: nn.Module,
    data,
    budget: int | None = None,
    budgets: Iterable[int] | None = None,
    outdir: str | os.PathLike = "relu_opt_out",
    base_spec: str = "",
    progress: bool = False,
    **options,
):
    """Return the OptimizeResult (a list with `budgets`) of optimizing `model` to a ReLU budget.

    `data` is a relu_opt.data.Dataset or a dataset name; `options` are OptimizeConfig fields (strategy,
    replace, granularity, epochs, ...). Results are written to `outdir` (one folder per budget with
    `budgets`); relu_opt.load(folder) rebuilds the optimized model."""
    from relu_opt.data import load_dataset
    from relu_opt.optimizer import OptimizeConfig, optimize_frontier
    from relu_opt.optimizer import optimize as _optimize

    if isinstance(data, str):
        data = load_dataset(data)
    if (budget is None) == (budgets is None):
        raise ValueError("give exactly one of budget= or budgets=")
    if budgets is not None:
        levels = list(budgets)
        cfg = OptimizeConfig(budget=levels[0], **options)
        return optimize_frontier(model, data, levels, cfg, outdir, base_spec=base_spec, progress=progress)
    return _optimize(model, data, OptimizeConfig(budget=budget, **options), outdir, base_spec, progress)
