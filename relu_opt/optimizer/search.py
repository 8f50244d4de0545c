"""Search drivers: a frontier of budgets, and the lowest modeled latency within an accuracy limit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from relu_opt import atomic, distributed
from relu_opt.cache import state_digest
from relu_opt.checked_io import load_cache, read_json
from relu_opt.data import Dataset
from relu_opt.errors import BudgetError
from relu_opt.finetune import FinetuneFailed
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.result import OptimizeResult
from relu_opt.training import note

AUTO_LATENCY_FRACTIONS = (0.25, 0.35, 0.5, 0.7)  # of the original's modeled latency, tried cheapest first


def modeled_latency(model: nn.Module, example: torch.Tensor, config: OptimizeConfig) -> float:
    """Return the cost model's online seconds for one forward of `model` at batch 1 on config.pricing's
    network, priced by config.pricing's cost model (measured once when none is cached)."""
    pricing = config.pricing
    c = pricing.cost_model(note=note).cost(pricing.engine().prepare(model, example[:1]))
    return pricing.net().communication_s(c.round_trips, c.bytes)


def optimize_frontier(
    model: nn.Module,
    data: Dataset,
    budgets: list[int],
    config: OptimizeConfig,
    outdir: str | Path,
    base_spec: str = "",
    progress: bool = True,
) -> list[OptimizeResult]:
    """Return the results of optimizing to each budget, in OUTDIR/budget_N/ (rankings shared in OUTDIR/.work).

    With several ranks (relu_opt.distributed) the budgets are spread over them: the ranking they share is
    computed once by all of them together, then each rank optimizes its budgets by itself, and rank 0 gets
    every budget's folder (written again where it has no such file: ranks on other hosts)."""
    from relu_opt.optimizer import optimize, rank_model

    outdir, work = Path(outdir), Path(outdir) / ".work"
    configs = [replace(config, budget=b) for b in budgets]
    if not distributed.active() or len(configs) < 2:
        return [optimize(model, data, c, outdir / c.dirname, base_spec, progress, work=work) for c in configs]
    rank_model(model, data, configs[0], work, progress)  # cached in WORK for every budget that shares it
    from relu_opt.selection import get_selector

    # measured (once, by rank 0) before the ranks go their own ways, where the selector needs prices
    config.pricing.cost_model(measure=get_selector(config.selector).needs_prices, note=note)
    share = distributed.mine(configs)  # this rank's budgets
    with distributed.alone():
        mine = [(i, optimize(model, data, c, outdir / c.dirname, base_spec, progress, work=work)) for i, c in share]
        mine = [(i, r, {} if distributed.is_main() else _files(Path(r.outdir))) for i, r in mine]
    done = sorted((x for part in distributed.gather(mine) for x in part), key=lambda x: x[0])
    if distributed.is_main():
        for _, r, files in done:
            for rel, blob in files.items():
                if not (Path(r.outdir) / rel).is_file():
                    atomic.write_bytes(Path(r.outdir) / rel, blob)
    return [r for _, r, _ in done]


def _files(folder: Path) -> dict[str, bytes]:
    """Return every file in `folder` (not its work folder) by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".work" not in p.parts
    }


def optimize_lowest_latency(
    model: nn.Module,
    data: Dataset,
    config: OptimizeConfig,
    outdir: str | Path,
    base_spec: str = "",
    progress: bool = True,
    fractions: tuple[float, ...] = AUTO_LATENCY_FRACTIONS,
) -> OptimizeResult:
    """Return the result with the lowest modeled latency whose validation accuracy stays within
    config.max_drop (1 point when unset) of the baseline: latency budgets at `fractions` of the original
    model's, cheapest first, each in OUTDIR/latency_<s>s/. Levels that failed are remembered in
    OUTDIR/.work/auto.json, so a rerun goes on where it stopped."""
    from relu_opt.optimizer import optimize

    outdir = Path(outdir)
    base = replace(config, budget=None, rounds_budget=None, latency_budget=None)
    base = replace(base, max_drop=1.0 if config.max_drop is None else config.max_drop)
    original = modeled_latency(model, data.train.x[:1], config)
    ledger = outdir / ".work" / "auto.json"
    failed = load_cache(ledger, lambda p: read_json(p, what="auto-search ledger"), note=note) or {}
    reasons = []
    for f in sorted(fractions):
        cfg = replace(base, latency_budget=round(f * original, 4))
        key = f"{cfg.key()}_{state_digest(model)}"
        if key in failed:
            reasons.append(f"{f:g}x: {failed[key]}")
            continue
        try:
            return optimize(model, data, cfg, outdir / cfg.dirname, base_spec, progress, work=outdir / ".work")
        except (FinetuneFailed, BudgetError) as exc:
            failed[key] = str(exc).split(";")[0]
            reasons.append(f"{f:g}x: {failed[key]}")
            ledger.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(ledger, failed)
            note(f"latency {cfg.latency_budget:g} s ({f:g}x of {original:.3g} s) failed: {failed[key]}")
    raise FinetuneFailed(
        f"no latency target met the accuracy limit ({base.max_drop:g} points): "
        + " | ".join(reasons)
        + "; give a larger --max-drop or more --epochs"
    )
