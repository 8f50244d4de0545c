"""The optimizer: rank, keep the most critical elements that fit the budgets, replace the rest, fine-tune
with knowledge distillation, export and verify the count on the ONNX graph.

Parts, one job each: config (OptimizeConfig), fitting (replacements fitted per site), ranking_cache,
planner (sites, ranking, selection, rewrite), tuner (fine-tuning with retries), exporter (plan, weights,
verified ONNX), search (frontier and lowest-latency drivers). Each stage leaves its state in the work
folder, so an interrupted run resumes: rankings are cached, fine-tuning continues from its last epoch,
and a finished folder is returned as it is. Reports are written by callers (relu_opt.api).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from torch import nn

from relu_opt import atomic, distributed
from relu_opt.checked_io import load_cache, read_json
from relu_opt.data import Dataset
from relu_opt.optimizer.config import OptimizeConfig, check_budget, check_config
from relu_opt.optimizer.planner import Ranked, plan, rank_model
from relu_opt.optimizer.ranking_cache import content_key
from relu_opt.optimizer.result import OptimizeResult, SiteResult, elements_of
from relu_opt.optimizer.search import modeled_latency, optimize_frontier, optimize_lowest_latency
from relu_opt.training import note

__all__ = [
    "OptimizeConfig",
    "OptimizeResult",
    "Ranked",
    "SiteResult",
    "check_budget",
    "check_config",
    "elements_of",
    "modeled_latency",
    "optimize",
    "optimize_frontier",
    "optimize_lowest_latency",
    "rank_model",
]


def optimize(
    model: nn.Module,
    data: Dataset,
    config: OptimizeConfig,
    outdir: str | Path,
    base_spec: str = "",
    progress: bool = True,
    work: str | Path | None = None,
) -> OptimizeResult:
    """Return the result of optimizing `model` under config's budgets, written to OUTDIR.

    Plan (rank, select, rewrite), fine-tune, save: OUTDIR gets plan.json, model.pt (the rewritten state
    dict), model.onnx (verified, elements counted) and report.json. A finished OUTDIR with the same
    configuration is returned as is. WORK (default OUTDIR/.work) keeps rankings and checkpoints."""
    from relu_opt.optimizer.tuner import tune

    t0 = time.perf_counter()
    outdir = Path(outdir)
    work = Path(work) if work is not None else outdir / ".work"
    if config.searches:
        raise ValueError("optimize needs a budget; relu_opt.optimize (the API) searches when none is given")
    run_key = f"{config.key()}_{content_key(model, data)}"
    done = _finished(outdir / "report.json", run_key)
    if done is not None:
        return done
    planned = plan(model, data, config, work, progress)
    tuned = tune(planned, data, config, work / f"finetune_{run_key}.ckpt", progress)
    base = base_spec or type(model).__name__
    return distributed.on_main(lambda: _saved(planned, tuned, data, config, outdir, base, t0, run_key))


def _saved(planned, tuned, data, config, outdir: Path, base: str, t0: float, run_key: str) -> OptimizeResult:
    """Export, verify and save the fine-tuned plan (rank 0's work); return the result."""
    from relu_opt.optimizer.exporter import save

    result = save(planned, tuned, data, config, outdir, base, t0)
    record = {"config_key": run_key, "config": asdict(config), "result": result.to_dict()}
    atomic.write_json(outdir / "report.json", record)
    return result


def _finished(report_path: Path, run_key: str) -> OptimizeResult | None:
    """Return the result a finished folder holds for `run_key`, or None."""
    done = load_cache(report_path, lambda p: read_json(p, ("config_key", "result"), "optimize report"), note=note)
    if done is None or done["config_key"] != run_key:
        return None
    try:
        return OptimizeResult.from_dict(done["result"])
    except (KeyError, TypeError):
        note(f"note: '{report_path}' is damaged; optimizing this budget again")
        return None
