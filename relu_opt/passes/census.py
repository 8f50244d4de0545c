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

# Kinds whose evaluation needs secure comparisons; "relu" is the one budgets count.
COMPARISON_KINDS = ("relu", "hardtanh", "leaky_relu", "prelu", "maxpool", "hardswish", "clamp")

_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"),
    (nn.Hardtanh, "hardtanh"),  # ReLU6 is a Hardtanh
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.MaxPool1d, "maxpool"),
    (nn.MaxPool2d, "maxpool"),
    (nn.MaxPool3d, "maxpool"),
    (nn.AdaptiveMaxPool1d, "maxpool"),
    (nn.AdaptiveMaxPool2d, "maxpool"),
    (nn.AdaptiveMaxPool3d, "maxpool"),
    (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.ELU, "elu"),
    (nn.SELU, "elu"),
    (nn.Softplus, "softplus"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "softmax"),
    (nn.LayerNorm, "layernorm"),
    (nn.GroupNorm, "layernorm"),
)

_FUNCTION_KINDS: dict = {
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu: "relu",
    F.relu_: "relu",
    F.relu6: "hardtanh",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.max_pool1d: "maxpool",
    F.max_pool2d: "maxpool",
    F.max_pool3d: "maxpool",
    F.adaptive_max_pool1d: "maxpool",
    F.adaptive_max_pool2d: "maxpool",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.elu: "elu",
    F.selu: "elu",
    F.softplus: "softplus",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.softmax: "softmax",
    torch.log_softmax: "softmax",
    F.softmax: "softmax",
    F.log_softmax: "softmax",
    F.layer_norm: "layernorm",
    F.group_norm: "layernorm",
    torch.rsqrt: "rsqrt",
}

_METHOD_KINDS = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "rsqrt": "rsqrt",
}

_CLAMPS = {torch.clamp, torch.clip, torch.clamp_, torch.clamp_min, torch.clamp_min_}
_CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"}


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

    def of_kind(self, kind: str) -> list[Site]:
        """Return the sites of one kind, in graph order."""
        return [s for s in self.sites if s.kind == kind]

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (the schema `relu-opt count --json` writes)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "total_relu": self.total_relu,
            "total_macs": self.total_macs,
            "params": self.params,
            "sites": [{**asdict(s), "shape": list(s.shape)} for s in self.sites],
            "totals_by_kind": dict(self.totals_by_kind),
        }


@dataclass
class _Item:
    node: fx.Node
    target: str
    kind: str
    elements: int
    shape: tuple[int, ...] = field(default=())


def _meta_shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _per_sample(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _clamp_kind(node: fx.Node, is_method: bool) -> str | None:
    name = node.target if is_method else node.target.__name__
    lo = _arg(node, 1, "min")
    hi = None if "clamp_min" in name else _arg(node, 2, "max")
    if isinstance(lo, (int, float)) and lo == 0 and hi is None:
        return "relu"
    return "hardtanh" if lo is not None and hi is not None else "clamp"


def _maxpool_comparisons(node: fx.Node, mod: nn.Module | None, out: tuple[int, ...]) -> int:
    in_shape = _meta_shape(node.args[0]) or out
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


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Return the census kind of a standard non-linear op node (None for anything else)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return next((kind for cls, kind in _MODULE_KINDS if isinstance(mod, cls)), None)
    if node.op == "call_function":
        if node.target in _CLAMPS:
            return _clamp_kind(node, False)
        if node.target is F.threshold:
            return "relu" if _arg(node, 1, "threshold") == 0 and _arg(node, 2, "value") == 0 else "clamp"
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        if node.target in _CLAMP_METHODS:
            return _clamp_kind(node, True)
        return _METHOD_KINDS.get(node.target)
    return None


def _classify(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, int]]:
    """Return (kind, elements per sample) pairs for a node; empty for linear nodes."""
    out = _meta_shape(node)
    if out is None:
        return []
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    custom = getattr(mod, "census_items", None)
    if callable(custom):  # relu-opt's own activations report what they compute
        return list(custom(out[1:]))
    kind = node_kind(gm, node)
    if kind is None:
        return []
    numel = _per_sample(out)
    if kind == "maxpool":
        return [(kind, _maxpool_comparisons(node, mod, out))]
    if kind == "layernorm":
        if isinstance(mod, nn.LayerNorm):
            return [(kind, numel // math.prod(mod.normalized_shape))]
        if isinstance(mod, nn.GroupNorm):
            return [(kind, mod.num_groups)]
        if node.target is F.layer_norm:
            return [(kind, numel // math.prod(_arg(node, 1, "normalized_shape")))]
        return [(kind, _arg(node, 1, "num_groups"))]
    return [(kind, numel)]


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Return the multiply-accumulates per sample of a conv, linear or matmul node (else 0)."""
    out = _meta_shape(node)
    if out is None:
        return 0
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            # Each output (input, when transposed) element is a dot product over weight[1:].
            src = _meta_shape(node.args[0]) if mod.transposed else out
            return _per_sample(src or out) * math.prod(mod.weight.shape[1:])
        if isinstance(mod, nn.Linear):
            return _per_sample(out) * mod.in_features
        return 0
    if node.op == "call_function":
        if node.target in (F.conv1d, F.conv2d, F.conv3d):
            w = _meta_shape(_arg(node, 1, "weight"))
            return _per_sample(out) * math.prod(w[1:]) if w else 0
        if node.target is F.linear:
            w = _meta_shape(_arg(node, 1, "weight"))
            return _per_sample(out) * w[-1] if w else 0
        if node.target in (torch.matmul, torch.bmm, torch.mm, operator.matmul):
            a = _meta_shape(node.args[0])
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


def census(gm: fx.GraphModule, model_name: str = "", input_shape: tuple[int, ...] = ()) -> Census:
    """Return the Census of a shape-propagated GraphModule (see relu_opt.graph.propagate_shapes)."""
    items: list[_Item] = []
    for node in gm.graph.nodes:
        for kind, elements in _classify(gm, node):
            items.append(_Item(node, _target_name(node), kind, int(elements), _meta_shape(node)[1:]))
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
