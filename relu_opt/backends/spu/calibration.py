"""The SPU cost model's calibration, measured with real parties under one protocol and cached as JSON
(named by protocol, party count, dealer, SPU version and the suite's hash):
- linear layers: common conv and linear shapes, measured alone into the table (and a formula fitted to
  them for layers priced without measuring); later, every layer a priced graph has and the table lacks;
- every other op category: each kind after a small conv, at about 1,000 and 12,500 elements, so per-op
  and per-element prices separate once the conv's table cost is taken out."""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from relu_opt import atomic
from relu_opt.activations import ChannelAffine, MaskedReLU, Poly, Square
from relu_opt.backends.base import package_version
from relu_opt.backends.spu.cost_model import (
    SpuCostModel,
    fit_formula,
    fit_other,
    linear_dims,
    linear_layer,
    other_features,
)
from relu_opt.cache import cache_dir
from relu_opt.checked_io import load_cache, read_json

SUITE_VERSION = 4  # 2: each op between two convs; 3: the large ones in residual blocks; 4: cheap kinds only
SMALL, MIDDLE, LARGE = (1, 3, 8, 8), (1, 3, 16, 16), (1, 16, 28, 28)
CHEAP = ("relu", "square", "poly", "partial_poly", "maxpool", "avgpool", "relu6", "mul")


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x + 1)


class _Block(nn.Module):
    """A residual block: b(conv(a(conv(x))) + x)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.c1, self.a, self.c2, self.b = _conv(16, 16), a, _conv(16, 16), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c2(self.a(self.c1(x))) + x)


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2)


def linear_suite() -> list[tuple[tuple[int, ...], nn.Module]]:
    """Return the linear layers the table starts with: the conv and linear shapes of small CNNs on 28x28 and
    32x32 inputs, a few input shapes (each one launch of the parties)."""
    torch.manual_seed(0)
    return [
        ((1, 16, 28, 28), _conv(16, 16)),
        ((1, 16, 28, 28), _conv(16, 32, 2)),
        ((1, 16, 28, 28), _conv(16, 32, 2, 1)),
        ((1, 32, 14, 14), _conv(32, 32)),
        ((1, 32, 14, 14), _conv(32, 64, 2)),
        ((1, 32, 14, 14), _conv(32, 64, 2, 1)),
        ((1, 64, 7, 7), _conv(64, 64)),
        ((1, 64, 7, 7), _conv(64, 10, 1, 1)),
        ((1, 64), nn.Linear(64, 10)),
        ((1, 64), nn.Linear(64, 256)),
    ]


def calibration_suite() -> list[tuple[str, tuple[int, ...], nn.Module]]:
    """Return (name, input shape, model): each non-linear kind after a conv, at two sizes."""
    from relu_opt.replacements import TwoQuad

    torch.manual_seed(0)
    kinds = {
        "relu": lambda c, w: nn.ReLU(),
        "square": lambda c, w: Square(),
        "poly": lambda c, w: Poly(torch.randn(3, c) * 0.1),
        "partial_poly": lambda c, w: MaskedReLU(
            (torch.arange(c) % 2 == 0).float().view(c, 1, 1), Poly(torch.randn(3, c) * 0.1)
        ),
        "maxpool": lambda c, w: nn.MaxPool2d(2),
        "avgpool": lambda c, w: nn.AvgPool2d(2),
        "relu6": lambda c, w: nn.ReLU6(),
        "sigmoid": lambda c, w: nn.Sigmoid(),
        "silu": lambda c, w: nn.SiLU(),
        "tanh": lambda c, w: nn.Tanh(),
        "softmax": lambda c, w: nn.Softmax(-1),
        "layernorm": lambda c, w: nn.LayerNorm(w),
        "2quad": lambda c, w: TwoQuad(w),
        "mul": lambda c, w: _Gate(),
    }
    out = []
    for name, make in kinds.items():  # the costly kinds at a middle size: their per-element price is large anyway
        big = LARGE if name in CHEAP else MIDDLE
        cin, width = SMALL[1], SMALL[2]
        out.append((name, SMALL, nn.Sequential(_conv(cin, 16), make(16, width), _conv(16, 16, 1, 1))))
        cin, width = big[1], big[2]
        if name in ("maxpool", "avgpool") or name not in CHEAP:  # one site between two convs: shape changes,
            # or a costly kind whose per-element price dwarfs a refill
            out.append((name + "_large", big, nn.Sequential(_conv(cin, 16), make(16, width), _conv(16, 16, 1, 1))))
            continue
        # four sites in two residual blocks, as in a network: Cheetah refills its OT pool in chunks, and a
        # single product in a forward pays a whole refill (a 12,544-element square: 400 B an element alone,
        # 309 in two blocks, about 312 in ResNet-20)
        blocks = [_Block(make(16, width), make(16, width)) for _ in range(2)]
        out.append((name + "_large", big, nn.Sequential(_conv(cin, 16), *blocks)))
    out.append(("affine", SMALL, nn.Sequential(ChannelAffine(torch.rand(3) + 0.5, torch.randn(3)), _conv(3, 16))))
    return out


def suite_key() -> str:
    """Return a short hash of the suites, so a changed suite is measured anew."""
    names = ",".join(f"{n}{s}" for n, s, _ in calibration_suite()) + str([s for s, _ in linear_suite()])
    return hashlib.sha1(f"{SUITE_VERSION}:{names}".encode()).hexdigest()[:8]


def spu_version() -> str:
    return package_version("spu")


def _cache_path(protocol: str, parties: int, dealer: str, cache: str | os.PathLike | None) -> Path:
    name = f"cost_model_spu-{protocol}_{parties}p_{dealer}_spu{spu_version()}_{suite_key()}.json"
    return Path(cache or cache_dir()) / name


def _prepare(model: nn.Module, x: torch.Tensor):
    from relu_opt.passes.pi import prepare_for_pi

    return prepare_for_pi(model.eval(), x)


def measure_layers(protocol: str, parties: int, dealer: str, layers, timeout: float = 600) -> dict[str, list[float]]:
    """Return [bytes, round trips, seconds] per key of linear layers (key, module, input shape, output
    shape), each measured alone with real parties (three forwards: one setup, two steady)."""
    from relu_opt.backends.spu.measure import measure

    groups: dict[tuple, list] = {}
    for key, mod, in_shape, _ in layers:
        groups.setdefault(tuple(in_shape), []).append((key, copy.deepcopy(mod)))
    table = {}
    for in_shape, members in groups.items():
        x = torch.randn((3 * in_shape[0],) + in_shape[1:])
        prepared = [(key, _prepare(nn.Sequential(mod), x[: in_shape[0]])) for key, mod in members]
        for (key, _), r in zip(prepared, measure(prepared, x, protocol, dealer, parties, timeout, in_shape[0])):
            table[key] = [float(max(r.bytes_per_party)), r.round_trips, r.compute_s]
    return table


def _attach(model: SpuCostModel, path: Path, timeout: float) -> SpuCostModel:
    """Return `model` able to measure the linear layers its table lacks, saving the grown table to `path`."""

    def measure(layers):
        keys = ", ".join(k for k, *_ in layers[:3]) + (" ..." if len(layers) > 3 else "")
        print(
            f"note: measuring {len(layers)} linear layer(s) under SPU once for the cost model ({keys})", file=sys.stderr
        )
        table = measure_layers(model.protocol, model.parties, model.dealer, layers, timeout)
        atomic.write_json(path, {**model.to_dict(), "linear": {**model.linear, **table}})
        return table

    return replace(model, measure=measure)


def load_cached(protocol: str, parties: int, dealer: str, cache=None, note=None, timeout: float = 600):
    """Return the cached cost model (able to measure layers it lacks), or None; a damaged file is removed
    and `note` told."""
    path = _cache_path(protocol, parties, dealer, cache)
    model = load_cache(path, lambda p: SpuCostModel.from_dict(read_json(p, what="cost model")), note=note)
    return None if model is None else _attach(model, path, timeout)


def calibrate(
    protocol: str, parties: int = 2, dealer: str = "none", timeout: float = 600, refresh: bool = False, cache=None
) -> SpuCostModel:
    """Return the cost model for `protocol`, measured once under SPU with real parties and cached."""
    from relu_opt.backends.spu.measure import measure

    path = _cache_path(protocol, parties, dealer, cache)
    cached = None if refresh else load_cached(protocol, parties, dealer, cache, lambda m: print(m, file=sys.stderr))
    if cached is not None:
        return cached
    suite, groups = [], {}
    for name, shape, model in calibration_suite():
        gm = _prepare(model, torch.randn(shape))
        suite.append((name, shape, gm))
        groups.setdefault(shape, []).append((name, gm))
    layers = {}
    for shape, mod in linear_suite():
        gm = _prepare(nn.Sequential(mod), torch.randn(shape))
        layers.update({lay[0]: lay for n in gm.graph.nodes if (lay := linear_layer(gm, n))})
    for _, _, gm in suite:
        layers.update({lay[0]: lay for n in gm.graph.nodes if (lay := linear_layer(gm, n))})
    table = measure_layers(protocol, parties, dealer, list(layers.values()), timeout)
    measured = {}
    for shape, members in groups.items():
        x = torch.randn((3,) + shape[1:])
        for (name, _), r in zip(members, measure(members, x, protocol, dealer, parties, timeout, 1)):
            measured[name] = r
    samples, setups, raw = [], [], {}
    for name, _, gm in suite:
        r = measured[name]
        ops, elements, rest = Counter(), Counter(), [float(max(r.bytes_per_party)), r.round_trips, r.compute_s]
        for node in gm.graph.nodes:
            lay = linear_layer(gm, node)
            if lay is not None:
                rest = [a - b for a, b in zip(rest, table[lay[0]])]
            else:
                o, e = other_features(gm, node)
                ops.update(o)
                elements.update(e)
        samples.append((ops, elements, rest))
        raw[name] = [round(v, 6) for v in rest]
        setups.append((sum(r.offline_sent_per_party), r.offline_round_trips))
    terms, (b, t, s), err = fit_other(samples)
    formula = fit_formula([(*linear_dims(mod, i, o), table[k]) for k, mod, i, o in layers.values()])
    setups.sort()
    model = SpuCostModel(
        protocol, parties, terms, b, t, s, table, formula, setups[len(setups) // 2][0], setups[len(setups) // 2][1],
        err, dealer, raw,
    )  # fmt: skip
    atomic.write_json(path, model.to_dict())
    return _attach(model, path, timeout)
