"""Planning: find the sites, rank them, select what to keep under the budgets, rewrite the model."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from relu_opt.activations import MaskedSite
from relu_opt.cache import state_digest
from relu_opt.data import Dataset, batches
from relu_opt.errors import BudgetError, ConfigError
from relu_opt.graph import propagate_shapes, trace
from relu_opt.optimizer.config import OptimizeConfig, check_budget
from relu_opt.optimizer.fitting import FittedReplacements, fit_replacements
from relu_opt.optimizer.ranking_cache import cached_ranking, content_key
from relu_opt.optimizer.structure import cached_scores, lower_bound_s, prune_mode, trial_accuracy
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.replace import maxpool_to_avgpool, replace_sites, site_op
from relu_opt.plan import SitePlan, mask_shape, with_module_names
from relu_opt.poly_fit import refit_in_order
from relu_opt.pruning import KEEP_FRACTIONS, Pruning, apply_pruning, candidate
from relu_opt.ranking import Criticality
from relu_opt.sites import SiteInfo, find_sites
from relu_opt.training import note


@dataclass(frozen=True)
class Ranked:
    """The model as a graph, its sites, the replacements fitted to them and how critical each is."""

    teacher: fx.GraphModule
    sites: dict[str, SiteInfo]
    fitted: FittedReplacements
    criticality: Criticality
    content: str  # digest of the weights and data the ranking was made on
    weights: str  # digest of the original model's weights (plan.json keeps it: a bench checks its MODEL)


@dataclass(frozen=True)
class Planned:
    """What planning produced: the teacher, the rewritten student and what was chosen per site."""

    ranked: Ranked
    student: fx.GraphModule
    sites: tuple[SitePlan, ...]
    selection: object  # relu_opt.selection.Selection
    errors: dict[str, float]
    kinds: tuple[str, ...]
    totals: dict[str, int]
    caps: dict[str, int]
    shared: list[str]
    start: str = "original"  # which weights fine-tuning starts from: the original's, or a strategy's
    original: fx.GraphModule | None = None  # the unpruned model, the teacher, when structure was removed
    pruning: dict = field(default_factory=dict)  # mode, why, and the Pruning (relu_opt/pruning.py)

    @property
    def teacher(self) -> fx.GraphModule:
        """Return the model distilled from: the original, never the pruned one."""
        return self.original if self.original is not None else self.ranked.teacher


def _sites(model: nn.Module, data: Dataset, config: OptimizeConfig) -> tuple[fx.GraphModule, dict[str, SiteInfo]]:
    """Return the model traced with shapes, and its sites of config.kinds; refuse budgets that do not apply."""
    teacher = propagate_shapes(trace(copy.deepcopy(model).eval()), data.train.x[:1]).eval()
    site_info = find_sites(teacher, config.kinds or None, config.granularity)
    if not site_info:
        raise BudgetError(
            f"the model has no sites of the kinds {', '.join(config.kinds) or 'it has'} to optimize; "
            "see `relu-opt count` for its kinds and pass them with --kinds (max-pools: avgpool=True in the Python API)"
        )
    present = {info.kind for info in site_info.values()}
    absent = [k for k, _ in config.kind_budgets if k not in present]
    if absent:
        raise ConfigError(
            f"a kind budget names {', '.join(absent)}, which the model does not have among the kinds optimized "
            f"({', '.join(sorted(present))}); drop that --kind-budget"
        )
    return teacher, site_info


def rank_model(model: nn.Module, data: Dataset, config: OptimizeConfig, work: Path, progress: bool = False) -> Ranked:
    """Return the Ranked sites of `model`: what `optimize` ranks, from the same cache in WORK."""
    teacher, site_info = _sites(model, data, config)
    return _rank(teacher, site_info, model, data, config, work, progress)


def _rank(teacher, site_info, model, data, config, work, progress, fitted=None) -> Ranked:
    fitted = fitted or fit_replacements(teacher, data, config, site_info)
    content = content_key(model, data)
    crit = cached_ranking(work, teacher, data, config, fitted, site_info, content, progress)
    return Ranked(teacher, site_info, fitted, crit, content, state_digest(model))


def select(ranked: Ranked, example: torch.Tensor, config: OptimizeConfig, caps: dict[str, int]):
    """Return the Selection of config.selector under the config's budgets, priced by config.pricing's cost
    model (the latency selector measures it once when none is cached; the count selector uses a cached
    one only)."""
    from relu_opt.selection import Constraints, get_selector, price_sites

    pricing = config.pricing
    selector = get_selector(config.selector)
    constraints = Constraints(
        config.budget, tuple(caps.items()), config.rounds_budget, config.latency_budget, pricing.net()
    )
    cost = pricing.cost_model(measure=selector.needs_prices, note=note)
    prices = None
    if cost is not None:
        crit, make = ranked.criticality, ranked.fitted.make
        prices = price_sites(ranked.teacher, example, ranked.sites, crit, make, cost, pricing, config.public_coeffs)
    try:
        return selector.select(ranked.criticality, ranked.sites, constraints, prices)
    except ValueError as exc:
        raise BudgetError(str(exc)) from None


def check_budgets(model: nn.Module, data: Dataset, config: OptimizeConfig, budgets: Iterable[int | None] = ()):
    """Return (teacher, sites, kinds, totals, caps, shared): the model's sites of config.kinds with
    config.budget, and each of `budgets` (a frontier's), checked against them (BudgetError or ConfigError
    naming what does not fit); the model is traced once for all."""
    teacher, site_info = _sites(model, data, config)
    kinds = tuple(dict.fromkeys(info.kind for info in site_info.values()))
    totals = {k: sum(i.elements for i in site_info.values() if i.kind == k) for k in kinds}
    caps = dict(config.kind_budgets)
    shared = [k for k in kinds if k not in caps]
    what = "ReLU" if kinds == ("relu",) else "/".join(shared or kinds)
    limit = sum(totals[k] for k in shared) if shared else sum(totals.values())
    for b in dict.fromkeys((config.budget, *budgets)):  # in the order given, each once
        if b is not None:
            check_budget(b, limit, what)
    return teacher, site_info, kinds, totals, caps, shared


def plan(model: nn.Module, data: Dataset, config: OptimizeConfig, work: Path, progress: bool) -> Planned:
    """Return the Planned rewrite: sites found, ranked, selected under the budgets, replaced and refitted."""
    example = data.train.x[:1]
    teacher, site_info, kinds, totals, caps, shared = check_budgets(model, data, config)
    mode, why = "none", "no latency goal to spend structure on"
    if config.latency_budget is not None:
        mode, why = prune_mode(teacher, example, config)
    pruning, trials = Pruning(), []
    if mode == "channels":
        ranked, selection, pruning, trials = _with_structure(teacher, data, config, caps, work, progress)
        ranked = replace(ranked, weights=state_digest(model))  # plan.json names the original's weights
    else:
        ranked = _rank(teacher, site_info, model, data, config, work, progress)
        selection = select(ranked, example, config, caps)
    student, sites, errors, start = _build(ranked, selection, config, data)
    plan_sites = with_module_names(student, sites)
    structure = {"mode": mode, "why": why, "removed": pruning.describe(), **pruning.to_dict(), "trials": trials}
    original = None if pruning.empty else teacher
    return Planned(
        ranked, student, plan_sites, selection, errors, kinds, totals, caps, shared, start, original, structure
    )


def _build(ranked: Ranked, selection, config: OptimizeConfig, data: Dataset):
    """Return (student, site plans, fit errors, start): ranked.teacher with the selection's sites replaced."""
    example = data.train.x[:1]
    crit, fitted = ranked.criticality, ranked.fitted
    base = ranked.teacher
    if crit.weights is not None:  # snl trained the weights with its masks: fine-tuning goes on from them
        base = copy.deepcopy(base)
        base.load_state_dict(crit.weights, strict=False)
    sites, new_modules = [], {}
    nodes = {n.name: n for n in base.graph.nodes}
    for site, info in ranked.sites.items():
        kept = int(selection.keep[site].sum()) * crit.unit_elements[site]
        name = fitted.names[site]
        sites.append(
            SitePlan(site, info.elements, kept, name, info.granularity, config.degree, config.poly_per, kind=info.kind)
        )
        if kept < info.elements:
            original = site_op(base, nodes[site])
            new_modules[site] = MaskedSite(selection.keep[site].float(), fitted.make(site), original, info.kind)
    student = replace_sites(base, new_modules)
    student = run_passes(student, [GraphPass(maxpool_to_avgpool)] if config.avgpool else [], example)
    sample = [x for x, _ in batches(data.train.subset(config.fit_samples), 256)]
    errors = {**fitted.errors, **refit_in_order(student, sample, train_range=config.train_range)}
    start = "original" if crit.weights is None else f"{crit.strategy} (trained with its masks)"
    return student, sites, errors, start


def _uniform(sites: dict[str, SiteInfo]) -> Criticality:
    """Return a criticality of equal scores: what a selection's feasibility is checked with before ranking."""
    shapes = {s: mask_shape(i.shape, i.granularity) for s, i in sites.items()}
    unit = {s: i.elements // math.prod(shapes[s]) for s, i in sites.items()}
    granularity = next(iter(sites.values())).granularity
    return Criticality("uniform", granularity, {s: torch.ones(shapes[s]) for s in shapes}, unit)


def _fitting(base, empty: bool, data, config, caps, work, progress):
    """Return (ranked, selection) when the selector meets the goal on `base`, else the BudgetError why not."""
    example = data.train.x[:1]
    if not empty and lower_bound_s(base, example, config) > config.latency_budget:
        return BudgetError(f"with no non-linearity at all it misses the {config.label}")
    site_info = find_sites(base, config.kinds or None, config.granularity)
    if not site_info:
        return BudgetError("it has no sites left to optimize")
    fitted = fit_replacements(base, data, config, site_info)
    try:
        if not empty:  # equal scores first: whether any selection fits, before ranking the smaller model
            select(Ranked(base, site_info, fitted, _uniform(site_info), "", ""), example, config, {})
        ranked = _rank(base, site_info, base, data, config, work, progress, fitted)
        return ranked, select(ranked, example, config, caps)
    except BudgetError as exc:
        return exc


def _with_structure(teacher, data, config, caps, work, progress):
    """Return (ranked, selection, pruning, trials): nothing pruned where the selector meets the latency goal
    so; else, per channel fraction, the fewest residual branches dropped (least important first) with which
    it does, each candidate fine-tuned briefly and the best on validation kept (BudgetError when none)."""
    example = data.train.x[:1]
    found = _fitting(teacher, True, data, config, caps, work, progress)
    if not isinstance(found, BudgetError):
        return *found, Pruning(), []
    scores = cached_scores(teacher, data, config, work)
    shortlist = []
    for keep in KEEP_FRACTIONS:
        for n in range(len(scores.branches) + 1):
            cand = candidate(teacher, example, scores, keep, n)
            if cand.empty:
                continue
            fits = _fitting(apply_pruning(teacher, cand, example), False, data, config, caps, work, progress)
            if not isinstance(fits, BudgetError):
                shortlist.append((cand, *fits))
                break
    if not shortlist:
        raise BudgetError(f"{found}; no channel fraction or residual branches removed meet it either")
    trials = []
    for cand, ranked, selection in shortlist:
        student = _build(ranked, selection, config, data)[0] if len(shortlist) > 1 else None
        acc = trial_accuracy(teacher, student, cand, data, config, work) if student is not None else None
        trials.append({"removed": cand.describe(), "keep": cand.keep, "branches": len(cand.branches),
                       "estimated_loss": cand.loss, "trial_val_accuracy": acc})  # fmt: skip
    best = max(range(len(shortlist)), key=lambda i: trials[i]["trial_val_accuracy"] or 0.0)
    cand, ranked, selection = shortlist[best]
    note(
        f"structure: {cand.describe()} meets the {config.label}"
        + (f" (best of {len(trials)} trials)" if len(trials) > 1 else "")
    )
    return ranked, selection, cand, trials
