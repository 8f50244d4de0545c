"""The pass lists that make a model ready for private inference, and its linear floor."""

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
from relu_opt.passes.fuse_linear import fuse_linear
from relu_opt.passes.lower import lower_for_crypten
from relu_opt.passes.replace import linearize, materialize_partial, maxpool_to_avgpool

# BatchNorm folded, masked sites in their gathered (partial) form, frozen LayerNorms folded into the
# linear layers after them, degree-2 polynomials' coefficients folded into their neighbours (one round
# each), and the linear layers that meet where a site became an identity fused.
PI_PASSES: tuple[GraphPass, ...] = (
    GraphPass(fold_batchnorm),
    GraphPass(materialize_partial, needs_shapes=True),
    GraphPass(fold_frozen_norm),
    GraphPass(fold_poly, needs_shapes=True),
    GraphPass(fuse_linear, needs_shapes=True),
)
# ... and every kind CrypTen's converter lacks lowered to ops it runs (relu_opt/passes/lower.py).
CRYPTEN_PASSES: tuple[GraphPass, ...] = PI_PASSES + (GraphPass(lower_for_crypten),)
# Every non-linear op an identity, max-pools averaged, the linear layers that then meet fused: the cost of
# the linear part alone.
FLOOR_PASSES: tuple[GraphPass, ...] = (
    GraphPass(linearize),
    GraphPass(maxpool_to_avgpool),
    GraphPass(fuse_linear, needs_shapes=True),
)


def prepare_for_pi(model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = ()) -> fx.GraphModule:
    """Return the eval-mode GraphModule private inference runs (PI_PASSES applied, shapes propagated)."""
    with eval_mode(model):
        gm = trace(model, leaf)
    return run_passes(gm.eval(), PI_PASSES, example).eval()


def prepare_for_crypten(model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = ()) -> fx.GraphModule:
    """Return the eval-mode GraphModule CrypTen runs (CRYPTEN_PASSES applied, shapes propagated)."""
    with eval_mode(model):
        gm = trace(model, leaf)
    return run_passes(gm.eval(), CRYPTEN_PASSES, example).eval()


def linear_floor(prepared: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Return `prepared` with FLOOR_PASSES applied: what the model costs with no non-linearity."""
    return run_passes(prepared, FLOOR_PASSES, example).eval()
