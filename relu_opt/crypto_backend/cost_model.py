"""Predict CrypTen rounds and bytes from a model's graph, with per-op costs fitted to measured runs.

Features per forward: for each op category, how many ops (each costs a fixed number of rounds) and how
many elements they open (bytes scale with these). `fit` fits the per-op costs by non-negative least
squares to measured runs; `cost_calibration.calibrate` measures its suite of tiny models under CrypTen
and caches the fitted model, so nothing is typed in.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from relu_opt import ops
from relu_opt.activations import ChannelAffine, Poly
from relu_opt.passes.census import _meta_shape, node_ops

# Features the calibration suite measures: linear parts, and every non-linear kind CrypTen runs (as
# lowered by relu_opt/passes/lower.py). A kind outside this list counts under its op-table cost category.
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


@dataclass(frozen=True)
class Network:
    """A network profile: round-trip time, and bandwidth in each direction of a full-duplex link."""

    name: str
    rtt_s: float
    bandwidth_Bps: float  # per direction

    def transfer_s(self, sent: Sequence[float], received: Sequence[float]) -> float:
        """Return the seconds the link needs to carry every party's traffic: both directions carry data
        at once, so the busiest direction of any party sets the time (not the sum of both)."""
        return max([*sent, *received, 0.0]) / self.bandwidth_Bps

    def latency(self, compute_s: float, rounds: float, sent: Sequence[float], received: Sequence[float]) -> float:
        """Return compute time + rounds x RTT + transfer time, in seconds (bytes per party per direction)."""
        return compute_s + rounds * self.rtt_s + self.transfer_s(sent, received)

    def communication_s(self, rounds: float, nbytes: float) -> float:
        """Return the seconds of `rounds` and of CrypTen's byte count per party (both directions added, so
        half goes each way on a full-duplex link), without compute: what the cost model prices."""
        return self.latency(0.0, rounds, [nbytes / 2], [nbytes / 2])


LAN = Network("lan", 0.5e-3, 1e9)
WAN = Network("wan", 40e-3, 100e6)


def parse_network(name: str, text: str) -> Network:
    """Return a Network from 'RTT_MS,MB_PER_S' (e.g. '40,100')."""
    try:
        rtt, bw = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} '{text}' must be RTT_MS,MB_PER_S, e.g. 40,100") from None
    return Network(name, rtt / 1e3, bw * 1e6)


def cost_category(kind: str) -> str:
    """Return the cost-model feature a kind is counted under: itself when the calibration suite
    measures it, else its op-table cost category (e.g. "transcendental")."""
    if kind in CATEGORIES:
        return kind
    entry = ops.find_kind(kind)
    return entry.cost if entry else kind


@dataclass(frozen=True)
class CostFeatures:
    """Ops and opened elements per category for one forward at `batch`."""

    ops: dict[str, int]
    elements: dict[str, int]


def features(gm: fx.GraphModule, batch: int = 1) -> CostFeatures:
    """Return the cost features of a shape-propagated, PI-prepared GraphModule."""
    counts, elements = Counter(), Counter()
    for node in gm.graph.nodes:
        f = node_features(gm, node, batch)
        counts.update(f.ops)
        elements.update(f.elements)
    return CostFeatures(dict(counts), dict(elements))


def node_features(gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> CostFeatures:
    """Return the cost features of one node of a shape-propagated, PI-prepared GraphModule."""
    counts, elements = Counter(), Counter()
    out = _meta_shape(node)
    if out is None:
        return CostFeatures({}, {})
    per_sample = math.prod(out[1:])
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    product = _elementwise_product(node)
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        # Beaver multiplication opens both the input and the (encrypted) weights.
        in_shape = _meta_shape(node.args[0]) or out
        counts["linear"] += 1
        elements["linear"] += batch * math.prod(in_shape[1:]) + mod.weight.numel()
    elif node.op == "call_function" and node.target in _MATMULS:
        # encrypted x encrypted (attention): Beaver triples open both operands
        counts["matmul"] += 1
        elements["matmul"] += batch * sum(math.prod((_meta_shape(a) or (1,))[1:]) for a in node.args[:2])
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
        poly = mod if isinstance(mod, Poly) else getattr(mod, "replacement", None)
        if isinstance(poly, Poly):  # its (encrypted) coefficients are opened once per multiplication
            elements["poly_coeffs"] += poly.degree * poly.coeffs.shape[1]
    return CostFeatures(dict(counts), dict(elements))


@dataclass(frozen=True)
class CostModel:
    """Per-op rounds and per-element bytes for one party count, fitted to measured runs."""

    parties: int
    rounds_per_op: dict[str, float]
    bytes_per_element: dict[str, float]
    fit_max_rel_err: float = 0.0

    def rounds(self, f: CostFeatures) -> float:
        """Return the predicted communication rounds of one forward."""
        return sum(self.rounds_per_op.get(k, 0.0) * v for k, v in f.ops.items())

    def bytes(self, f: CostFeatures) -> float:
        """Return the predicted bytes per party of one forward."""
        return sum(self.bytes_per_element.get(k, 0.0) * v for k, v in f.elements.items())

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**d)


def fit(samples: list[tuple[CostFeatures, float, float]], parties: int) -> CostModel:
    """Return the CostModel fitted (NNLS) to (features, measured rounds, measured bytes) samples."""
    from scipy.optimize import nnls

    ops = [c for c in CATEGORIES if any(f.ops.get(c) for f, _, _ in samples)]
    terms = [c for c in BYTE_TERMS if any(f.elements.get(c) for f, _, _ in samples)]
    a_r = np.array([[f.ops.get(c, 0) for c in ops] for f, _, _ in samples], dtype=float)
    a_b = np.array([[f.elements.get(c, 0) for c in terms] for f, _, _ in samples], dtype=float)
    r = np.array([s[1] for s in samples], dtype=float)
    b = np.array([s[2] for s in samples], dtype=float)
    xr, _ = nnls(a_r, r)
    xb, _ = nnls(a_b, b)
    rel = max(
        float(np.max(np.abs(a_r @ xr - r) / np.maximum(r, 1))),
        float(np.max(np.abs(a_b @ xb - b) / np.maximum(b, 1))),
    )
    return CostModel(
        parties,
        {c: round(float(v), 4) for c, v in zip(ops, xr)},
        {c: round(float(v), 4) for c, v in zip(terms, xb)},
        rel,
    )
