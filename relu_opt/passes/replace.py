"""Swap activation sites for other modules: identity, polynomials, masked and partial ReLUs."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relu_opt import ops
from relu_opt.activations import FunctionOp, MaskedSite, PartialSite
from relu_opt.ops import node_kind
from relu_opt.passes.utils import set_submodule


def relu_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Return the nodes that compute a plain ReLU (any spelling), in graph order."""
    return [n for n in gm.graph.nodes if node_kind(gm, n) == "relu"]


def module_name_for(gm: fx.GraphModule, node: fx.Node) -> str:
    """Return the stable submodule name a rewritten site gets: its own module's name when that
    module is used at this node only, else one derived from the node's name."""
    if node.op == "call_module":
        uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        if uses[node.target] == 1:
            return node.target
    return f"relu_opt_{node.name}"


def replace_sites(gm: fx.GraphModule, new_modules: dict[str, nn.Module]) -> fx.GraphModule:
    """Return a copy of `gm` where each node named in `new_modules` calls that module instead."""
    gm = copy.deepcopy(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    unknown = sorted(set(new_modules) - set(by_name))
    if unknown:
        raise KeyError(f"no such node(s) in the graph: {', '.join(unknown)}")
    for name, module in new_modules.items():
        node = by_name[name]
        target = module_name_for(gm, node)
        set_submodule(gm, target, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = name  # keep the site's name so plans and reports refer to the same thing
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def nonlinear_nodes(gm: fx.GraphModule, kinds: Iterable[str] | None = None) -> list[fx.Node]:
    """Return the nodes that compute a non-linear kind of the op table (any of `kinds` when given)."""
    wanted = set(kinds) if kinds is not None else None
    return [n for n in gm.graph.nodes if (k := node_kind(gm, n)) and (wanted is None or k in wanted)]


def linearize(gm: fx.GraphModule, factory: Callable[[], nn.Module] = nn.Identity) -> fx.GraphModule:
    """Return a copy of `gm` with every non-linear op but max-pool (see maxpool_to_avgpool), and every
    relu-opt site module, replaced by `factory()` (identity: the linear floor)."""
    new = {}
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if callable(getattr(mod, "census_items", None)) or node_kind(gm, n) not in (None, "maxpool"):
            new[n.name] = factory()
    return replace_sites(gm, new)


_AVG_FOR_MAX = {
    nn.MaxPool1d: nn.AvgPool1d,
    nn.MaxPool2d: nn.AvgPool2d,
    nn.MaxPool3d: nn.AvgPool3d,
}
_ADAPTIVE_AVG_FOR_MAX = {
    nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d,
}


def maxpool_to_avgpool(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each max-pool module replaced by the average pool with the same
    window (adaptive ones by the adaptive average pool of the same output size)."""
    gm = copy.deepcopy(gm)
    for name, mod in list(gm.named_modules()):
        if type(mod) in _AVG_FOR_MAX:
            avg = _AVG_FOR_MAX[type(mod)](mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
            set_submodule(gm, name, avg)
        elif type(mod) in _ADAPTIVE_AVG_FOR_MAX:
            set_submodule(gm, name, _ADAPTIVE_AVG_FOR_MAX[type(mod)](mod.output_size))
    gm.recompile()
    return gm


def materialize_partial(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each MaskedSite in its export form: the original op (mask all ones),
    its replacement (all zeros), or PartialSite (mixed). Needs shapes (relu_opt.graph.propagate_shapes)."""
    new: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), MaskedSite):
            continue
        mod = gm.get_submodule(node.target)
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise ValueError("materialize_partial needs shapes: run propagate_shapes first")
        shape = tuple(meta.shape[1:])
        keep = torch.broadcast_to(mod.mask, shape) > 0.5
        kept = int(keep.sum())
        if kept == math.prod(shape):
            new[node.name] = copy.deepcopy(mod.original)
        elif kept == 0:
            new[node.name] = copy.deepcopy(mod.replacement)
        elif not partial_ok(mod.kind, mod.original):
            raise ValueError(f"site '{node.name}' ({mod.kind}) keeps some elements only, which needs an elementwise op")
        else:
            rep = expand_replacement(mod.replacement, keep)
            new[node.name] = PartialSite(keep, shape, rep, copy.deepcopy(mod.original), mod.kind)
    return replace_sites(gm, new) if new else copy.deepcopy(gm)


def partial_ok(kind: str, original: nn.Module | None = None) -> bool:
    """True when a site of `kind` can keep some of its elements: an elementwise op with no parameters
    (a per-channel PReLU slope would not survive the flat gather)."""
    entry = ops.find_kind(kind)
    return bool(entry and entry.elementwise) and not any(True for _ in (original or nn.Identity()).parameters())


def site_op(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """Return a module that computes what a non-linear node computes on its first input (a copy of its
    module, or its function with the constant arguments), or None when other inputs are graph values."""
    kind = node_kind(gm, node)
    if kind is None or any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if node.op == "call_module":
        mod = copy.deepcopy(gm.get_submodule(node.target))
        if getattr(mod, "inplace", False):
            mod.inplace = False  # the site evaluates its input twice (original and replacement)
        return mod
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_method":
        return FunctionOp(node.target.rstrip("_"), node.args[1:], kwargs, kind, method=True)
    target = node.target
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):  # an in-place spelling: use its out-of-place twin
        module = torch if hasattr(torch, name[:-1]) and getattr(torch, name, None) is target else F
        target = getattr(module, name[:-1], target)
    return FunctionOp(target, node.args[1:], kwargs, kind)


def expand_replacement(rep: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Return `rep` acting on the flattened non-kept elements (per-channel coefficients expanded)."""
    from relu_opt.activations import Poly
    from relu_opt.passes.public_poly import PublicPoly

    if not isinstance(rep, (Poly, PublicPoly)) or rep.coeffs.shape[1] == 1:
        return copy.deepcopy(rep)
    channels = torch.arange(keep.shape[0]).view(-1, *([1] * (keep.dim() - 1))).expand_as(keep)
    rest_channel = channels.reshape(-1)[~keep.reshape(-1)]
    if isinstance(rep, PublicPoly):
        return PublicPoly(rep.coeffs[:, rest_channel])
    return Poly(rep.coeffs.detach()[:, rest_channel], trainable=rep.coeffs.requires_grad)
