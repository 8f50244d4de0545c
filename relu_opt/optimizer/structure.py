"""Which structure to remove beside the non-linear choices: the pruning mode, and the least important
structure (by first-order Taylor) with which the selector meets the latency goal.

One objective: with a latency goal, candidates (channel fractions x residual branches dropped, see
relu_opt/pruning.py) are tried least estimated loss first, and the first whose model the selector can
fit to the goal wins; nothing pruned has no loss, so wherever the non-linear choices alone meet the goal
the result is exactly the ReLU-only one, and structure is paid for only where they cannot.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from relu_opt import atomic
from relu_opt.checked_io import load_cache
from relu_opt.data import Dataset
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.ranking_cache import content_key
from relu_opt.pruning import Pruning, StructureScores, apply_pruning, candidates, structure_scores
from relu_opt.training import note

LINEAR_SHARE = 0.25  # --prune's default is channels when linear layers carry more of the modeled latency


def linear_share(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> float:
    """Return the fraction of the model's modeled latency (config.pricing's network) its linear floor keeps."""
    pricing = config.pricing
    engine, cost = pricing.engine(), pricing.cost_model(note=note)
    prepared = engine.prepare(gm, example[:1])
    whole, floor = cost.cost(prepared), cost.cost(engine.floor(prepared, example[:1]))
    net = pricing.net()
    return net.communication_s(floor.round_trips, floor.bytes) / max(
        net.communication_s(whole.round_trips, whole.bytes), 1e-12
    )


def prune_mode(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> tuple[str, str]:
    """Return (mode, why): config.prune when given, else channels when the linear layers carry more than
    LINEAR_SHARE of the modeled latency."""
    if config.prune is not None:
        return config.prune, f"--prune {config.prune}"
    share = linear_share(gm, example, config)
    mode = "channels" if share > LINEAR_SHARE else "none"
    where = f"{config.pricing.describe()}, {config.pricing.network}"
    return mode, f"linear layers carry {share:.0%} of the modeled latency ({where}); default above {LINEAR_SHARE:.0%}"


def cached_scores(gm: fx.GraphModule, data: Dataset, config: OptimizeConfig, work: Path) -> StructureScores:
    """Return the structure scores of `gm`, from WORK when computed before on the same weights and data."""
    path = Path(work) / f"structure_{content_key(gm, data)}_{config.rank_samples}.pt"
    saved = load_cache(path, lambda p: torch.load(p, weights_only=True), note=note)
    if isinstance(saved, dict) and {"channels", "branches"} <= set(saved):
        return StructureScores(saved["channels"], saved["branches"])
    scores = structure_scores(gm, data, config.rank_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_torch({"channels": scores.channels, "branches": scores.branches}, path)
    return scores


def structure_candidates(gm: fx.GraphModule, data: Dataset, config: OptimizeConfig, work: Path):
    """Yield (Pruning, pruned graph) least estimated loss first; nothing pruned comes first."""
    example = data.train.x[:1]
    scores = cached_scores(gm, data, config, work)
    for cand in candidates(gm, example, scores):
        yield cand, (gm if cand.empty else apply_pruning(gm, cand, example))


def lower_bound_s(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> float:
    """Return the modeled seconds of `gm` with no non-linearity at all: no selection can be faster."""
    pricing = config.pricing
    engine = pricing.engine()
    floor = engine.floor(engine.prepare(gm, example[:1]), example[:1])
    c = pricing.cost_model(note=note).cost(floor)
    return pricing.net().communication_s(c.round_trips, c.bytes)


__all__ = ["LINEAR_SHARE", "Pruning", "linear_share", "lower_bound_s", "prune_mode", "structure_candidates"]
