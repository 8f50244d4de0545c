"""Rankings cached on disk, keyed on what they depend on: the options, the weights and the data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.fx as fx
from torch import nn

from relu_opt import atomic
from relu_opt.cache import state_digest
from relu_opt.checked_io import load_cache, load_torch
from relu_opt.data import Dataset
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.fitting import FittedReplacements
from relu_opt.ranking import Criticality, RankContext, make_strategy
from relu_opt.sites import SiteInfo
from relu_opt.training import note

_KEYS = ("strategy", "granularity", "scores", "unit_elements", "site_scores")


def content_key(model: nn.Module, data: Dataset) -> str:
    """Return a digest of the weights of `model` and the shape of `data`, never of file times."""
    data_id = f"{data.name}:{len(data.train)}:{len(data.val)}:{tuple(data.train.x.shape[1:])}"
    return state_digest(model, extra=data_id)


def cached_ranking(
    work: Path,
    gm: fx.GraphModule,
    data: Dataset,
    cfg: OptimizeConfig,
    fitted: FittedReplacements,
    sites: dict[str, SiteInfo],
    content: str,
    progress: bool,
) -> Criticality:
    """Return the Criticality of `sites` under cfg.strategy, from WORK when a ranking of the same inputs
    is there, else ranked now and saved."""
    # Each strategy takes the options it declares (snl: the budget and epochs) and keys on its settings;
    # the context's part of the key is what every strategy ranks: sites, replacements, samples, seed.
    strategy = make_strategy(
        cfg.strategy, budget=cfg.budget, epochs=cfg.rank_epochs, finetune_steps=cfg.rank_finetune_steps
    )
    shared = cfg.key("replace", "granularity", "degree", "poly_per", "rank_samples", "calib_samples", "seed", "kinds")
    key = hashlib.sha1(f"{shared}:{strategy.cache_key()}".encode()).hexdigest()[:10]
    path = Path(work) / f"rank_{cfg.strategy}_{key}_{content}.pt"
    d = load_cache(path, lambda p: load_torch(p, "cached ranking", keys=_KEYS), note=note)
    if d is not None:
        return Criticality(*(d[k] for k in _KEYS), weights=d.get("weights"))
    ctx = RankContext(
        gm,
        data,
        cfg.granularity,
        fitted.make,
        samples=cfg.rank_samples,
        device=cfg.device,
        seed=cfg.seed,
        progress=progress,
        sites=sites,
    )
    crit = strategy.rank(ctx)
    atomic.save_torch({**{k: getattr(crit, k) for k in _KEYS}, "weights": crit.weights}, path)
    return crit
