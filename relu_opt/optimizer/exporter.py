"""Saving a result: plan.json, model.pt and the verified model.onnx, with the budget checked on the ONNX graph."""

from __future__ import annotations

import time
from pathlib import Path

from relu_opt import atomic
from relu_opt.data import Dataset
from relu_opt.errors import ExportError
from relu_opt.graph import user_leaves
from relu_opt.onnx_export import export
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.planner import Planned
from relu_opt.optimizer.result import OptimizeResult, SiteResult
from relu_opt.passes.census import census
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.plan import Plan
from relu_opt.pruning import Pruning


def save(p: Planned, tuned: dict, data: Dataset, config: OptimizeConfig, outdir: Path, base: str, t0: float):
    """Write plan.json, model.pt and the verified model.onnx to OUTDIR; return the OptimizeResult."""
    example = data.train.x[:1]
    plan = Plan(
        base,
        tuple(example.shape),
        data.num_classes,
        p.sites,
        meta={
            "strategy": config.strategy,
            "budget": config.budget,
            "kinds": list(p.kinds),
            "weights": p.start,
            "base_weights": p.ranked.weights,
        },
        leaf=user_leaves(p.teacher),
        avgpool=config.avgpool,
        public_coeffs=config.public_coeffs,
        pruning=Pruning.from_dict(p.pruning).to_dict(),
    )
    outdir.mkdir(parents=True, exist_ok=True)
    atomic.save_torch(p.student.state_dict(), outdir / "model.pt")
    atomic.write_json(outdir / "plan.json", plan.to_dict())
    try:  # a folder whose export fails must not look like a result to `bench --optimized`
        prepared = prepare_for_pi(p.student, example, public_coeffs=config.public_coeffs)
        exported = export(
            prepared,
            example,
            outdir / "model.onnx",
            census_totals=census(prepared).totals_by_kind,
            parity_inputs=data.val.x[:64],
        )
        after = {k: exported.onnx_totals.get(k, 0) for k in p.kinds}
        over_shared = config.budget is not None and sum(after[k] for k in p.shared) > config.budget
        if over_shared or any(after[k] > p.caps[k] for k in p.caps if k in after):
            raise ExportError(f"exported graph keeps {after} elements per sample, over the {config.label}")
    except BaseException:
        for name in ("plan.json", "model.pt", "model.onnx"):
            (outdir / name).unlink(missing_ok=True)
        raise
    crit = p.ranked.criticality
    return OptimizeResult(
        outdir=str(outdir),
        budget=config.budget,
        strategy=config.strategy,
        replace=config.replace,
        granularity=config.granularity,
        elements_before=sum(p.totals.values()),
        elements_after=sum(after.values()),
        accuracy_before=100 * tuned["test_before"],
        accuracy_after=100 * tuned["test_after"],
        val_accuracy_before=100 * tuned["val_before"],
        val_accuracy_after=100 * tuned["val_after"],
        wall_s=time.perf_counter() - t0,
        sites=tuple(
            SiteResult(
                s.site,
                s.elements,
                s.kept,
                "relu" if s.kept == s.elements else s.replacement,
                p.errors.get(s.site) if s.replacement == "poly" else None,
                s.kind,
                crit.site_score(s.site) if s.site in crit.scores else None,
            )
            for s in p.sites
        ),
        onnx=exported.to_dict(),
        finetune=tuned["finetune"],
        kinds={k: {"before": p.totals[k], "after": after[k], "budget": p.caps.get(k)} for k in p.kinds},
        selection=p.selection.to_dict(),
        pruning=p.pruning,
    )
