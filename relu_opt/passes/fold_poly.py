"""One-round polynomials: fold a degree-2 polynomial's coefficients into the linear layers around it.

Under CrypTen the coefficients of a Poly site are secret (they are the model owner's weights), so
a * x**2 + b * x + c costs three multiplications of secrets: three rounds and 48 B per element, where the
square alone costs one round and 16 B. Completing the square, with s = sqrt(|a|),

    a x^2 + b x + c = sign(a) (s x + s h)^2 + k,   h = b / (2a),  k = c - b^2 / (4a),

the layer before the site absorbs the scale s and the shift s h (its weight rows and bias), the layer after
it absorbs sign(a) (its input columns), and the site becomes z^2 + sign(a) k: one square plus an addition,
which is free. The result is exact (float rounding aside) and the weights stay secret. The square's value is
y - k, so it stays in CrypTen's fixed-point range as long as |k| does: a site is folded only where
|k| <= `max_offset` (a tiny `a` makes k large), and only where both neighbours are single-use linear layers
(conv, linear, per-channel affine) that the site alone connects.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.activations import ChannelAffine, Poly
from relu_opt.graph import register_leaf
from relu_opt.passes.utils import set_submodule

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register_leaf
class OffsetSquare(nn.Module):
    """x**2 + offset (per channel, dim 1, or one number): a folded degree-2 polynomial, one round."""

    def __init__(self, offset: Tensor) -> None:
        super().__init__()
        self.register_buffer("offset", offset.detach().float().reshape(-1).clone())

    def forward(self, x: Tensor) -> Tensor:
        off = self.offset.reshape((-1,) + (1,) * (x.dim() - 2)) if self.offset.numel() > 1 else self.offset
        return x**2 + off

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("square", math.prod(shape))]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channel_axis_ok(mod: nn.Module, shape: tuple[int, ...] | None, per_channel: bool) -> bool:
    """True when the poly's coefficient axis (dim 1) is the features axis of the linear layer `mod` at an
    activation of `shape` (always for convs and affines; for nn.Linear only on 2-D activations), or the
    poly has one coefficient set for the layer."""
    if not per_channel or not isinstance(mod, nn.Linear):
        return True
    return shape is not None and len(shape) == 2


def scale_output(mod: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module | None:
    """Return a copy of the layer `mod` computing (mod(x) + shift) * scale per output channel, or None."""
    if not isinstance(mod, (*_CONV, nn.Linear, ChannelAffine)):
        return None
    new = copy.deepcopy(mod)
    with torch.no_grad():
        if isinstance(new, ChannelAffine):
            rows = new.scale.numel()
            new.scale.copy_(new.scale.double() * scale.expand(rows))
            new.shift.copy_((new.shift.double() + shift.expand(rows)) * scale.expand(rows))
            return new
        rows = new.weight.shape[0]
        base = new.bias.detach().double() if new.bias is not None else torch.zeros(rows, dtype=torch.float64)
        view = (-1,) + (1,) * (new.weight.dim() - 1)
        new.weight.copy_(new.weight.double() * scale.expand(rows).reshape(view))
        new.bias = nn.Parameter(((base + shift.expand(rows)) * scale.expand(rows)).to(new.weight.dtype))
    return new


def scale_input(mod: nn.Module, a: Tensor) -> nn.Module | None:
    """Return a copy of the layer `mod` with its input channels scaled by `a`, or None."""
    new = copy.deepcopy(mod)
    with torch.no_grad():
        if isinstance(new, ChannelAffine):
            new.scale.mul_(a.to(new.scale.dtype).expand_as(new.scale))
            return new
        if isinstance(new, nn.Linear):
            new.weight.mul_(a.to(new.weight.dtype).expand(new.weight.shape[1])[None, :])
            return new
        if isinstance(new, _CONV) and not new.transposed:
            w = new.weight
            g, per_in = new.groups, w.shape[1]
            cols = a.to(w.dtype).expand(g * per_in).reshape(g, 1, per_in, *([1] * (w.dim() - 2)))
            w.copy_((w.reshape(g, w.shape[0] // g, per_in, *w.shape[2:]) * cols).reshape(w.shape))
            return new
    return None


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def _single_module_arg(node: fx.Node) -> bool:
    return node.op == "call_module" and len(node.args) == 1 and not node.kwargs


def fold_poly(gm: fx.GraphModule, max_offset: float = 1024.0) -> fx.GraphModule:
    """Return a copy of `gm` with each foldable degree-2 Poly site (see the module docstring) turned into
    an OffsetSquare and its coefficients moved into the layers around it; outputs are unchanged up to float
    rounding. Reads tensor_meta shapes (run propagate_shapes first)."""
    gm = copy.deepcopy(gm)
    calls = _calls(gm)
    for node in list(gm.graph.nodes):
        if not _single_module_arg(node) or not isinstance(gm.get_submodule(node.target), Poly):
            continue
        poly = gm.get_submodule(node.target)
        prev, users = node.args[0], list(node.users)
        if poly.degree != 2 or len(users) != 1 or not isinstance(prev, fx.Node) or not _single_module_arg(prev):
            continue
        nxt = users[0]
        if not _single_module_arg(nxt) or len(prev.users) != 1 or calls[prev.target] != 1 or calls[nxt.target] != 1:
            continue
        per_channel = poly.coeffs.shape[1] > 1
        before, after = gm.get_submodule(prev.target), gm.get_submodule(nxt.target)
        if not (
            _channel_axis_ok(before, _shape(prev), per_channel) and _channel_axis_ok(after, _shape(node), per_channel)
        ):
            continue
        c, b, a = (poly.coeffs.detach().double()[i] for i in range(3))
        if bool((a == 0).any()):
            continue
        k = c - b * b / (4 * a)
        if float(k.abs().max()) > max_offset:
            continue
        new_prev = scale_output(before, a.abs().sqrt(), b / (2 * a))
        new_next = scale_input(after, a.sign())
        if new_prev is None or new_next is None:
            continue
        set_submodule(gm, prev.target, new_prev)
        set_submodule(gm, nxt.target, new_next)
        set_submodule(gm, node.target, OffsetSquare(a.sign() * k))
    gm.graph.lint()
    gm.recompile()
    return gm
