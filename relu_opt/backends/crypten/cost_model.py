"""Predict CrypTen's cost from a model's graph, with per-op prices fitted to measured runs.

Features per forward: for each op category, how many ops (each costs a fixed number of rounds and of
requests to the dealer), how many elements they open (online bytes scale with these) and how many
elements they output (the dealer's triples are the size of the results). `fit` fits the prices by
non-negative least squares to measured runs; `calibration.calibrate` measures its suite of tiny models
under CrypTen and caches the fitted model, so nothing is typed in.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from relu_opt import ops
from relu_opt.activations import ChannelAffine, Poly
from relu_opt.backends.base import Cost, CostModel
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


@dataclass(frozen=True)
class CrypTenCostModel(CostModel):
    """Per-op rounds and dealer requests, per-element online bytes and per-output-element offline bytes,
    for one party count and dealer, fitted to measured runs."""

    parties: int
    rounds_per_op: dict[str, float]
    bytes_per_element: dict[str, float]
    fit_max_rel_err: float = 0.0
    dealer: str = "third-party"
    requests_per_op: dict[str, float] = field(default_factory=dict)
    offline_bytes_per_output: dict[str, float] = field(default_factory=dict)
    offline_bytes_per_request: float = 0.0  # the request message and the size it is answered with
    round_trips_per_op: dict[str, float] = field(default_factory=dict)  # of the link, online
    offline_round_trips_per_op: dict[str, float] = field(default_factory=dict)  # waiting for the dealer

    def rounds(self, f: CostFeatures) -> float:
        """Return the predicted online rounds of one forward."""
        return sum(self.rounds_per_op.get(k, 0.0) * v for k, v in f.ops.items())

    def bytes(self, f: CostFeatures) -> float:
        """Return the predicted online bytes per party of one forward (CrypTen's count)."""
        return sum(self.bytes_per_element.get(k, 0.0) * v for k, v in f.elements.items())

    def price(self, f: CostFeatures) -> Cost:
        """Return the Cost of features `f`."""

        def per_op(table: dict[str, float]) -> float:
            return sum(table.get(k, 0.0) * v for k, v in f.ops.items())

        requests = per_op(self.requests_per_op)
        triples = sum(self.offline_bytes_per_output.get(k, 0.0) * v for k, v in f.outputs.items())
        return Cost(
            self.rounds(f),
            self.bytes(f),
            triples + self.offline_bytes_per_request * requests,
            requests,
            per_op(self.round_trips_per_op),
            per_op(self.offline_round_trips_per_op),
        )

    def node_cost(self, gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> Cost:
        return self.price(node_features(gm, node, batch))

    def cost(self, gm: fx.GraphModule, batch: int = 1) -> Cost:
        return self.price(features(gm, batch))

    def element_bytes(self, kind: str) -> float:
        return self.bytes_per_element.get(cost_category(kind), 0.0)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CrypTenCostModel:
        if "round_trips_per_op" not in d:  # measured before round trips were: a cache to measure again
            raise KeyError("round_trips_per_op")
        return cls(**d)


@dataclass(frozen=True)
class Sample:
    """One calibration model's measured forward."""

    features: CostFeatures
    rounds: float
    bytes: float
    offline_bytes: float = 0.0
    requests: float = 0.0
    round_trips: float = 0.0
    offline_round_trips: float = 0.0


def _nnls(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import nnls

    x, _ = nnls(a, y)
    return x, float(np.max(np.abs(a @ x - y) / np.maximum(y, 1))) if len(y) else 0.0


def fit(samples: list[Sample], parties: int, dealer: str = "third-party") -> CrypTenCostModel:
    """Return the CrypTenCostModel fitted (NNLS) to measured samples."""
    ops = [c for c in CATEGORIES if any(s.features.ops.get(c) for s in samples)]
    terms = [c for c in BYTE_TERMS if any(s.features.elements.get(c) for s in samples)]
    outs = [c for c in CATEGORIES if any(s.features.outputs.get(c) for s in samples)]
    a_ops = np.array([[s.features.ops.get(c, 0) for c in ops] for s in samples], dtype=float)
    a_el = np.array([[s.features.elements.get(c, 0) for c in terms] for s in samples], dtype=float)
    # offline bytes: the triples (the size of each op's results) and a message per request
    a_out = np.array([[s.features.outputs.get(c, 0) for c in outs] + [s.requests] for s in samples], dtype=float)
    xr, er = _nnls(a_ops, np.array([s.rounds for s in samples], dtype=float))
    xb, eb = _nnls(a_el, np.array([s.bytes for s in samples], dtype=float))
    xo, eo = _nnls(a_out, np.array([s.offline_bytes for s in samples], dtype=float))
    xq, eq = _nnls(a_ops, np.array([s.requests for s in samples], dtype=float))
    xt, et = _nnls(a_ops, np.array([s.round_trips for s in samples], dtype=float))
    xu, eu = _nnls(a_ops, np.array([s.offline_round_trips for s in samples], dtype=float))

    def table(names, values) -> dict[str, float]:
        return {c: round(float(v), 4) for c, v in zip(names, values) if v}

    return CrypTenCostModel(
        parties,
        {c: round(float(v), 4) for c, v in zip(ops, xr)},
        {c: round(float(v), 4) for c, v in zip(terms, xb)},
        max(er, eb, eo, eq, et, eu),
        dealer,
        table(ops, xq),
        table(outs, xo[:-1]),
        round(float(xo[-1]), 4),
        {c: round(float(v), 4) for c, v in zip(ops, xt)},
        table(ops, xu),
    )
