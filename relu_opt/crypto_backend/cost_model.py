"""Predict CrypTen rounds and bytes from a model's graph, with per-op costs fitted to measured runs.

Features per forward: for each op category, how many ops (each costs a fixed number of rounds) and how
many elements they open (bytes scale with these). `calibrate` measures a suite of tiny models under
CrypTen and fits the per-op costs by non-negative least squares; nothing is typed in.
"""

from __future__ import annotations

import math
import operator
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from relu_opt import atomic, ops
from relu_opt.activations import ChannelAffine, MaskedReLU, Poly, Square
from relu_opt.cache import cache_dir
from relu_opt.checked_io import load_cache, read_json
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
        out = _meta_shape(node)
        if out is None:
            continue
        per_sample = math.prod(out[1:])
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            # Beaver multiplication opens both the input and the (encrypted) weights.
            in_shape = _meta_shape(node.args[0]) or out
            counts["linear"] += 1
            elements["linear"] += batch * math.prod(in_shape[1:]) + mod.weight.numel()
            continue
        if node.op == "call_function" and node.target in _MATMULS:
            # encrypted x encrypted (attention): Beaver triples open both operands
            counts["matmul"] += 1
            elements["matmul"] += batch * sum(math.prod((_meta_shape(a) or (1,))[1:]) for a in node.args[:2])
            continue
        product = _elementwise_product(node)
        if product:  # a Beaver multiplication of encrypted values outside any site
            counts[product] += 1
            elements[product] += batch * per_sample
            continue
        if isinstance(mod, ChannelAffine):
            counts["affine"] += 1
            elements["affine"] += batch * per_sample + mod.scale.numel()
            continue
        if isinstance(mod, _AVG):
            counts["avgpool"] += 1
            elements["avgpool"] += batch * per_sample
            continue
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


def calibration_suite() -> list[tuple[str, nn.Module]]:
    """Return tiny models whose op counts vary independently, to fit the per-op costs."""
    from relu_opt.replacements import TwoQuad

    torch.manual_seed(0)

    def conv(cin=3, cout=8):
        return nn.Conv2d(cin, cout, 3, padding=1)

    half = (torch.arange(16) % 2 == 0).float().view(16, 1, 1)

    return [
        ("conv", nn.Sequential(conv())),
        ("conv_wide", nn.Sequential(conv(3, 16))),
        ("linear", nn.Sequential(nn.Flatten(), nn.Linear(192, 10))),
        ("relu", nn.Sequential(conv(), nn.ReLU())),
        ("relu_wide", nn.Sequential(conv(3, 16), nn.ReLU())),
        ("relu_twice", nn.Sequential(conv(), nn.ReLU(), conv(8, 8), nn.ReLU())),
        ("poly", nn.Sequential(conv(), Poly(torch.randn(3, 8) * 0.1))),
        ("poly_wide", nn.Sequential(conv(3, 16), Poly(torch.randn(3, 16) * 0.1))),
        ("square", nn.Sequential(conv(), Square())),
        ("partial_poly", nn.Sequential(conv(3, 16), MaskedReLU(half, Poly(torch.randn(3, 16) * 0.1)))),
        ("maxpool", nn.Sequential(conv(), nn.MaxPool2d(2))),
        ("avgpool", nn.Sequential(conv(), nn.AvgPool2d(2))),
        # The affine comes before a padded conv: after one, the PI passes fuse it (fuse_linear).
        ("affine", nn.Sequential(ChannelAffine(torch.rand(3) + 0.5, torch.randn(3)), conv())),
        ("relu6", nn.Sequential(conv(), nn.ReLU6())),
        ("hardswish", nn.Sequential(conv(3, 16), nn.Hardswish())),
        ("sigmoid", nn.Sequential(conv(), nn.Sigmoid())),
        ("silu", nn.Sequential(conv(), nn.SiLU())),
        ("gelu", nn.Sequential(conv(), nn.GELU())),
        ("tanh", nn.Sequential(conv(), nn.Tanh())),
        ("softmax", nn.Sequential(conv(), nn.Softmax(-1))),
        ("softmax_wide", nn.Sequential(conv(3, 16), nn.Softmax(-1))),
        ("layernorm", nn.Sequential(conv(), nn.LayerNorm(8))),
        ("layernorm_wide", nn.Sequential(conv(3, 16), nn.LayerNorm(8))),
        ("rsqrt", nn.Sequential(conv(), _Rsqrt())),
        ("matmul", nn.Sequential(conv(), _SelfProduct())),
        ("2quad", nn.Sequential(conv(), TwoQuad(8))),
        ("2quad_wide", nn.Sequential(conv(3, 16), TwoQuad(8))),
        ("mul", nn.Sequential(conv(), _Gate())),
        ("mul_wide", nn.Sequential(conv(3, 16), _Gate())),
    ]


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x + 1)


class _SelfProduct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (x * 0.5).transpose(-1, -2)


class _Rsqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x * x + 1)


# Bump when a suite model or a lowering it goes through changes (GELU by sigmoid: 2; products: 3).
SUITE_VERSION = 3


def suite_key() -> str:
    """Return a short hash of the calibration suite, so a changed suite is measured anew."""
    import hashlib

    names = ",".join(n for n, _ in calibration_suite())
    return hashlib.sha1(f"{SUITE_VERSION}:{names}".encode()).hexdigest()[:8]


CALIBRATION_INPUT = (1, 3, 8, 8)


def calibrate(
    parties: int = 2, timeout: float = 300, refresh: bool = False, cache: str | os.PathLike | None = None
) -> CostModel:
    """Return the CostModel for `parties`, measured once under CrypTen and cached as JSON in `cache`."""
    from relu_opt.crypto_backend.bench import measure

    path = Path(cache or cache_dir()) / f"cost_model_{parties}p_crypten{_crypten_version()}_{suite_key()}.json"
    cached = None if refresh else load_cache(path, lambda p: CostModel.from_dict(read_json(p, what="cost model")))
    if cached is not None:
        return cached
    x = torch.randn(CALIBRATION_INPUT)
    runs = measure(calibration_suite(), x, parties=parties, runs=1, warmup=0, timeout=timeout)
    model = fit([(r.features, r.rounds, max(r.bytes_per_party)) for r in runs], parties)
    atomic.write_json(path, model.to_dict())
    return model


def _crypten_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crypten")
    except PackageNotFoundError:
        return "unknown"
