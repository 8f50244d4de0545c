"""Swap activation sites for other modules: identity, polynomials, masked and partial ReLUs."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from relu_opt.activations import MaskedReLU, PartialReLU
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


def linearize(gm: fx.GraphModule, factory: Callable[[], nn.Module] = nn.Identity) -> fx.GraphModule:
    """Return a copy of `gm` with every ReLU replaced by `factory()` (identity: the linear floor)."""
    return replace_sites(gm, {n.name: factory() for n in relu_nodes(gm)})


def maxpool_to_avgpool(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each nn.MaxPoolNd replaced by the AvgPool with the same window."""
    gm = copy.deepcopy(gm)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            avg = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[
                {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(mod)]
            ]
            set_submodule(
                gm,
                name,
                avg(mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode),
            )
    gm.recompile()
    return gm


def materialize_partial(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with each MaskedReLU in its export form: ReLU (mask all ones), its
    replacement (all zeros), or PartialReLU (mixed). Needs shapes (relu_opt.graph.propagate_shapes)."""
    new: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), MaskedReLU):
            continue
        mod = gm.get_submodule(node.target)
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise ValueError("materialize_partial needs shapes: run propagate_shapes first")
        shape = tuple(meta.shape[1:])
        keep = torch.broadcast_to(mod.mask, shape) > 0.5
        kept = int(keep.sum())
        if kept == math.prod(shape):
            new[node.name] = nn.ReLU()
        elif kept == 0:
            new[node.name] = copy.deepcopy(mod.replacement)
        else:
            new[node.name] = PartialReLU(keep, shape, expand_replacement(mod.replacement, keep))
    return replace_sites(gm, new) if new else copy.deepcopy(gm)


def expand_replacement(rep: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Return `rep` acting on the flattened non-kept elements (per-channel coefficients expanded)."""
    from relu_opt.activations import Poly

    if not isinstance(rep, Poly) or rep.coeffs.shape[1] == 1:
        return copy.deepcopy(rep)
    channels = torch.arange(keep.shape[0]).view(-1, *([1] * (keep.dim() - 1))).expand_as(keep)
    rest_channel = channels.reshape(-1)[~keep.reshape(-1)]
    return Poly(rep.coeffs.detach()[:, rest_channel], trainable=rep.coeffs.requires_grad)
