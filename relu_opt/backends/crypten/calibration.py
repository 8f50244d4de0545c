"""The cost model's calibration: a suite of tiny models measured under CrypTen with real parties (and the
dealer), and the CrypTenCostModel fitted to them, cached as JSON.

The cache file names the party count, the dealer, the CrypTen version and the suite's hash, so a model
measured with another dealer (a cache from before dealers were chosen was measured with party 0 dealing)
is never reused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from relu_opt import atomic
from relu_opt.activations import ChannelAffine, MaskedReLU, Poly, Square
from relu_opt.backends.base import package_version
from relu_opt.backends.crypten.cost_model import CrypTenCostModel, Sample, features, fit
from relu_opt.cache import cache_dir
from relu_opt.checked_io import load_cache, read_json


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


# Bump when a suite model or a lowering it goes through changes (GELU by sigmoid: 2; products: 3;
# polynomials in Horner form: 4; online and offline apart, dealer in the file name: 5; round trips: 6).
SUITE_VERSION = 6


def suite_key() -> str:
    """Return a short hash of the calibration suite, so a changed suite is measured anew."""
    import hashlib

    names = ",".join(n for n, _ in calibration_suite())
    return hashlib.sha1(f"{SUITE_VERSION}:{names}".encode()).hexdigest()[:8]


CALIBRATION_INPUT = (1, 3, 8, 8)


def _cache_path(parties: int, dealer: str, cache: str | os.PathLike | None) -> Path:
    name = f"cost_model_{parties}p_{dealer}_crypten{_crypten_version()}_{suite_key()}.json"
    return Path(cache or cache_dir()) / name


def load_cached(
    parties: int = 2, dealer: str = "third-party", cache: str | os.PathLike | None = None, note=None
) -> CrypTenCostModel | None:
    """Return the cost model `calibrate` cached for `parties` and `dealer`, or None (nothing is measured);
    a damaged file is removed and `note` told."""
    return load_cache(
        _cache_path(parties, dealer, cache),
        lambda p: CrypTenCostModel.from_dict(read_json(p, what="cost model")),
        note=note,
    )


def calibrate(
    parties: int = 2,
    dealer: str = "third-party",
    timeout: float = 300,
    refresh: bool = False,
    cache: str | os.PathLike | None = None,
) -> CrypTenCostModel:
    """Return the cost model for `parties` and `dealer`, measured once under CrypTen and cached in `cache`."""
    from relu_opt.backends.crypten.convert import prepare
    from relu_opt.backends.crypten.measure import measure

    path = _cache_path(parties, dealer, cache)
    cached = None if refresh else load_cached(parties, dealer, cache, lambda m: print(m, file=sys.stderr))
    if cached is not None:
        return cached
    x = torch.randn(CALIBRATION_INPUT)
    prepared = [(name, prepare(m, x[:1])) for name, m in calibration_suite()]
    runs = measure(prepared, x, parties=parties, dealer=dealer, runs=1, warmup=0, timeout=timeout)
    samples = [
        Sample(
            features(gm, batch=len(x)),
            r.rounds,
            max(r.bytes_per_party),
            sum(r.offline_sent_per_party) + sum(r.offline_received_per_party),
            r.offline_requests,
            r.round_trips,
            r.offline_round_trips,
        )
        for (_, gm), r in zip(prepared, runs)
    ]
    model = fit(samples, parties, dealer)
    atomic.write_json(path, model.to_dict())
    return model


def _crypten_version() -> str:
    return package_version("crypten", "unknown")  # "unknown": the name cached cost models carry
