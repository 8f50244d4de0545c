"""The pass lists that make a model ready for private inference, and its linear floor. A backend adds its
own lowering after PI_PASSES (relu_opt/backends/<engine>/)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from relu_opt.graph import eval_mode, trace
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.fold_bn import fold_batchnorm
from relu_opt.passes.fold_norm import fold_frozen_norm
from relu_opt.passes.fold_poly import fold_poly
from relu_opt.passes.fold_residual_poly import fold_residual_poly
from relu_opt.passes.fuse_linear import fuse_linear
from relu_opt.passes.public_poly import publicize_polys
from relu_opt.passes.replace import linearize, materialize_partial, maxpool_to_avgpool

# BatchNorm folded, masked sites in their gathered (partial) form, frozen LayerNorms folded into the
# linear layers after them, degree-2 polynomials' coefficients folded into their neighbours, or upstream
# through residual additions (one round each), and the linear layers that meet where a site became an identity fused.
PI_PASSES: tuple[GraphPass, ...] = (
    GraphPass(fold_batchnorm),
    GraphPass(materialize_partial, needs_shapes=True),
    GraphPass(fold_frozen_norm),
    GraphPass(fold_poly, needs_shapes=True),
    GraphPass(fold_residual_poly, needs_shapes=True),
    GraphPass(fuse_linear, needs_shapes=True),
)
# Opt-in (--public-coeffs): the polynomials fold_poly left get public coefficients (passes/public_poly.py).
PUBLIC_COEFFS_PASS = GraphPass(publicize_polys)
# Every non-linear op an identity, max-pools averaged, the linear layers that then meet fused: the cost of
# the linear part alone.
FLOOR_PASSES: tuple[GraphPass, ...] = (
    GraphPass(linearize),
    GraphPass(maxpool_to_avgpool),
    GraphPass(fuse_linear, needs_shapes=True),
)


def _with_public(passes: tuple[GraphPass, ...], public_coeffs: bool) -> tuple[GraphPass, ...]:
    """Return `passes` with PUBLIC_COEFFS_PASS after the folds when `public_coeffs` (folding, which keeps
    the coefficients secret, goes first)."""
    if not public_coeffs:
        return passes
    at = next(i for i, p in enumerate(passes) if p.fn is fold_residual_poly) + 1
    return passes[:at] + (PUBLIC_COEFFS_PASS,) + passes[at:]


def prepare_for_pi(
    model: nn.Module,
    example: torch.Tensor,
    leaf: Iterable[str | type] = (),
    public_coeffs: bool = False,
    lowering: Iterable[GraphPass] = (),
) -> fx.GraphModule:
    """Return the eval-mode GraphModule private inference runs (PI_PASSES, then a backend's `lowering`,
    applied; shapes propagated; with `public_coeffs`, unfolded polynomials keep their coefficients public)."""
    with eval_mode(model):
        gm = trace(model, leaf)
    return run_passes(gm.eval(), _with_public(PI_PASSES, public_coeffs) + tuple(lowering), example).eval()


def linear_floor(prepared: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Return `prepared` with FLOOR_PASSES applied: what the model costs with no non-linearity."""
    return run_passes(prepared, FLOOR_PASSES, example).eval()
