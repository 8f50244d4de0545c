"""Fuse the linear layers that meet once a site between them became an identity.

Under MPC with secret weights each linear layer is a Beaver multiplication: one round, and its input and
weights opened. Where a dropped site leaves two linear layers back to back (through nn.Identity nodes),
this pass merges them into one when that is exact (same outputs up to float rounding):

- conv or linear, then a per-channel affine (ChannelAffine, eval-mode BatchNorm): scale the output rows;
- conv or linear, then a pointwise 1x1 convolution (stride 1, no padding, one group) / linear, then linear:
  multiply the weight matrices;
- a per-channel affine, then a convolution without padding or a linear on 2-D inputs: scale the input
  columns and fold the shift into the bias (with padding the zeros of the border would not be shifted);
- an affine, then an affine: compose them.

A product is fused only when the fused weight opens no more elements than the pair did (its two weights
plus the intermediate activation, per sample), so the bytes do not grow where the round goes.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.activations import ChannelAffine
from relu_opt.passes.utils import set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _affine(mod: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Return (scale, shift) per channel of a ChannelAffine or an eval-statistics BatchNorm, else None."""
    if isinstance(mod, ChannelAffine):
        return mod.scale.detach().double(), mod.shift.detach().double()
    if isinstance(mod, _BN) and mod.track_running_stats and mod.running_mean is not None:
        inv = 1 / (mod.running_var.double() + mod.eps).sqrt()
        scale = mod.weight.detach().double() * inv if mod.affine else inv
        shift = (mod.bias.detach().double() if mod.affine else 0) - mod.running_mean.double() * scale
        return scale, shift
    return None


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, _CONV) and mod.padding_mode == "zeros"


def _pointwise(mod: nn.Module) -> bool:
    """True for a 1x1 convolution with stride 1, no padding and one group: a per-position matrix."""
    return (
        _is_conv(mod)
        and mod.groups == 1
        and all(k == 1 for k in mod.kernel_size)
        and all(s == 1 for s in mod.stride)
        and all(p == 0 for p in _padding(mod))
    )


def _padding(mod: nn.Module) -> tuple[int, ...]:
    p = mod.padding
    return (1,) if isinstance(p, str) and p != "valid" else ((0,) if isinstance(p, str) else tuple(p))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _bias(mod: nn.Module, rows: int) -> Tensor:
    return mod.bias.detach().double() if mod.bias is not None else torch.zeros(rows, dtype=torch.float64)


def _dense_weight(conv: nn.Module) -> Tensor:
    """Return the conv's weight as one group (zeros between groups), in float64."""
    w = conv.weight.detach().double()
    g = conv.groups
    if g == 1:
        return w
    out_per, in_per = w.shape[0] // g, w.shape[1]
    dense = torch.zeros(w.shape[0], in_per * g, *w.shape[2:], dtype=torch.float64)
    for i in range(g):
        dense[i * out_per : (i + 1) * out_per, i * in_per : (i + 1) * in_per] = w[i * out_per : (i + 1) * out_per]
    return dense


def _with(mod: nn.Module, weight: Tensor, bias: Tensor, **changes) -> nn.Module:
    """Return a copy of the linear layer `mod` with `weight`, `bias` (cast back) and attribute `changes`."""
    new = copy.deepcopy(mod)
    for k, v in changes.items():
        setattr(new, k, v)
    new.weight = nn.Parameter(weight.to(mod.weight.dtype).contiguous())
    new.bias = nn.Parameter(bias.to(mod.weight.dtype).contiguous())
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape
    elif isinstance(new, _CONV):
        new.out_channels, new.in_channels = weight.shape[0], weight.shape[1] * new.groups
    return new


def _fuse_into_first(a: nn.Module, b: nn.Module, a_out: tuple[int, ...] | None) -> nn.Module | None:
    """Return one layer computing b(a(x)) with `a` a conv or linear, or None when that is not exact or
    would open more elements."""
    aff = _affine(b)
    if aff is not None and (_is_conv(a) or (isinstance(a, nn.Linear) and a_out is not None and len(a_out) == 2)):
        scale, shift = aff
        w = a.weight.detach().double()
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        return _with(a, w, _bias(a, w.shape[0]) * scale + shift)
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        w1, w2 = a.weight.detach().double(), b.weight.detach().double()
        fused = w2 @ w1
        if not _smaller(fused, a, b, a_out):
            return None
        return _with(a, fused, w2 @ _bias(a, w1.shape[0]) + _bias(b, w2.shape[0]))
    if _is_conv(a) and _pointwise(b) and not a.transposed and type(a) is type(b):
        w1 = _dense_weight(a)
        w2 = b.weight.detach().double().flatten(1)  # (out, mid)
        fused = torch.einsum("om,m...->o...", w2, w1)
        if not _smaller(fused, a, b, a_out):
            return None
        return _with(a, fused, w2 @ _bias(a, w1.shape[0]) + _bias(b, w2.shape[0]), groups=1)
    return None


def _smaller(fused: Tensor, a: nn.Module, b: nn.Module, a_out: tuple[int, ...] | None) -> bool:
    mid = 0 if a_out is None else int(torch.tensor(a_out[1:]).prod())
    return fused.numel() <= a.weight.numel() + b.weight.numel() + mid


def _fuse_into_second(a: nn.Module, b: nn.Module, b_in: tuple[int, ...] | None) -> nn.Module | None:
    """Return one layer computing b(a(x)) with `a` a per-channel affine, or None when not exact."""
    aff = _affine(a)
    if aff is None:
        return None
    scale, shift = aff
    if _affine(b) is not None:
        s2, t2 = _affine(b)
        return ChannelAffine((scale * s2).float(), (shift * s2 + t2).float())
    if isinstance(b, nn.Linear) and b_in is not None and len(b_in) == 2:
        w = b.weight.detach().double()
        return _with(b, w * scale, _bias(b, w.shape[0]) + w @ shift)
    if _is_conv(b) and not b.transposed and b.groups == 1 and all(p == 0 for p in _padding(b)):
        w = b.weight.detach().double()
        view = (1, -1, *([1] * (w.dim() - 2)))
        bias = _bias(b, w.shape[0]) + (w * shift.reshape(view)).flatten(1).sum(1)
        return _with(b, w * scale.reshape(view), bias)
    return None


def _single_arg(node: fx.Node) -> bool:
    return node.op == "call_module" and len(node.args) == 1 and not node.kwargs


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _single_arg(node) and type(gm.get_submodule(node.target)) is nn.Identity


def _next_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """Return (the only module node `node` feeds, the nn.Identity nodes passed on the way), or None."""
    between = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _single_arg(user) or user.args[0] is not node:
            return None
        if not _is_identity(gm, user):
            return user, between
        between.append(user)
        node = user
    return None


def fuse_linear(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each exactly fusable pair of linear layers (see the module docstring)
    merged into one, repeated until none is left; outputs are unchanged up to float rounding.
    Reads tensor_meta shapes (run propagate_shapes first) to tell 2-D linear inputs."""
    gm = copy.deepcopy(gm)
    while _fuse_one(gm):
        pass
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse_one(gm: fx.GraphModule) -> bool:
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for a in list(gm.graph.nodes):
        if not _single_arg(a) or _is_identity(gm, a):
            continue
        found = _next_layer(gm, a)
        if found is None:
            continue
        b, between = found
        ma, mb = gm.get_submodule(a.target), gm.get_submodule(b.target)
        if calls[a.target] == 1 and (fused := _fuse_into_first(ma, mb, _shape(a))) is not None:
            set_submodule(gm, a.target, fused)
            a.meta = dict(b.meta)
            b.replace_all_uses_with(a)
            for n in [b, *reversed(between)]:
                gm.graph.erase_node(n)
            return True
        if calls[b.target] == 1 and (fused := _fuse_into_second(ma, mb, _shape(b.args[0]))) is not None:
            set_submodule(gm, b.target, fused)
            b.args = (a.args[0],)
            for n in [*reversed(between), a]:
                gm.graph.erase_node(n)
            return True
    return False
