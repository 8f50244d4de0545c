"""Input statistics of each non-linear site, and polynomials fitted to the site's own function under them.

The fit minimises E[(p(x) - f(x))^2], f the site's op (ReLU, ReLU6, GELU, SiLU, ... as the graph computes
it, with its own arguments), over the distribution actually measured at the site (per channel or per
layer) on fitting samples, not an assumed Gaussian: the normal equations only need the moments
E[x^k] (k <= 2d) and E[x^k f(x)] (k <= d), accumulated exactly in float64 from the site's recorded input
and output.
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
    """Per-channel sums over fitting samples at one site (channel = dim 1, or one channel)."""

    count: Tensor  # (C,) elements seen per channel
    x_pow: Tensor  # (2d+1, C): sum x^k
    f_x_pow: Tensor  # (d+1, C): sum f(x) * x^k, f the site's function
    f_sq: Tensor  # (C,): sum f(x)^2
    max_abs: Tensor  # (C,)

    @property
    def degree(self) -> int:
        return self.f_x_pow.shape[0] - 1

    def merged(self) -> SiteStats:
        """Return the statistics pooled over channels (for one polynomial per layer)."""
        return SiteStats(
            *(t.sum(-1, keepdim=True) for t in (self.count, self.x_pow, self.f_x_pow, self.f_sq)),
            self.max_abs.max(-1, keepdim=True)[0],
        )


def _channels_first(x: Tensor) -> Tensor:
    """Return x as (C, everything else) with C = dim 1 (or a single channel for 1-D activations)."""
    if x.dim() < 2:
        return x.reshape(1, -1)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _accumulate(stats: SiteStats | None, x: Tensor, degree: int, y: Tensor | None = None) -> SiteStats:
    """Add a batch of site inputs `x` and outputs `y` (default relu(x)) to `stats`."""
    v = _channels_first(x.detach()).double()
    r = v.clamp_min(0) if y is None else _channels_first(y.detach()).double()
    powers = [torch.ones_like(v)]
    for _ in range(2 * degree):
        powers.append(powers[-1] * v)
    new = SiteStats(
        count=torch.full((v.shape[0],), float(v.shape[1]), dtype=torch.float64),
        x_pow=torch.stack([p.sum(1) for p in powers]),
        f_x_pow=torch.stack([(r * powers[k]).sum(1) for k in range(degree + 1)]),
        f_sq=(r * r).sum(1),
        max_abs=v.abs().amax(1),
    )
    if stats is None:
        return new
    return SiteStats(
        stats.count + new.count,
        stats.x_pow + new.x_pow,
        stats.f_x_pow + new.f_x_pow,
        stats.f_sq + new.f_sq,
        torch.maximum(stats.max_abs, new.max_abs),
    )


def collect_stats(
    gm: fx.GraphModule, batches: Iterable[Tensor], degree: int = 2, sites: Iterable[str] | None = None
) -> dict[str, SiteStats]:
    """Return SiteStats of the input and output of each site in `sites` (default: the ReLU sites) over
    `batches` (eval mode, no grad). Sites whose output is not elementwise of their input are skipped."""
    sites = {n.name for n in relu_nodes(gm)} if sites is None else set(sites)
    stats: dict[str, SiteStats] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.name not in sites:
                return super().run_node(n)
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            x = x.clone() if isinstance(x, Tensor) else x  # an in-place op (ReLU(inplace=True)) overwrites it
            out = super().run_node(n)
            if isinstance(out, Tensor) and isinstance(x, Tensor) and out.shape == x.shape:
                stats[n.name] = _accumulate(stats.get(n.name), x, degree, out)
            return out

    with eval_mode(gm), torch.no_grad():
        for x in batches:
            Recorder(gm).run(x)
    return stats


def collect_variances(gm: fx.GraphModule, batches: Iterable[Tensor], sites: Iterable[str]) -> dict[str, float]:
    """Return the mean variance each LayerNorm site normalises by, over `batches` (for frozen statistics)."""
    sites, sums = set(sites), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.name in sites and n.op == "call_module":
                mod = self.fetch_attr(n.target)
                x = self.env[n.args[0]]
                dims = tuple(range(-len(getattr(mod, "normalized_shape", (x.shape[-1],))), 0))
                var = x.double().var(dims, unbiased=False)
                total, count = sums.get(n.name, (0.0, 0))
                sums[n.name] = (total + float(var.sum()), count + var.numel())
            return super().run_node(n)

    with eval_mode(gm), torch.no_grad():
        for x in batches:
            Recorder(gm).run(x)
    return {k: t / max(c, 1) for k, (t, c) in sums.items()}


def fit_poly(stats: SiteStats, ridge: float = 1e-6) -> Tensor:
    """Return least-squares coefficients (degree+1, C) of the polynomial closest to the site's function."""
    d = stats.degree
    n = stats.count.clamp_min(1)
    moments = stats.x_pow / n  # E[x^k]
    a = torch.stack([torch.stack([moments[i + j] for j in range(d + 1)], -1) for i in range(d + 1)], -2)  # (C,d+1,d+1)
    scale = a.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).unsqueeze(-1)
    a = a + ridge * scale * torch.eye(d + 1, dtype=a.dtype)
    t = (stats.f_x_pow / n).T.unsqueeze(-1)  # (C, d+1, 1)
    coeffs = torch.linalg.solve(a, t).squeeze(-1).T
    if d == 2:
        coeffs = _positive_square(coeffs, moments, stats.f_x_pow / n)
    return coeffs.float()


def _positive_square(coeffs: Tensor, moments: Tensor, f_moments: Tensor, rel: float = 1e-3) -> Tensor:
    """Return degree-2 coefficients whose x^2 term is at least `rel` / rms(x) per channel, the rest refitted.

    A channel whose input never reaches the ReLU's positive side (a dead channel) fits a = b = c = 0, and a
    quadratic with a <= 0 cannot be written as (s x + t)^2 + k, the one-round form the PI passes fold it
    into. Fixing a at a tiny positive value and refitting b, c costs such a channel next to nothing."""
    floor = rel / moments[2].clamp_min(1e-12).sqrt()
    low = coeffs[2] < floor
    if not bool(low.any()):
        return coeffs
    a = floor
    # minimise E[(a x^2 + b x + c - f)^2] over b, c with a fixed: a 2x2 system per channel
    m0, m1, m2, m3 = moments[0], moments[1], moments[2], moments[3]
    r0 = f_moments[0] - a * m2
    r1 = f_moments[1] - a * m3
    det = (m0 * m2 - m1 * m1).clamp_min(1e-12)
    c = (r0 * m2 - r1 * m1) / det
    b = (m0 * r1 - m1 * r0) / det
    fixed = torch.stack([c, b, a])
    return torch.where(low, fixed, coeffs)


def fit_error(stats: SiteStats, coeffs: Tensor) -> Tensor:
    """Return per-channel E[(p(x) - f(x))^2] / E[f(x)^2] on the measured distribution."""
    d = stats.degree
    n = stats.count.clamp_min(1)
    c = coeffs.double()
    m = stats.x_pow / n
    quad = sum(c[i] * c[j] * m[i + j] for i in range(d + 1) for j in range(d + 1))
    cross = sum(c[k] * stats.f_x_pow[k] / n for k in range(d + 1))
    ref = stats.f_sq / n
    return ((ref - 2 * cross + quad) / ref.clamp_min(1e-12)).float()


def refit_in_order(
    gm: fx.GraphModule, batches: list[Tensor], max_samples: int = 512, train_range: float | None = None
) -> dict[str, float]:
    """Refit each masked site's polynomial, in graph order, to its own function on the inputs it gets
    with every earlier site already replaced; returns each refitted site's relative fit error.

    Fitted on the original model's inputs alone, polynomials drift from the ranges they were fitted on as
    the sites before them change, and a deep stack of them grows without bound (a random-weight ResNet-18
    with 15 of 17 sites replaced reached outputs of 1e15). Fitted in order, each sees what it will get.
    One forward pass over up to `max_samples` inputs: each site is refitted when the pass reaches it. With
    `train_range`, a polynomial's training-time clamp follows its new inputs too (train_range x their
    largest magnitude): a clamp left at the original model's range cut the inputs the rewritten model
    really gets, and the model trained that way overflowed in evaluation."""
    from relu_opt.activations import MaskedSite, Poly

    def poly_site(n: fx.Node) -> MaskedSite | None:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        return mod if isinstance(mod, MaskedSite) and isinstance(mod.replacement, Poly) else None

    sites = [n for n in gm.graph.nodes if poly_site(n) is not None]
    if not sites or not batches:
        return {}
    errors: dict[str, float] = {}

    class InOrder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            site = poly_site(n)
            if site is not None:
                x = self.env[n.args[0]].detach()
                poly = site.replacement
                stats = _accumulate(None, x, poly.degree, site.original(x.clone()))
                if stats.count.shape[0] in (1, poly.coeffs.shape[1]):
                    stats = stats.merged() if poly.coeffs.shape[1] == 1 else stats
                    coeffs = fit_poly(stats)
                    poly.coeffs.copy_(coeffs)
                    if train_range and poly.input_range is not None:
                        poly.input_range = train_range * stats.max_abs.float().reshape(-1)
                    errors[n.name] = float(fit_error(stats, coeffs).mean())
            return super().run_node(n)

    blends = {n.name: poly_site(n).blend for n in sites}
    for n in sites:
        poly_site(n).blend = 0.0  # earlier sites as the final model computes them
    try:
        with eval_mode(gm), torch.no_grad():
            InOrder(gm).run(torch.cat(list(batches))[:max_samples])
    finally:
        for n in sites:
            poly_site(n).blend = blends[n.name]
    return errors
