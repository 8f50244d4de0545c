"""Census pass: every non-linear site of a traced model, its elements per sample and feeding MACs."""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relu_opt import ops
from relu_opt.ops import KIND_META, node_kind

# Kinds whose evaluation needs secure comparisons (read from the op table when imported).
COMPARISON_KINDS = tuple(k.name for k in ops.all_kinds() if k.comparisons)


@dataclass(frozen=True)
class Site:
    """One non-linear operation: `elements` is per sample (comparisons, for max-pool)."""

    name: str
    target: str
    kind: str
    shape: tuple[int, ...]
    elements: int
    share: float
    macs: int
    position: int

    @property
    def comparisons(self) -> int:
        """Return the secure comparisons per sample this site costs (0 for comparison-free kinds)."""
        return self.elements * ops.comparisons_per_element(self.kind)


@dataclass(frozen=True)
class Census:
    """Every non-linear site of a model plus its totals."""

    model: str
    input_shape: tuple[int, ...]
    sites: tuple[Site, ...]
    totals_by_kind: dict[str, int]
    total_macs: int
    params: int

    @property
    def total_relu(self) -> int:
        return self.totals_by_kind.get("relu", 0)

    @property
    def total_comparisons(self) -> int:
        """Return the secure comparisons per sample of every site (ReLU, ReLU6, max-pool, ...)."""
        return sum(s.comparisons for s in self.sites)

    def of_kind(self, kind: str) -> list[Site]:
        """Return the sites of one kind, in graph order."""
        return [s for s in self.sites if s.kind == kind]

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (the schema `relu-opt count --json` writes)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "total_relu": self.total_relu,
            "total_comparisons": self.total_comparisons,
            "total_macs": self.total_macs,
            "params": self.params,
            "sites": [{**asdict(s), "shape": list(s.shape), "comparisons": s.comparisons} for s in self.sites],
            "totals_by_kind": dict(self.totals_by_kind),
        }


@dataclass
class _Item:
    node: fx.Node
    target: str
    kind: str
    elements: int
    shape: tuple[int, ...] = field(default=())


def meta_shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _per_sample(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return ops.node_arg(node, index, name, default)


def _maxpool_comparisons(node: fx.Node, mod: nn.Module | None, out: tuple[int, ...]) -> int:
    in_shape = meta_shape(node.args[0]) or out
    ndim = len(out) - 2
    if mod is not None:
        k = getattr(mod, "kernel_size", None)
        out_size = getattr(mod, "output_size", None)
    else:
        k = _arg(node, 1, "kernel_size")
        out_size = _arg(node, 1, "output_size") if "adaptive" in node.target.__name__ else None
        k = None if out_size is not None else k
    if k is None:  # adaptive: the largest window it can use
        k = [math.ceil(i / o) for i, o in zip(in_shape[2:], out[2:])]
    k = [k] * ndim if isinstance(k, int) else list(k)
    return _per_sample(out) * (math.prod(k) - 1)


def node_ops(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[str, int], ...]:
    """Return the (kind, elements per sample) pairs a node computes; empty for linear nodes.

    Read from `node.meta` when `annotate` has recorded them, else derived from the op table."""
    if KIND_META in node.meta:
        return node.meta[KIND_META]
    return _classify(gm, node)


def _classify(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[str, int], ...]:
    out = meta_shape(node)
    if out is None:
        return ()
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    custom = getattr(mod, "census_items", None)
    if callable(custom):  # relu-opt's own activations report what they compute
        return tuple((k, int(n)) for k, n in custom(out[1:]))
    kind = node_kind(gm, node)
    if kind is None:
        return ()
    if kind == "maxpool":
        return ((kind, _maxpool_comparisons(node, mod, out)),)
    return ((kind, _per_sample(out)),)


def annotate(gm: fx.GraphModule) -> fx.GraphModule:
    """Record each node's (kind, elements per sample) pairs in `node.meta` (in place); returns `gm`.

    Needs shapes (relu_opt.graph.propagate_shapes); nodes without a shape are left unannotated."""
    for node in gm.graph.nodes:
        node.meta.pop(KIND_META, None)
        if meta_shape(node) is not None:
            node.meta[KIND_META] = _classify(gm, node)
    return gm


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Return the multiply-accumulates per sample of a conv, linear or matmul node (else 0)."""
    out = meta_shape(node)
    if out is None:
        return 0
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            # Each output (input, when transposed) element is a dot product over weight[1:].
            src = meta_shape(node.args[0]) if mod.transposed else out
            return _per_sample(src or out) * math.prod(mod.weight.shape[1:])
        if isinstance(mod, nn.Linear):
            return _per_sample(out) * mod.in_features
        return 0
    if node.op == "call_function":
        if node.target in (F.conv1d, F.conv2d, F.conv3d):
            w = meta_shape(_arg(node, 1, "weight"))
            return _per_sample(out) * math.prod(w[1:]) if w else 0
        if node.target is F.linear:
            w = meta_shape(_arg(node, 1, "weight"))
            return _per_sample(out) * w[-1] if w else 0
        if node.target in (torch.matmul, torch.bmm, torch.mm, operator.matmul):
            a = meta_shape(node.args[0])
            return _per_sample(out) * a[-1] if a else 0
    return 0


def _feeding_macs(gm: fx.GraphModule, node: fx.Node, site_nodes: set[fx.Node]) -> int:
    """Sum the MACs of the linear layers reached backwards from `node` before another site."""
    total, seen = 0, set()
    stack = [a for a in node.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or n.op in ("placeholder", "get_attr") or n in site_nodes:
            continue
        seen.add(n)
        macs = node_macs(gm, n)
        if macs:
            total += macs
        else:
            stack.extend(n.all_input_nodes)
    return total


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        return f"{mod}.{node.target.__name__}".lstrip(".")
    return str(node.target)


def census_of(model: nn.Module, example: torch.Tensor, name: str = "", leaf=()) -> Census:
    """Return the Census of `model` traced (with `leaf` classes opaque) and shape-propagated on `example`."""
    from relu_opt.graph import propagate_shapes, trace

    gm = propagate_shapes(trace(model, leaf), example)
    return census(gm, name or type(model).__name__, tuple(example.shape))


def census(gm: fx.GraphModule, model_name: str = "", input_shape: tuple[int, ...] = ()) -> Census:
    """Return the Census of a shape-propagated GraphModule (see relu_opt.graph.propagate_shapes)."""
    items: list[_Item] = []
    annotate(gm)
    for node in gm.graph.nodes:
        for kind, elements in node_ops(gm, node):
            items.append(_Item(node, _target_name(node), kind, int(elements), meta_shape(node)[1:]))
    totals = Counter()
    for it in items:
        totals[it.kind] += it.elements
    site_nodes = {it.node for it in items}
    positions = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = tuple(
        Site(
            name=it.node.name,
            target=it.target,
            kind=it.kind,
            shape=it.shape,
            elements=it.elements,
            share=it.elements / totals[it.kind] if totals[it.kind] else 0.0,
            macs=_feeding_macs(gm, it.node, site_nodes),
            position=positions[it.node],
        )
        for it in items
    )
    return Census(
        model=model_name,
        input_shape=tuple(input_shape),
        sites=sites,
        totals_by_kind=dict(totals),
        total_macs=sum(node_macs(gm, n) for n in gm.graph.nodes),
        params=sum(p.numel() for p in gm.parameters()),
    )
