"""Fold a frozen-statistics LayerNorm's scale and bias into the linear layers that read it.

FrozenNorm computes (x - mean(x)) * scale + bias. When every user of its output is an nn.Linear used
nowhere else, W((x - mean) * scale + bias) + c = (W diag(scale))(x - mean) + (W bias + c): the linears
absorb the affine and the norm becomes a plain centring, one encrypted multiplication fewer per site.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.graph import register_leaf
from relu_opt.passes.utils import set_submodule
from relu_opt.replacements import FrozenNorm


@register_leaf
class Centre(nn.Module):
    """x - mean(x) over the last `dims` dimensions: what a folded FrozenNorm leaves behind (linear)."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(self.dims, keepdim=True)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return []


def _linear_users(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> list[fx.Node] | None:
    users = list(node.users)
    for u in users:
        if u.op != "call_module" or u.args[0] is not node or len(u.args) != 1 or u.kwargs:
            return None
        if not isinstance(gm.get_submodule(u.target), nn.Linear) or calls[u.target] != 1:
            return None
    return users or None


def fold_frozen_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each FrozenNorm whose users are all single-use nn.Linear layers
    folded into them (the norm becomes a Centre); outputs are unchanged up to float rounding."""
    gm = copy.deepcopy(gm)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FrozenNorm):
            continue
        norm = gm.get_submodule(node.target)
        users = _linear_users(gm, node, calls)
        if users is None or len(norm.dims) != 1:
            continue
        scale, bias = norm.scale.detach(), norm.bias.detach()
        for u in users:
            lin = copy.deepcopy(gm.get_submodule(u.target))
            with torch.no_grad():
                shift = lin.weight @ bias
                lin.weight.mul_(scale)
                if lin.bias is None:
                    lin.bias = nn.Parameter(shift.clone())
                else:
                    lin.bias.add_(shift)
            set_submodule(gm, u.target, lin)
        set_submodule(gm, node.target, Centre(norm.dims))
    gm.graph.lint()
    gm.recompile()
    return gm
