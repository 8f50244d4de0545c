"""The ReLU-budget optimizer: rank, keep the most critical ReLUs that fit, replace the rest, fine-tune
with knowledge distillation, export and verify the count on the ONNX graph.

Each stage leaves its result in OUTDIR (.work/ for intermediate state), so an interrupted run resumes:
rankings are cached, fine-tuning continues from its last epoch, and finished budgets are skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from relu_opt import atomic, ops
from relu_opt.activations import MaskedSite, Poly, Square
from relu_opt.cache import state_digest
from relu_opt.calibration import collect_stats, collect_variances, fit_error, fit_poly
from relu_opt.checked_io import load_cache, load_torch, read_json
from relu_opt.data import Dataset, batches
from relu_opt.errors import BudgetError, ExportError
from relu_opt.export import export
from relu_opt.finetune import check_drop, guarded_fit
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.census import census
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.passes.replace import maxpool_to_avgpool, replace_sites, site_op
from relu_opt.plan import Plan, SitePlan, with_module_names
from relu_opt.ranking import STRATEGIES, Criticality, RankContext, rank, select
from relu_opt.replacements import REPLACEMENTS, SiteContext, replacement_for
from relu_opt.sites import SiteInfo, find_sites
from relu_opt.train import TrainConfig, _note, evaluate, kd_loss, recalibrate_bn


@dataclass(frozen=True)
class OptimizeConfig:
    """Options of one optimization; everything but `budget` is shared by a frontier's budgets."""

    budget: int
    strategy: str = "taylor"
    replace: str = "poly"
    granularity: str = "channel"
    degree: int = 2
    poly_per: str = "channel"
    epochs: float = 1.0
    lr: float = 0.01
    batch_size: int = 128
    temperature: float = 4.0
    kd_alpha: float = 0.9
    anneal: float = 0.5  # fraction of fine-tuning over which dropped ReLUs fade into their replacement
    avgpool: bool = False  # replace max-pools by average pools (their comparisons go too)
    # Fine-tuning stability, measured on the shipped Fashion-MNIST ResNet-20 (notes in relu_opt/finetune.py):
    # with training-mode BatchNorm one batch whose polynomial inputs left their fitted range put a running
    # variance of 3e11 into BatchNorm (eval 11% while training looked fine). Fixed statistics make the
    # trained function the exported one; the clamp (training only, at 2x the fitted range; 1x cost 7 points)
    # keeps compositions of polynomials bounded, which fixed statistics no longer do.
    freeze_bn: bool = True
    train_range: float | None = 2.0  # clamp polynomial inputs in training to this times their fitted range
    recalibrate_bn: bool = False  # recompute BatchNorm statistics after fine-tuning (cost 3 points with freeze_bn)
    rank_samples: int = 5000
    rank_epochs: float = 1.0
    calib_samples: int = 1024
    max_train: int | None = None
    max_drop: float | None = None  # validation points the result may lose; more is a failure, not a result
    device: str = "cpu"
    seed: int = 0
    kinds: tuple[str, ...] = ()  # kinds to optimize; empty: every non-polynomial kind the model has
    kind_budgets: tuple[tuple[str, int], ...] = ()  # per-kind budgets; `budget` covers the other kinds

    def key(self, *fields: str) -> str:
        """Return a short hash of the named fields (all when none), to key cached work."""
        d = asdict(self)
        for k in ("kinds", "kind_budgets"):  # unset, they leave the keys of ReLU-only runs as they were
            if not d[k]:
                del d[k]
        blob = json.dumps({k: d[k] for k in (fields or d) if k in d}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SiteResult:
    site: str
    elements: int
    kept: int
    replacement: str
    fit_error: float | None  # relative MSE of the fitted polynomial to the site's function
    kind: str = "relu"


@dataclass(frozen=True)
class OptimizeResult:
    """What one budget produced; accuracies are percent on the test split."""

    outdir: str
    budget: int
    strategy: str
    replace: str
    granularity: str
    relu_before: int  # elements per sample of the optimized kinds (ReLU for a ReLU network)
    relu_after: int  # the same, counted on the exported ONNX graph
    accuracy_before: float
    accuracy_after: float
    val_accuracy_before: float
    val_accuracy_after: float
    wall_s: float
    sites: tuple[SiteResult, ...]
    onnx: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)  # kind -> {"before", "after" (ONNX), "budget"}

    def to_dict(self) -> dict:
        """Return the JSON written as report.json."""
        d = asdict(self)
        d["sites"] = [asdict(s) for s in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OptimizeResult:
        return cls(**{**d, "sites": tuple(SiteResult(**s) for s in d["sites"])})


def check_budget(budget: int, total: int, what: str = "ReLU") -> None:
    """Raise BudgetError unless 0 <= budget < total."""
    if budget < 0:
        raise BudgetError(f"budget {budget} is negative; give the {what} elements per sample to keep (0 or more)")
    if budget >= total:
        raise BudgetError(
            f"budget {budget:,} is not below the model's {total:,} {what} elements per sample, so there is "
            f"nothing to remove; choose a budget under {total:,}"
            + ("" if what != "ReLU" else ", or optimize other kinds with --kinds (see relu-opt count)")
        )


def check_config(config: OptimizeConfig) -> None:
    """Raise ConfigError naming the first option of `config` that is unknown or out of range."""
    from relu_opt import validation as v

    v.check_choice("strategy", config.strategy, sorted(STRATEGIES))
    v.check_choice("replace", config.replace, REPLACEMENTS)
    v.check_choice("granularity", config.granularity, ("site", "channel", "pixel"))
    v.check_choice("poly_per", config.poly_per, ("channel", "layer"))
    v.check_int("degree", config.degree, 1, 4)
    v.check_float("epochs", config.epochs, above=None, minimum=0.0)  # 0: no fine-tuning at all
    for name in ("lr", "temperature", "rank_epochs"):
        v.check_float(name, getattr(config, name))
    v.check_float("kd_alpha", config.kd_alpha, above=None, maximum=1.0)
    v.check_float("anneal", config.anneal, above=None, maximum=1.0)
    for name in ("batch_size", "rank_samples", "calib_samples", "max_train"):
        v.check_int(name, getattr(config, name))


def _replacement_factory(kind: str, coeffs: dict[str, torch.Tensor], poly_per: str):
    """Return site -> a fresh ReLU-site replacement from fitted coefficients (the `relu-opt rank` path)."""

    def make(site: str) -> nn.Module | None:
        if kind == "identity":
            return None
        if kind == "square":
            return Square()
        c = coeffs[site]
        return Poly(c if poly_per == "channel" else c[:, :1])

    return make


def _calibrate(gm: fx.GraphModule, data: Dataset, cfg: OptimizeConfig, sites: dict[str, SiteInfo] | None = None):
    """Return (coefficients, errors) of polynomials fitted to each elementwise site's own function."""
    calib = data.train.subset(cfg.calib_samples)
    names = None if sites is None else [s for s, info in sites.items() if ops.get_kind(info.kind).elementwise]
    stats = collect_stats(gm, (x for x, _ in batches(calib, 256)), degree=cfg.degree, sites=names)
    coeffs, errors = {}, {}
    for site, st in stats.items():
        st = st if cfg.poly_per == "channel" else st.merged()
        coeffs[site] = fit_poly(st)
        errors[site] = float(fit_error(st, coeffs[site]).mean())
    return coeffs, errors


def _site_replacements(gm: fx.GraphModule, data: Dataset, cfg: OptimizeConfig, sites: dict[str, SiteInfo]):
    """Return (site -> fresh fitted replacement factory, fit errors) for every site of any kind."""
    calib = data.train.subset(cfg.calib_samples)
    elementwise = [s for s, info in sites.items() if ops.get_kind(info.kind).elementwise]
    stats = collect_stats(gm, (x for x, _ in batches(calib, 256)), degree=cfg.degree, sites=elementwise)
    norms = [s for s, info in sites.items() if info.kind == "layernorm"]
    variances = collect_variances(gm, (x for x, _ in batches(calib, 256)), norms) if norms else {}
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

    return make, errors, {s: r.name for s, r in chosen.items()}


def _ranking(
    work: Path, gm, data, cfg: OptimizeConfig, make_rep, progress: bool, content: str, sites=None
) -> Criticality:
    fields = [
        "strategy",
        "replace",
        "granularity",
        "degree",
        "poly_per",
        "rank_samples",
        "rank_epochs",
        "calib_samples",
        "seed",
        "kinds",
    ] + (["budget"] if cfg.strategy == "snl" else [])
    path = work / f"rank_{cfg.strategy}_{cfg.key(*fields)}_{content}.pt"
    keys = ("strategy", "granularity", "scores", "unit_elements", "site_scores")
    d = load_cache(path, lambda p: load_torch(p, "cached ranking", keys=keys), note=_note)
    if d is not None:
        return Criticality(*(d[k] for k in keys))
    ctx = RankContext(
        gm,
        data,
        cfg.granularity,
        make_rep,
        budget=cfg.budget,
        samples=cfg.rank_samples,
        epochs=cfg.rank_epochs,
        device=cfg.device,
        seed=cfg.seed,
        progress=progress,
        sites=sites,
    )
    crit = rank(ctx, cfg.strategy)
    atomic.save_torch(
        {
            "strategy": crit.strategy,
            "granularity": crit.granularity,
            "scores": crit.scores,
            "unit_elements": crit.unit_elements,
            "site_scores": crit.site_scores,
        },
        path,
    )
    return crit


def _anneal(model: nn.Module, anneal: float):
    masked = [m for m in model.modules() if isinstance(m, MaskedSite)]

    def on_step(frac: float) -> None:
        blend = max(0.0, 1.0 - frac / anneal) if anneal > 0 else 0.0
        for m in masked:
            m.blend = blend

    return on_step


def _finish(model: nn.Module, config: OptimizeConfig, data: Dataset) -> None:
    """End the annealing schedule, then recompute BatchNorm statistics on the final weights if asked."""
    _anneal(model, config.anneal)(1.0)
    if config.recalibrate_bn:
        recalibrate_bn(model, data.train, device=config.device)


def optimize(
    model: nn.Module,
    data: Dataset,
    config: OptimizeConfig,
    outdir: str | Path,
    base_spec: str = "",
    progress: bool = True,
) -> OptimizeResult:
    """Optimize `model` to `config.budget` ReLU elements per sample and write OUTDIR; returns the result.

    OUTDIR gets plan.json, model.pt (the rewritten state dict), model.onnx (verified, ReLUs counted),
    report.json and report.md. A finished OUTDIR with the same configuration is returned as is."""
    t0 = time.perf_counter()
    outdir = Path(outdir)
    work = outdir.parent / ".work" if outdir.name.startswith("budget_") else outdir / ".work"
    report_path = outdir / "report.json"
    # Cached work is keyed on the options and on the content of the weights and data, never on file times.
    data_id = f"{data.name}:{len(data.train)}:{len(data.val)}:{tuple(data.train.x.shape[1:])}"
    content = state_digest(model, extra=data_id)
    run_key = f"{config.key()}_{content}"
    done = load_cache(report_path, lambda p: read_json(p, ("config_key", "result"), "optimize report"), note=_note)
    if done is not None and done["config_key"] == run_key:
        try:
            return OptimizeResult.from_dict(done["result"])
        except (KeyError, TypeError):
            _note(f"note: '{report_path}' is damaged; optimizing this budget again")
    check_config(config)

    example = data.train.x[:1]
    teacher = propagate_shapes(trace(copy.deepcopy(model).eval()), example).eval()
    site_info = find_sites(teacher, config.kinds or None, config.granularity)
    kinds = tuple(dict.fromkeys(info.kind for info in site_info.values()))
    totals = {k: sum(i.elements for i in site_info.values() if i.kind == k) for k in kinds}
    caps = dict(config.kind_budgets)
    shared = [k for k in kinds if k not in caps]
    what = "ReLU" if kinds == ("relu",) else "/".join(shared or kinds)
    total = sum(totals.values())
    if not site_info:
        raise BudgetError(
            f"the model has no sites of the kinds {', '.join(config.kinds) or 'it has'} to optimize; "
            "see `relu-opt count` for its kinds and pass them with --kinds (max-pools: use --avgpool)"
        )
    check_budget(config.budget, sum(totals[k] for k in shared) if shared else total, what)
    make_rep, errors, rep_names = _site_replacements(teacher, data, config, site_info)
    crit = _ranking(work, teacher, data, config, make_rep, progress, content, site_info)
    keep = _select_by_kind(crit, site_info, config.budget, caps)

    sites, new_modules = [], {}
    for site, info in site_info.items():
        unit = crit.unit_elements[site]
        kept = int(keep[site].sum()) * unit
        elements = info.elements
        sites.append(
            SitePlan(
                site,
                elements,
                kept,
                rep_names[site],
                info.granularity,
                config.degree,
                config.poly_per,
                kind=info.kind,
            )
        )
        if kept < elements:
            original = site_op(teacher, next(n for n in teacher.graph.nodes if n.name == site))
            new_modules[site] = MaskedSite(keep[site].float(), make_rep(site), original, info.kind)
    student = replace_sites(teacher, new_modules)
    student = run_passes(student, [GraphPass(maxpool_to_avgpool)] if config.avgpool else [], example)
    plan_sites = with_module_names(student, sites)

    _, val_before = evaluate(teacher, data.val, device=config.device)
    _, test_before = evaluate(teacher, data.test, device=config.device)
    train_cfg = TrainConfig(
        epochs=max(1, math.ceil(config.epochs)),
        lr=config.lr,
        batch_size=config.batch_size,
        max_train=_max_train(config, len(data.train)),
        device=config.device,
        seed=config.seed,
        freeze_bn=config.freeze_bn,
    )
    poly_params = [p for n, p in student.named_parameters() if n.endswith("coeffs")]
    other = [p for n, p in student.named_parameters() if not n.endswith("coeffs")]
    groups = [{"params": other}] + (
        [{"params": poly_params, "lr": config.lr * 0.1, "weight_decay": 0.0}] if poly_params else []
    )
    ft = _finetune(
        student,
        data,
        train_cfg,
        baseline_val=100 * val_before,
        checkpoint=work / f"finetune_{run_key}.ckpt",
        param_groups=groups,
        finalize=lambda m: _finish(m, config, data),
        loss_fn=kd_loss(teacher, config.temperature, config.kd_alpha),
        on_step=_anneal(student, config.anneal),
        progress=progress,
        description=f"fine-tune {config.budget:,}",
        resume_hint="rerun the same command to continue from there",
        epochs=config.epochs,
    )
    student.eval()
    val_after = (ft.val_accuracy if ft else 100 * evaluate(student, data.val, device=config.device)[1]) / 100
    check_drop(100 * val_before, 100 * val_after, config.max_drop, f"budget {config.budget:,}")
    _, test_after = evaluate(student, data.test, device=config.device)

    plan = Plan(
        base_spec or type(model).__name__,
        tuple(example.shape),
        data.num_classes,
        plan_sites,
        meta={"strategy": config.strategy, "budget": config.budget, "kinds": list(kinds)},
        avgpool=config.avgpool,
    )
    outdir.mkdir(parents=True, exist_ok=True)
    atomic.save_torch(student.state_dict(), outdir / "model.pt")
    atomic.write_json(outdir / "plan.json", plan.to_dict())
    prepared = prepare_for_pi(student, example)
    exported = export(
        prepared,
        example,
        outdir / "model.onnx",
        census_totals=census(prepared).totals_by_kind,
        parity_inputs=data.val.x[:64],
    )
    after = {k: exported.onnx_totals.get(k, 0) for k in kinds}
    if sum(after[k] for k in shared) > config.budget or any(after[k] > caps[k] for k in caps if k in after):
        raise ExportError(f"exported graph keeps {after} elements per sample, over the budget {config.budget:,}")
    result = OptimizeResult(
        outdir=str(outdir),
        budget=config.budget,
        strategy=config.strategy,
        replace=config.replace,
        granularity=config.granularity,
        relu_before=total,
        relu_after=sum(after.values()),
        accuracy_before=100 * test_before,
        accuracy_after=100 * test_after,
        val_accuracy_before=100 * val_before,
        val_accuracy_after=100 * val_after,
        wall_s=time.perf_counter() - t0,
        sites=tuple(
            SiteResult(
                s.site,
                s.elements,
                s.kept,
                "relu" if s.kept == s.elements else s.replacement,
                errors.get(s.site) if s.replacement == "poly" else None,
                s.kind,
            )
            for s in plan_sites
        ),
        onnx=exported.to_dict(),
        finetune=ft.to_dict() if ft else {"epochs": 0, "steps": 0},
        kinds={k: {"before": totals[k], "after": after[k], "budget": caps.get(k)} for k in kinds},
    )
    from relu_opt.report import write_optimize_report

    write_optimize_report(result, outdir)
    atomic.write_json(report_path, {"config_key": run_key, "config": asdict(config), "result": result.to_dict()})
    return result


def _finetune(student: nn.Module, data: Dataset, cfg: TrainConfig, *, epochs: float, finalize, **kwargs):
    """Return guarded_fit's result, or None with `epochs` 0: no fine-tuning step at all (the sites take
    their replacements at once), for cost studies of random-weight models."""
    if epochs == 0:
        finalize(student)
        return None
    return guarded_fit(student, data, cfg, finalize=finalize, **kwargs)


def _select_by_kind(
    crit: Criticality, sites: dict[str, SiteInfo], budget: int, caps: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Return keep-masks: kinds with their own budget in `caps` are selected within it, the other kinds
    share `budget`."""
    groups: dict[str | None, list[str]] = {}
    for s, info in sites.items():
        groups.setdefault(info.kind if info.kind in caps else None, []).append(s)
    keep = {}
    for kind, names in groups.items():
        sub = Criticality(
            crit.strategy,
            crit.granularity,
            {s: crit.scores[s] for s in names},
            {s: crit.unit_elements[s] for s in names},
        )
        keep.update(select(sub, caps[kind] if kind is not None else budget))
    return keep


def _max_train(cfg: OptimizeConfig, n: int) -> int | None:
    """Fractional epochs train on a prefix of the (shuffled-once) train split."""
    if cfg.epochs >= 1 or cfg.epochs <= 0:
        return cfg.max_train
    return max(cfg.batch_size, int(min(n, cfg.max_train or n) * cfg.epochs))


def optimize_frontier(
    model: nn.Module,
    data: Dataset,
    budgets: list[int],
    config: OptimizeConfig,
    outdir: str | Path,
    base_spec: str = "",
    progress: bool = True,
) -> list[OptimizeResult]:
    """Optimize to each budget (OUTDIR/budget_N/), then write the Pareto table and plot; returns the results."""
    outdir = Path(outdir)
    results = [
        optimize(
            model, data, OptimizeConfig(**{**asdict(config), "budget": b}), outdir / f"budget_{b}", base_spec, progress
        )
        for b in budgets
    ]
    from relu_opt.report import write_pareto

    write_pareto(results, outdir)
    return results
