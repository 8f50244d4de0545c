"""Cost features of a prepared graph, shared by every backend's cost model: for each op category, how many
ops, how many elements they open or touch, and how many elements they output (what per-op and
per-element prices multiply)."""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from relu_opt import ops
from relu_opt.activations import ChannelAffine, Poly
from relu_opt.passes.census import meta_shape, node_ops

# Features the calibration suite measures: linear parts, and every non-linear kind CrypTen runs (as
# lowered by relu_opt/backends/crypten/lower.py). A kind outside this list counts under its op-table cost category.
CATEGORIES = (
    "linear",
    "affine",
    "relu",
    "poly",
    "square",
    "maxpool",
    "avgpool",
    "relu6",
    "sigmoid",
    "silu",
    "gelu",
    "tanh",
    "softmax",
    "layernorm",
    "rsqrt",
    "matmul",
    "2quad",
    "mul",
)
_MATMULS = (torch.matmul, torch.bmm, operator.matmul)
_MULS = (operator.mul, torch.mul)
_POWS = (operator.pow, torch.pow)


def _elementwise_product(node: fx.Node) -> str | None:
    """Return "mul" for a product of two graph values, "square" for x ** 2 (one round each), else None."""
    if node.op == "call_function" and node.target in _MULS or node.op == "call_method" and node.target == "mul":
        return "mul" if all(isinstance(a, fx.Node) for a in node.args[:2]) else None
    if node.op == "call_function" and node.target in _POWS or node.op == "call_method" and node.target == "pow":
        return "square" if len(node.args) > 1 and node.args[1] == 2 else None
    return None


BYTE_TERMS = CATEGORIES + ("poly_coeffs",)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def cost_category(kind: str) -> str:
    """Return the cost-model feature a kind is counted under: itself when the calibration suite
    measures it, else its op-table cost category (e.g. "transcendental")."""
    if kind in CATEGORIES:
        return kind
    entry = ops.find_kind(kind)
    return entry.cost if entry else kind


@dataclass(frozen=True)
class CostFeatures:
    """Ops, opened elements and output elements per category for one forward at `batch`."""

    ops: dict[str, int]
    elements: dict[str, int]
    outputs: dict[str, int] = field(default_factory=dict)


def features(gm: fx.GraphModule, batch: int = 1) -> CostFeatures:
    """Return the cost features of a shape-propagated, CrypTen-prepared GraphModule."""
    counts, elements, outputs = Counter(), Counter(), Counter()
    for node in gm.graph.nodes:
        f = node_features(gm, node, batch)
        counts.update(f.ops)
        elements.update(f.elements)
        outputs.update(f.outputs)
    return CostFeatures(dict(counts), dict(elements), dict(outputs))


def node_features(gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> CostFeatures:
    """Return the cost features of one node of a shape-propagated, CrypTen-prepared GraphModule."""
    counts, elements, outputs = Counter(), Counter(), Counter()
    out = meta_shape(node)
    if out is None:
        return CostFeatures({}, {})
    per_sample = math.prod(out[1:])
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    product = _elementwise_product(node)
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        # Beaver multiplication opens both the input and the (encrypted) weights.
        in_shape = meta_shape(node.args[0]) or out
        counts["linear"] += 1
        elements["linear"] += batch * math.prod(in_shape[1:]) + mod.weight.numel()
    elif node.op == "call_function" and node.target in _MATMULS:
        # encrypted x encrypted (attention): Beaver triples open both operands
        counts["matmul"] += 1
        elements["matmul"] += batch * sum(math.prod((meta_shape(a) or (1,))[1:]) for a in node.args[:2])
    elif product:  # a Beaver multiplication of encrypted values outside any site
        counts[product] += 1
        elements[product] += batch * per_sample
    elif isinstance(mod, ChannelAffine):
        counts["affine"] += 1
        elements["affine"] += batch * per_sample + mod.scale.numel()
    elif isinstance(mod, _AVG):
        counts["avgpool"] += 1
        elements["avgpool"] += batch * per_sample
    else:
        # A module may cost less than its census kind says (PublicPoly: its powers only, as squares).
        custom = getattr(mod, "cost_items", None)
        for kind, n in custom(out[1:]) if callable(custom) else node_ops(gm, node):
            category = cost_category(kind)
            if n:
                counts[category] += 1
                elements[category] += batch * n
                outputs[category] += batch * n  # the dealer's triples are the size of the op's results
        poly = mod if isinstance(mod, Poly) else getattr(mod, "replacement", None)
        if isinstance(poly, Poly):  # its (encrypted) coefficients are opened once per multiplication
            elements["poly_coeffs"] += poly.degree * poly.coeffs.shape[1]
    for c in counts:
        outputs.setdefault(c, batch * per_sample)
    return CostFeatures(dict(counts), dict(elements), dict(outputs))
