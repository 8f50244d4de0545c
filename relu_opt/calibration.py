"""Pre-activation statistics of each ReLU site, and polynomials fitted to ReLU under them.

The fit minimises E[(p(x) - relu(x))^2] over the distribution actually measured at the site (per channel
or per layer) on calibration batches, not an assumed Gaussian: the normal equations only need the
moments E[x^k] (k <= 2d) and E[x^k relu(x)] (k <= d), which are accumulated exactly in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

from relu_opt.graph import eval_mode
from relu_opt.passes.replace import relu_nodes


@dataclass
class SiteStats:
    """Per-channel sums over calibration data at one ReLU site (channel = dim 1, or one channel)."""

    count: Tensor  # (C,) elements seen per channel
    x_pow: Tensor  # (2d+1, C): sum x^k
    relu_x_pow: Tensor  # (d+1, C): sum relu(x) * x^k
    relu_sq: Tensor  # (C,): sum relu(x)^2
    max_abs: Tensor  # (C,)

    @property
    def degree(self) -> int:
        return self.relu_x_pow.shape[0] - 1

    def merged(self) -> SiteStats:
        """Return the statistics pooled over channels (for one polynomial per layer)."""
        return SiteStats(
            *(t.sum(-1, keepdim=True) for t in (self.count, self.x_pow, self.relu_x_pow, self.relu_sq)),
            self.max_abs.max(-1, keepdim=True)[0],
        )


def _channels_first(x: Tensor) -> Tensor:
    """Return x as (C, everything else) with C = dim 1 (or a single channel for 1-D activations)."""
    if x.dim() < 2:
        return x.reshape(1, -1)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _accumulate(stats: SiteStats | None, x: Tensor, degree: int) -> SiteStats:
    v = _channels_first(x.detach()).double()
    r = v.clamp_min(0)
    powers = [torch.ones_like(v)]
    for _ in range(2 * degree):
        powers.append(powers[-1] * v)
    new = SiteStats(
        count=torch.full((v.shape[0],), float(v.shape[1]), dtype=torch.float64),
        x_pow=torch.stack([p.sum(1) for p in powers]),
        relu_x_pow=torch.stack([(r * powers[k]).sum(1) for k in range(degree + 1)]),
        relu_sq=(r * r).sum(1),
        max_abs=v.abs().amax(1),
    )
    if stats is None:
        return new
    return SiteStats(
        stats.count + new.count,
        stats.x_pow + new.x_pow,
        stats.relu_x_pow + new.relu_x_pow,
        stats.relu_sq + new.relu_sq,
        torch.maximum(stats.max_abs, new.max_abs),
    )


def collect_stats(gm: fx.GraphModule, batches: Iterable[Tensor], degree: int = 2) -> dict[str, SiteStats]:
    """Return SiteStats of every ReLU site's input over `batches` (eval mode, no grad)."""
    sites = {n.name for n in relu_nodes(gm)}
    stats: dict[str, SiteStats] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.name in sites:
                x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
                stats[n.name] = _accumulate(stats.get(n.name), x, degree)
            return super().run_node(n)

    with eval_mode(gm), torch.no_grad():
        for x in batches:
            Recorder(gm).run(x)
    return stats


def fit_poly(stats: SiteStats, ridge: float = 1e-6) -> Tensor:
    """Return least-squares coefficients (degree+1, C) of the polynomial closest to ReLU per channel."""
    d = stats.degree
    n = stats.count.clamp_min(1)
    moments = stats.x_pow / n  # E[x^k]
    a = torch.stack([torch.stack([moments[i + j] for j in range(d + 1)], -1) for i in range(d + 1)], -2)  # (C,d+1,d+1)
    scale = a.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).unsqueeze(-1)
    a = a + ridge * scale * torch.eye(d + 1, dtype=a.dtype)
    t = (stats.relu_x_pow / n).T.unsqueeze(-1)  # (C, d+1, 1)
    return torch.linalg.solve(a, t).squeeze(-1).T.float()


def fit_error(stats: SiteStats, coeffs: Tensor) -> Tensor:
    """Return per-channel E[(p(x) - relu(x))^2] / E[relu(x)^2] on the measured distribution."""
    d = stats.degree
    n = stats.count.clamp_min(1)
    c = coeffs.double()
    m = stats.x_pow / n
    quad = sum(c[i] * c[j] * m[i + j] for i in range(d + 1) for j in range(d + 1))
    cross = sum(c[k] * stats.relu_x_pow[k] / n for k in range(d + 1))
    ref = stats.relu_sq / n
    return ((ref - 2 * cross + quad) / ref.clamp_min(1e-12)).float()
