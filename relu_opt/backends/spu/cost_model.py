"""Predict an SPU protocol's cost (Cheetah, SEMI2K, ABY3) from a prepared graph.

Two parts, both measured with real parties (relu_opt/backends/spu/calibration.py):
- linear layers: a table of measured layers, keyed by what decides their cost (type, input shape,
  kernel, stride, padding, groups). Cheetah packs a convolution's operands into ciphertexts in steps
  that no smooth formula follows (a least-squares fit on M*K, M*N and K*N missed by up to 48%), so a
  layer the table lacks is measured once, alone, and added to the cached table. Without measuring, that
  fitted formula stands in, and `estimated` names the layers it priced.
- everything else: per-op and per-element prices per op category (relu_opt/backends/features.py),
  fitted by non-negative least squares to the calibration suite with its linear layers' table costs
  taken out. Not measured alone: Cheetah refills its OT pool in chunks, so an op alone in a program pays
  a whole refill (a square of 12,544 elements: 400 B an element alone, 309 in two residual blocks).
Three targets: bytes (both parties' sends added: what crosses the link), round trips (the quieter
party's messages) and seconds (compute, on this machine).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch.fx as fx
from torch import nn

from relu_opt.backends.base import Cost, CostModel
from relu_opt.backends.features import cost_category, node_features
from relu_opt.passes.census import meta_shape

LINEAR_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
FORMULA_TERMS = ("1", "M*K", "M*N", "K*N")


def linear_key(mod: nn.Module, in_shape: tuple[int, ...]) -> str:
    """Return what decides a conv or linear layer's cost under SPU: its type, input shape and configuration."""
    shape = "x".join(str(s) for s in in_shape)
    if isinstance(mod, nn.Linear):
        return f"linear:{shape}:{mod.out_features}:{int(mod.bias is not None)}"
    conf = (mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups, mod.bias is not None)
    return f"{type(mod).__name__.lower()}:{shape}:" + ":".join(str(c) for c in conf)


def linear_dims(mod: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return (M, K, N) of the matrix product SPU runs for a conv or linear layer at these shapes."""
    if isinstance(mod, nn.Linear):
        return math.prod(out_shape[:-1]), mod.in_features, mod.out_features
    k = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    return out_shape[0] * math.prod(out_shape[2:]), k * mod.groups, mod.out_channels


def linear_layer(gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> tuple[str, nn.Module, tuple, tuple] | None:
    """Return (key, module, input shape, output shape) at `batch` for a conv or linear node, else None."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    mod = gm.get_submodule(node.target)
    out, inp = meta_shape(node), meta_shape(node.args[0])
    if not isinstance(mod, LINEAR_MODULES) or out is None or inp is None:
        return None
    in_shape = (batch,) + tuple(inp[1:])
    return linear_key(mod, in_shape), mod, in_shape, (batch,) + tuple(out[1:])


def other_features(gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> tuple[Counter, Counter]:
    """Return (ops, elements) per category for a node that is not a linear layer."""
    f = node_features(gm, node, batch)
    return Counter(f.ops), Counter({k: v for k, v in f.elements.items() if k != "poly_coeffs"})


def _row(ops: Counter, elements: Counter, terms: list[str]) -> list[float]:
    return [float(ops.get(t[3:], 0) if t.startswith("op:") else elements.get(t, 0)) for t in terms]


@dataclass(frozen=True)
class SpuCostModel(CostModel):
    """One SPU protocol's prices: measured linear layers, fitted per-op and per-element prices for the rest
    (bytes, round trips, seconds), and the setup a fresh runtime pays once."""

    protocol: str
    parties: int
    terms: list[str]  # "op:CATEGORY" (a price per op) or a category (a price per element)
    bytes_per_term: list[float]
    trips_per_term: list[float]
    seconds_per_term: list[float]
    linear: dict[str, list[float]] = field(default_factory=dict)  # measured layers: key -> [bytes, trips, s]
    formula: list[list[float]] = field(default_factory=list)  # per target, prices of FORMULA_TERMS
    setup_bytes: float = 0.0
    setup_trips: float = 0.0
    fit_max_rel_err: float = 0.0  # on the larger half of the suite's samples, bytes
    dealer: str = "none"
    # suite model -> its measured [bytes, trips, seconds] without its linear layers (what the prices fit)
    samples: dict = field(default_factory=dict)
    estimated: set = field(default_factory=set, compare=False)  # keys priced by the formula, not measured
    measure: object = field(default=None, compare=False, repr=False)  # callable(layers) -> {key: prices}, or None

    def linear_cost(self, key: str, mod: nn.Module, in_shape: tuple, out_shape: tuple) -> list[float]:
        """Return [bytes, trips, seconds] of one linear layer: measured, else the formula's estimate."""
        if key in self.linear:
            return self.linear[key]
        self.estimated.add(key)
        m, k, n = linear_dims(mod, in_shape, out_shape)
        row = np.array([1.0, m * k, m * n, k * n])
        return [float(row @ np.array(w)) for w in self.formula] if self.formula else [0.0, 0.0, 0.0]

    def _other(self, gm: fx.GraphModule, node: fx.Node, batch: int) -> list[float]:
        ops, elements = other_features(gm, node, batch)
        if not ops and not elements:
            return [0.0, 0.0, 0.0]
        row = np.array(_row(ops, elements, self.terms))
        return [float(row @ np.array(w)) for w in (self.bytes_per_term, self.trips_per_term, self.seconds_per_term)]

    def prices(self, gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> tuple[list[float], bool]:
        """Return ([bytes, trips, seconds], is a linear layer) of one node."""
        layer = linear_layer(gm, node, batch)
        if layer is not None:
            return self.linear_cost(*layer), True
        return self._other(gm, node, batch), False

    def node_cost(self, gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> Cost:
        (nbytes, trips, _), _ = self.prices(gm, node, batch)
        return Cost(rounds=trips, bytes=nbytes, round_trips=trips)

    def cost(self, gm: fx.GraphModule, batch: int = 1) -> Cost:
        missing = self.missing(gm, batch)
        if missing and self.measure is not None:  # each layer the table lacks: measured once, then cached
            self.linear.update(self.measure(missing))
        total = super().cost(gm, batch)
        # the setup (Cheetah's OT, keys): once per runtime, paid where a dealer's traffic would be
        return Cost(total.rounds, total.bytes, self.setup_bytes, 0.0, total.round_trips, self.setup_trips)

    def split(self, gm: fx.GraphModule, batch: int = 1) -> dict[str, dict[str, float]]:
        """Return the modeled bytes, round trips and seconds of the linear layers and of the rest."""
        parts = {"linear": [0.0, 0.0, 0.0], "non-linear": [0.0, 0.0, 0.0]}
        for node in gm.graph.nodes:
            p, is_linear = self.prices(gm, node, batch)
            part = parts["linear" if is_linear else "non-linear"]
            for i, v in enumerate(p):
                part[i] += v
        return {k: dict(zip(("bytes", "round_trips", "seconds"), v)) for k, v in parts.items()}

    def linear_bytes(self, gm: fx.GraphModule, batch: int = 1) -> float:
        return self.split(gm, batch)["linear"]["bytes"]

    def missing(self, gm: fx.GraphModule, batch: int = 1) -> list[tuple[str, nn.Module, tuple, tuple]]:
        """Return the linear layers of `gm` the table lacks (one per key)."""
        seen, out = set(), []
        for node in gm.graph.nodes:
            layer = linear_layer(gm, node, batch)
            if layer is not None and layer[0] not in self.linear and layer[0] not in seen:
                seen.add(layer[0])
                out.append(layer)
        return out

    def frozen(self) -> SpuCostModel:
        return replace(self, measure=None)

    def element_bytes(self, kind: str) -> float:
        term = cost_category(kind)
        return self.bytes_per_term[self.terms.index(term)] if term in self.terms else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["estimated"], d["measure"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SpuCostModel:
        return cls(**d)


def fit_other(
    samples: list[tuple[Counter, Counter, list[float]]],
) -> tuple[list[str], list[list[float]], float]:
    """Return (terms, prices per target, the worst relative bytes error) fitted by NNLS to samples of
    (ops, elements, [bytes, trips, seconds] without the linear layers)."""
    from scipy.optimize import nnls

    cats = sorted({c for o, _, _ in samples for c in o})
    elems = sorted({e for _, e, _ in samples for e in e})
    terms = [f"op:{c}" for c in cats] + elems
    a = np.array([_row(o, e, terms) for o, e, _ in samples])
    prices, worst = [], 0.0
    for t in range(3):
        # absolute error: sites in real models have thousands of elements, where the per-element price
        # decides; the smallest samples' few bytes are noise around the setup's refills
        y = np.array([max(0.0, y[t]) for _, _, y in samples])
        x, _ = nnls(a, y)
        prices.append([round(float(v), 6) for v in x])
        if t == 0:
            big = y >= np.median(y)
            worst = float(np.max(np.abs(a @ x - y)[big] / y[big])) if big.any() else 0.0
    return terms, prices, worst


def fit_formula(rows: list[tuple[int, int, int, list[float]]]) -> list[list[float]]:
    """Return per target the NNLS prices of FORMULA_TERMS fitted to measured layers (M, K, N, targets)."""
    from scipy.optimize import nnls

    a = np.array([[1.0, m * k, m * n, k * n] for m, k, n, _ in rows])
    out = []
    for t in range(3):
        y = np.array([r[3][t] for r in rows])
        w = 1 / np.maximum(y, 1e-9)
        out.append([float(v) for v in nnls(a * w[:, None], y * w)[0]])
    return out
