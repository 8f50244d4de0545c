"""The main job: from a model to an optimized ONNX graph and its measured encrypted cost, in one call.

Stages: baseline (trained once, cached), census, optimize (one or more budgets), export and verify, a
bench of original vs optimized vs linear floor with real parties and dealer, and a report folder. Heavy
stages keep their state in the cache, so an interrupted run resumes where it stopped, and a rerun reuses
the baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch

from relu_opt import atomic, distributed
from relu_opt.backends import Pricing
from relu_opt.cache import cache_dir, file_digest
from relu_opt.checked_io import load_cache, load_torch
from relu_opt.data import Dataset, load_dataset
from relu_opt.errors import ConfigError
from relu_opt.loading import load_weights, resolve_model
from relu_opt.models.pretrained import list_pretrained, load_pretrained
from relu_opt.optimizer import OptimizeConfig, OptimizeResult, check_budget, optimize, optimize_lowest_latency
from relu_opt.passes.census import census_of
from relu_opt.plan import load
from relu_opt.training import TrainConfig, evaluate, fit
from relu_opt.validation import check_model_input


@dataclass(frozen=True)
class RunConfig:
    """Everything `relu-opt run` takes; the defaults are the built-in job. How to optimize, and the pricing
    (backend, dealer, parties, network, cost-model cache) it selects and benches with, is `optimize`."""

    model: str = "resnet20"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    weights: str | None = None
    pretrained: bool = True  # start from the shipped weights for (model, data) when there are any
    # empty: with the latency selector and no other constraint, the lowest modeled latency within max_drop
    # (1 point) among `latency_levels` x the original's; with the count selector, `fraction` of the ReLUs
    budgets: tuple[int, ...] = ()
    fraction: float = 0.1
    # 0.25 (every ResNet-20 site a polynomial) collapsed to 51.6% val in one epoch, and each failed level
    # costs a fine-tuning: the default job starts at 0.35 to finish in 10 minutes
    latency_levels: tuple[float, ...] = (0.35, 0.5, 0.7)
    baseline_epochs: int = 3
    samples: int | None = None  # test samples benched; None: the backend's default_samples
    bench_batch: int | None = 1  # samples per encrypted forward: 1 measures what one private query costs
    bench_runs: int = 2
    timeout: float = 300
    # epochs 1: measured at 1/10 of the ReLUs, -0.16 points test, about 3 of the run's 5 minutes
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)

    def __post_init__(self) -> None:
        from relu_opt import validation as v

        if not isinstance(self.optimize, OptimizeConfig):
            raise ConfigError(f"optimize is a {type(self.optimize).__name__}, not an OptimizeConfig")
        if self.optimize.budget is not None:
            raise ConfigError("give run budgets as RunConfig(budgets=(...)), not in its OptimizeConfig")
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be a name, e.g. {name}='resnet20'")
        if isinstance(self.budgets, str | int | float) or not isinstance(self.budgets, tuple | list):
            raise ConfigError(f"budgets {self.budgets!r} must be a tuple of integers, e.g. budgets=(20000,)")
        object.__setattr__(self, "budgets", tuple(self.budgets))
        if not self.latency_levels or any(
            not isinstance(f, int | float) or not 0 < f <= 1 for f in self.latency_levels
        ):
            raise ConfigError(f"latency_levels {self.latency_levels!r} must be fractions in (0, 1], e.g. (0.35, 0.5)")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ConfigError(f"budget {b!r} must be an integer of 0 or more (ReLU elements per sample to keep)")
        v.check_int("baseline_epochs", self.baseline_epochs)
        v.check_int("samples", self.samples)
        v.check_int("bench_batch", self.bench_batch)
        v.check_int("bench_runs", self.bench_runs)
        v.check_float("timeout", self.timeout)
        v.check_float("fraction", self.fraction, maximum=1.0)
        v.check_input_file(self.weights, "--weights")

    def pricing(self, cache: str | os.PathLike | None = None) -> Pricing:
        """Return the Pricing this run selects with and benches under (cache: where the optimize config's
        pricing does not name one)."""
        p = self.optimize.pricing
        return p if cache is None or p.cache is not None else replace(p, cache=str(cache))


@dataclass(frozen=True)
class RunResult:
    rundir: str
    config: dict
    baseline: dict
    census_before: dict
    census_after: dict
    optimized: list[dict]
    bench: dict
    command: str
    versions: dict
    seconds: dict = field(default_factory=dict)
    modeled: dict = field(default_factory=dict)  # budget -> the cost model's original/optimized/floor costs

    def to_dict(self) -> dict:
        return asdict(self)


def versions(pricing: Pricing) -> dict[str, str]:
    """Return the versions of the libraries a result depends on (the backend's engine included)."""
    from relu_opt.backends.base import package_version

    out = {"python": sys.version.split()[0]}
    out.update({pkg: package_version(pkg, "not installed") for pkg in ("relu-opt", "torch", "onnx", "onnxruntime")})
    return {**out, **pricing.engine().versions()}


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(spec: str) -> str:
    return spec.replace("/", "_").replace(":", "_")


def _baseline(cfg: RunConfig, data: Dataset, cache: Path, log: Callable[[str], None]):
    o = cfg.optimize
    loaded = resolve_model(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[1])
    model = loaded.model
    check_model_input(model, data.input_shape, f"'{cfg.model}'", num_classes=data.num_classes)
    if cfg.budgets:  # refuse a budget the model cannot meet before training the baseline
        total = census_of(model, data.train.x[:1], cfg.model).total_relu
        for b in cfg.budgets:
            check_budget(b, total)
    if cfg.weights:
        load_weights(model, cfg.weights)
        return model.eval(), {"source": cfg.weights, "cached": False}
    shipped = [r for r in list_pretrained(cfg.model) if r.dataset == cfg.data] if cfg.pretrained else []
    if shipped:
        rec = shipped[0]
        log(f"baseline: shipped pretrained {cfg.model} on {cfg.data} ({rec.test_accuracy:.2f}% test, sha256 checked)")
        load_pretrained(model, rec)
        return model.eval(), {"source": str(rec.path), "cached": False, "pretrained": rec.command}
    key = _key(cfg.model, cfg.data, cfg.data_dir, cfg.baseline_epochs, cfg.optimize.max_train, cfg.optimize.seed)
    path = cache / "baselines" / f"{_slug(cfg.model)}_{cfg.data}_e{cfg.baseline_epochs}_{key}.pt"
    state = load_cache(path, lambda p: load_torch(p, "cached baseline"), note=log)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError:
            path.unlink(missing_ok=True)
            log(f"note: cached baseline '{path}' does not fit the model; training it again")
        else:
            log(f"baseline: reusing {path}")
            return model.eval(), {"source": str(path), "cached": True}
    log(f"baseline: training {cfg.model} on {cfg.data} for {cfg.baseline_epochs} epochs (cached at {path})")
    torch.manual_seed(cfg.optimize.seed)
    fit(
        model,
        data,
        TrainConfig(epochs=cfg.baseline_epochs, lr=0.05, max_train=o.max_train, device=o.device, seed=o.seed),
        checkpoint=path.with_name(path.name + ".ckpt"),
        resume=True,
        description="baseline epoch",
        resume_hint="rerun the same command to continue from there",
    )
    atomic.save_torch(model.cpu().state_dict(), path)
    path.with_name(path.name + ".ckpt").unlink(missing_ok=True)
    return model.eval(), {"source": str(path), "cached": False}


def run(
    cfg: RunConfig,
    runs_dir: str | os.PathLike = "runs",
    command: str = "",
    log: Callable[[str], None] = lambda _m: None,
) -> RunResult:
    """Run the main job and write runs/<timestamp>/; returns the RunResult (also in report.json). Caches
    (baseline, rankings, cost model) go to cfg.optimize.pricing.cache, else the user cache."""

    o = cfg.optimize
    cache = Path(o.pricing.cache) if o.pricing.cache else cache_dir()
    pricing = cfg.pricing(cache)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = load_dataset(cfg.data, cfg.data_dir)
    model, baseline_info = _baseline(cfg, data, cache, log)
    seconds["baseline"] = time.perf_counter() - t
    example = data.train.x[:1]
    before = census_of(model, example, cfg.model)
    _, test_acc = evaluate(model, data.test, device=o.device)
    baseline_info.update(relu=before.total_relu, test_accuracy=100 * test_acc)
    budgets: list[int | None] = list(cfg.budgets)
    if not budgets:  # the latency selector: the search, or the rounds/latency budget alone
        budgets = [None] if o.selector == "latency" else [max(1, int(before.total_relu * cfg.fraction))]

    t = time.perf_counter()
    weights_key = distributed.on_main(lambda: file_digest(baseline_info["source"]))[:10]
    work = cache / "runs" / f"{_slug(cfg.model)}_{cfg.data}_{weights_key}"
    folder = work / f"{o.strategy}_{o.replace}_{o.granularity}_{o.selector}"
    method = f"({o.strategy}, {o.replace}, {o.granularity})"
    results: list[OptimizeResult] = []
    for b in budgets:
        ocfg = replace(o, budget=b, pricing=pricing)
        if ocfg.searches:
            levels = ", ".join(f"{f:g}" for f in sorted(cfg.latency_levels))
            limit = 1.0 if o.max_drop is None else o.max_drop
            log(
                f"optimize: the lowest modeled latency on {pricing.net().name} within {limit:g} points, "
                f"trying {levels} x the original's {method}"
            )
            where = folder / "lowest_latency"
            results.append(optimize_lowest_latency(model, data, ocfg, where, cfg.model, fractions=cfg.latency_levels))
            continue
        log(f"optimize: {ocfg.label} of {before.total_relu:,} ReLUs {method}")
        results.append(optimize(model, data, ocfg, folder / ocfg.dirname, cfg.model, work=folder / ".work"))
    seconds["optimize"] = time.perf_counter() - t
    # export, bench and the report folder are rank 0's (with several ranks the others wait for its result)
    return distributed.on_main(
        lambda: _measure_and_report(
            cfg, data, model, baseline_info, before, results, pricing, runs_dir, command, log, seconds
        )
    )


def _measure_and_report(cfg, data, model, baseline_info, before, results, pricing, runs_dir, command, log, seconds):
    """Bench original vs optimized vs floor and write the run folder; return the RunResult."""
    from relu_opt.encrypted import bench
    from relu_opt.modeled_cost import read_folder_costs
    from relu_opt.reports import result_key, result_label, write_optimize_report

    o = cfg.optimize
    example = data.train.x[:1]
    best = results[-1]
    optimized = load(best.outdir)
    after = census_of(optimized, example, f"{cfg.model} @ {result_label(best.to_dict())}")

    t = time.perf_counter()
    test = data.test.subset(cfg.samples or pricing.engine().default_samples)
    per = "one query at a time" if cfg.bench_batch == 1 else f"batches of {cfg.bench_batch or len(test)}"
    log(f"bench: {pricing.describe()}, {len(test)} test samples, {per}")
    cost = pricing.cost_model(timeout=cfg.timeout, note=log)
    modeled = {}
    for r in results:  # each budget's report.md and modeled_cost.json, priced by this run's cost model
        write_optimize_report(r, Path(r.outdir), pricing, cost)
        modeled[result_key(r.to_dict())] = read_folder_costs(r.outdir)
    bench_result = bench(
        model,
        test.x,
        test.y,
        optimized=optimized,
        pricing=pricing,
        runs=cfg.bench_runs,
        warmup=1,
        timeout=cfg.timeout,
        cost_model=cost,
        log=log,
        public_coeffs=o.public_coeffs,
        batch=cfg.bench_batch,
    )
    seconds["bench"] = time.perf_counter() - t

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = Path(runs_dir) / stamp
    partial = Path(runs_dir) / f".{stamp}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    try:
        for r in results:
            dest = partial / Path(r.outdir).name
            shutil.copytree(r.outdir, dest, ignore=shutil.ignore_patterns(".work"))
        result = RunResult(
            rundir=str(final),
            config=asdict(cfg),
            baseline=baseline_info,
            census_before=before.to_dict(),
            census_after=after.to_dict(),
            optimized=[r.to_dict() for r in results],
            bench=bench_result.to_dict(),
            command=command,
            versions=versions(pricing),
            seconds=seconds,
            modeled=modeled,
        )
        atomic.write_json(partial / "report.json", result.to_dict())
        from relu_opt.reports import render_run

        render_run(partial)
        os.replace(partial, final)  # the folder appears complete or not at all
    except BaseException:  # Ctrl-C, SIGTERM or an error: no half-written run folder stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
