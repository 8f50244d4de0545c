"""Replacements fitted to each site: polynomials fitted to the site's own function on its inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from relu_opt import ops
from relu_opt.data import Dataset, batches
from relu_opt.errors import ConfigError
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.passes.replace import site_op
from relu_opt.poly_fit import collect_stats, collect_variances, fit_error, fit_poly
from relu_opt.replacements import REPLACEMENTS, SiteContext, replacement_for
from relu_opt.sites import SiteInfo


@dataclass(frozen=True)
class FittedReplacements:
    """Per site: a factory of fresh replacement modules, the fit error of polynomials, the replacement's name."""

    make: Callable[[str], nn.Module | None]
    errors: dict[str, float]
    names: dict[str, str]


def check_replacement_applies(requested: str, sites: dict[str, SiteInfo]) -> None:
    """Raise ConfigError when a replacement other than the default applies to none of the sites' kinds
    (it would be ignored: every site would take its kind's default)."""
    if requested == "poly":
        return
    kinds = sorted({info.kind for info in sites.values()})
    if not any(REPLACEMENTS[requested].applies(ops.get_kind(k)) for k in kinds):
        raise ConfigError(
            f"replace '{requested}' applies to none of the kinds optimized here ({', '.join(kinds)}); "
            "leave --replace out (each kind takes its default) or optimize other kinds"
        )


def fit_replacements(gm: fx.GraphModule, data: Dataset, cfg: OptimizeConfig, sites: dict[str, SiteInfo]):
    """Return the FittedReplacements of every site of any kind, fitted on cfg.fit_samples training samples."""
    check_replacement_applies(cfg.replace, sites)
    sample = data.train.subset(cfg.fit_samples)
    elementwise = [s for s, info in sites.items() if ops.get_kind(info.kind).elementwise]
    stats = collect_stats(gm, (x for x, _ in batches(sample, 256)), degree=cfg.degree, sites=elementwise)
    norms = [s for s, info in sites.items() if info.kind == "layernorm"]
    variances = collect_variances(gm, (x for x, _ in batches(sample, 256)), norms) if norms else {}
    nodes = {n.name: n for n in gm.graph.nodes}
    chosen = {s: replacement_for(info.kind, cfg.replace) for s, info in sites.items()}
    errors = {}
    for s, st in stats.items():
        if chosen[s].name == "poly":
            st = st if cfg.poly_per == "channel" else st.merged()
            errors[s] = float(fit_error(st, fit_poly(st)).mean())

    def make(site: str) -> nn.Module | None:
        info = sites[site]
        ctx = SiteContext(
            site,
            info.kind,
            info.shape,
            site_op(gm, nodes[site]),
            stats.get(site),
            variances.get(site),
            cfg.degree,
            cfg.poly_per,
            cfg.train_range,
        )
        return chosen[site](ctx)

    return FittedReplacements(make, errors, {s: r.name for s, r in chosen.items()})
