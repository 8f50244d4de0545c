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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from relu_opt import atomic
from relu_opt.api import count
from relu_opt.backends import DEFAULT_BACKEND, Pricing
from relu_opt.cache import cache_dir, file_digest
from relu_opt.checked_io import load_cache, load_torch
from relu_opt.data import Dataset, load_dataset
from relu_opt.loading import load_weights, resolve_model
from relu_opt.models.pretrained import list_pretrained, load_pretrained
from relu_opt.optimizer import OptimizeConfig, OptimizeResult, check_budget, optimize, optimize_lowest_latency
from relu_opt.plan import load
from relu_opt.train import TrainConfig, evaluate, fit
from relu_opt.validation import check_model_input


@dataclass(frozen=True)
class RunConfig:
    """Everything `relu-opt run` takes; the defaults are the built-in job."""

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
    strategy: str = "taylor"
    replace: str = "poly"
    granularity: str = "channel"
    baseline_epochs: int = 3
    epochs: float = 1.0  # measured at 1/10 of the ReLUs: -0.16 points test, about 3 of the run's 5 minutes
    max_train: int | None = None
    samples: int = 8
    bench_batch: int | None = 1  # samples per encrypted forward: 1 measures what one private query costs
    parties: int = 2
    bench_runs: int = 2
    timeout: float = 300
    device: str = "cpu"
    seed: int = 0
    max_drop: float | None = None
    public_coeffs: bool = False  # unfoldable polynomials keep public coefficients under PI (opt-in)
    selector: str = "latency"  # relu_opt/selection.py
    rounds_budget: float | None = None  # modeled rounds, on top of the ReLU budget (latency selector)
    latency_budget: float | None = None  # modeled seconds on `network` (latency selector)
    network: str = "wan"
    backend: str = DEFAULT_BACKEND
    dealer: str = ""  # "" = the backend's honest default; "party0" is insecure, labelled everywhere

    def pricing(self, cache: str | os.PathLike | None = None) -> Pricing:
        """Return the Pricing this run selects with and benches under."""
        return Pricing(self.backend, self.dealer, self.parties, self.network, None if cache is None else str(cache))


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
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("relu-opt", "torch", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return {**out, **pricing.engine().versions()}


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(spec: str) -> str:
    return spec.replace("/", "_").replace(":", "_")


def _baseline(cfg: RunConfig, data: Dataset, cache: Path, log: Callable[[str], None]):
    loaded = resolve_model(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[1])
    model = loaded.model
    check_model_input(model, data.input_shape, f"'{cfg.model}'", num_classes=data.num_classes)
    if cfg.budgets:  # refuse a budget the model cannot meet before training the baseline
        total = count(model, data.train.x[:1], name=cfg.model).total_relu
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
    key = _key(cfg.model, cfg.data, cfg.data_dir, cfg.baseline_epochs, cfg.max_train, cfg.seed)
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
    torch.manual_seed(cfg.seed)
    fit(
        model,
        data,
        TrainConfig(epochs=cfg.baseline_epochs, lr=0.05, max_train=cfg.max_train, device=cfg.device, seed=cfg.seed),
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
    cache: str | os.PathLike | None = None,
    command: str = "",
    log: Callable[[str], None] = lambda _m: None,
) -> RunResult:
    """Run the main job and write runs/<timestamp>/; returns the RunResult (also in report.json)."""
    from relu_opt.bench import bench
    from relu_opt.modeled_cost import read_folder_costs
    from relu_opt.report import result_key, result_label, write_optimize_report

    cache = Path(cache) if cache else cache_dir()
    pricing = cfg.pricing(cache)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = load_dataset(cfg.data, cfg.data_dir)
    model, baseline_info = _baseline(cfg, data, cache, log)
    seconds["baseline"] = time.perf_counter() - t
    example = data.train.x[:1]
    before = count(model, example, name=cfg.model)
    _, test_acc = evaluate(model, data.test, device=cfg.device)
    baseline_info.update(relu=before.total_relu, test_accuracy=100 * test_acc)
    search = not cfg.budgets and cfg.selector == "latency" and cfg.rounds_budget is None and cfg.latency_budget is None
    budgets: list[int | None] = list(cfg.budgets)
    if not budgets:  # the latency selector: the search, or the rounds/latency budget alone
        budgets = [None] if cfg.selector == "latency" else [max(1, int(before.total_relu * cfg.fraction))]

    t = time.perf_counter()
    weights_key = file_digest(baseline_info["source"])[:10]
    work = cache / "runs" / f"{_slug(cfg.model)}_{cfg.data}_{weights_key}"
    results: list[OptimizeResult] = []
    for b in budgets:
        ocfg = OptimizeConfig(
            budget=b,
            strategy=cfg.strategy,
            replace=cfg.replace,
            granularity=cfg.granularity,
            epochs=cfg.epochs,
            max_train=cfg.max_train,
            max_drop=cfg.max_drop,
            device=cfg.device,
            seed=cfg.seed,
            public_coeffs=cfg.public_coeffs,
            selector=cfg.selector,
            rounds_budget=cfg.rounds_budget,
            latency_budget=cfg.latency_budget,
            pricing=pricing,
        )
        folder = work / f"{cfg.strategy}_{cfg.replace}_{cfg.granularity}_{cfg.selector}"
        if search:
            levels = ", ".join(f"{f:g}" for f in sorted(cfg.latency_levels))
            log(
                f"optimize: the lowest modeled latency on {pricing.net().name} within "
                f"{1.0 if cfg.max_drop is None else cfg.max_drop:g} points, trying {levels} x the original's "
                f"({cfg.strategy}, {cfg.replace}, {cfg.granularity})"
            )
            results.append(
                optimize_lowest_latency(
                    model, data, ocfg, folder / "lowest_latency", base_spec=cfg.model, fractions=cfg.latency_levels
                )
            )
            continue
        log(f"optimize: {ocfg.label} of {before.total_relu:,} ReLUs ({cfg.strategy}, {cfg.replace}, {cfg.granularity})")
        results.append(optimize(model, data, ocfg, folder / ocfg.dirname, base_spec=cfg.model))
    seconds["optimize"] = time.perf_counter() - t
    best = results[-1]
    optimized = load(best.outdir)
    after = count(optimized, example, name=f"{cfg.model} @ {result_label(best.to_dict())}")

    t = time.perf_counter()
    test = data.test.subset(cfg.samples)
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
        public_coeffs=cfg.public_coeffs,
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
        from relu_opt.report import render_run

        render_run(partial)
        os.replace(partial, final)  # the folder appears complete or not at all
    except BaseException:  # Ctrl-C, SIGTERM or an error: no half-written run folder stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
