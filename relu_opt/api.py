"""The Python API: everything the command line does, on any nn.Module.

    import relu_opt
    m = relu_opt.load_model("resnet20", pretrained=True, data="fashion-mnist")
    print(relu_opt.count(m.model, torch.randn(m.input_shape)).total_relu)
    r = relu_opt.optimize(m.model, m.data, budget=5000, outdir="out", epochs=0.1)
    b = relu_opt.bench(m.model, data="fashion-mnist", optimized=r.outdir, samples=2)

Each function checks its inputs first and raises a relu_opt.ReluOptError with one line naming the bad
input and the fix; nothing is written before the checks pass. docs/api.md walks through each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from relu_opt import distributed, validation
from relu_opt.backends import HostRole, Network, Pricing
from relu_opt.data import Dataset, load_dataset
from relu_opt.encrypted import BenchResult
from relu_opt.errors import ConfigError, InputShapeError
from relu_opt.graph import parse_input_shape, trace
from relu_opt.loading import Loaded, dataset_for, load_model
from relu_opt.onnx_export import DEFAULT_OPSET, ExportResult
from relu_opt.optimizer import OptimizeConfig, OptimizeResult
from relu_opt.passes.census import Census, census_of
from relu_opt.pipeline import RunConfig, RunResult
from relu_opt.plan import load
from relu_opt.ranking import Criticality
from relu_opt.training import TrainConfig, TrainResult

__all__ = [
    "ModelInfo",
    "TrainOutcome",
    "bench",
    "check_optimize",
    "count",
    "export",
    "link",
    "load",
    "load_model",
    "zoo",
    "optimize",
    "rank",
    "report",
    "run",
    "train",
]


@dataclass(frozen=True)
class ModelInfo:
    """A built-in architecture and the weights shipped for it."""

    name: str
    default_input_shape: tuple[int, ...]
    description: str
    pretrained: tuple[tuple[str, float], ...]  # (dataset, test accuracy %)


def zoo() -> list[ModelInfo]:
    """Return the built-in architectures with their shipped pretrained weights."""
    from relu_opt.models import get_entry, list_models
    from relu_opt.models.pretrained import list_pretrained

    out = []
    for name in list_models():
        e = get_entry(name)
        shipped = tuple((r.dataset, r.test_accuracy) for r in list_pretrained(name))
        out.append(ModelInfo(name, tuple(e.default_input_shape), e.description, shipped))
    return out


def _example(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(example, torch.Tensor):
        raise InputShapeError(
            f"example is a {type(example).__name__}, not a tensor; give one input batch, e.g. torch.randn(1, 3, 32, 32)"
        )
    if not example.is_floating_point():
        raise InputShapeError(f"example has dtype {example.dtype}; give a float tensor, e.g. torch.randn(1, 3, 32, 32)")
    validation.check_model_input(model, tuple(example.shape), type(model).__name__)
    return example


def count(model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), name: str = "") -> Census:
    """Return the Census (every non-linear site and its elements per sample) of `model` on `example`."""
    return census_of(model, _example(model, example), name, _leaves(model, leaf))


def _leaves(model: nn.Module, leaf) -> tuple:
    """Return `leaf` as a tuple (one name or class alone is one leaf), its names checked against `model`."""
    leaf = (leaf,) if isinstance(leaf, str | type) else tuple(leaf)
    validation.check_leaf(model, [n for n in leaf if isinstance(n, str)])
    return leaf


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    leaf: Iterable[str | type] = (),
    public_coeffs: bool = False,
) -> ExportResult:
    """Return the ExportResult of writing `model` to ONNX at `path`, verified against PyTorch and census;
    with `public_coeffs`, every polynomial's coefficients are ONNX Constants (CrypTen keeps them public)."""
    from relu_opt.onnx_export import export as write_onnx

    validation.check_output_file(path, "path")
    validation.check_int("opset", opset, 7, 21)
    example, leaf = _example(model, example), _leaves(model, leaf)
    if public_coeffs:
        from relu_opt.passes.public_poly import publicize_polys

        model, leaf = publicize_polys(trace(model, leaf)), ()
    totals = census_of(model, example, "", leaf).totals_by_kind
    return write_onnx(model, example, path, opset=opset, census_totals=totals)


def _dataset(data: Dataset | str, data_dir: str | os.PathLike | None = None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, str):
        raise ConfigError(f"data is a {type(data).__name__}; give a relu_opt.data.Dataset or a dataset name")
    return load_dataset(data, data_dir)


def _config(config: OptimizeConfig | None, options: dict) -> OptimizeConfig:
    if config is not None and not isinstance(config, OptimizeConfig):
        raise ConfigError(f"config is a {type(config).__name__}, not a relu_opt.optimizer.OptimizeConfig")
    try:
        return replace(config, **options) if config is not None else OptimizeConfig(**options)
    except TypeError as exc:  # an option OptimizeConfig does not have
        raise ConfigError(f"{exc}; see relu_opt.optimizer.OptimizeConfig for the options") from None


def _fits(model: nn.Module, data: Dataset) -> None:
    validation.check_model_input(
        model, data.input_shape, type(model).__name__, num_classes=data.num_classes, fix="give a model for this dataset"
    )


def rank(
    model: nn.Module,
    data: Dataset | str,
    config: OptimizeConfig | None = None,
    work: str | os.PathLike | None = None,
    progress: bool = False,
    **options,
) -> Criticality:
    """Return the Criticality `optimize` ranks with for the same options (every kind, every replacement,
    the same ranking cache: WORK, default the user cache's rankings/)."""
    from relu_opt.cache import cache_dir
    from relu_opt.optimizer import rank_model

    data = _dataset(data)
    cfg = _config(config, options)
    if cfg.budget is not None and cfg.strategy != "snl":
        raise ConfigError(
            f"--budget guides the snl ranking only; strategy {cfg.strategy} ranks without it, leave it out"
        )
    _fits(model, data)
    work = Path(work) if work is not None else cache_dir() / "rankings"
    validation.check_output_dir(work, "work")
    distributed.setup(cfg.device)
    return rank_model(model, data, cfg, work, progress).criticality


def check_optimize(
    model: nn.Module,
    data: Dataset | str,
    budget: int | None = None,
    budgets: Iterable[int | None] | None = None,
    outdir: str | os.PathLike = "relu_opt_out",
    config: OptimizeConfig | None = None,
    **options,
) -> OptimizeConfig:
    """Return the OptimizeConfig `optimize` would run with these arguments (its first budget), after every
    check `optimize` makes before it starts work; raise ConfigError naming the first that fails."""
    data = _dataset(data)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model is a {type(model).__name__}, not a torch.nn.Module; load one with relu_opt.load_model"
        )
    if budget is not None and budgets is not None:
        raise ConfigError("give budget= or budgets=, not both")
    if budgets is not None and not isinstance(budgets, list | tuple):
        raise ConfigError(f"budgets={budgets!r} must be a list of budgets, e.g. budgets=[2000, 1000]")
    levels = None if budgets is None else list(budgets)
    if levels is not None and len(set(levels)) != len(levels):
        raise ConfigError(f"--budgets {','.join(map(str, levels))} repeats a budget; give each once")
    if levels is not None and not levels:
        raise ConfigError("budgets= is empty; give one or more budgets, e.g. budgets=[2000, 1000]")
    first = levels[0] if levels is not None else budget
    cfg = _config(config, {**options, **({} if first is None and levels is None else {"budget": first})})
    for b in levels or ():  # each level checked before any work (None: the rounds or latency budget alone)
        if replace(cfg, budget=b).searches:
            raise ConfigError("a frontier level of None needs rounds_budget or latency_budget")
    if cfg.selector == "count" and cfg.budget is None:
        raise ConfigError("--selector count needs --budget (ReLUs); without a budget the latency selector searches")
    _fits(model, data)
    from relu_opt.optimizer.planner import check_budgets

    check_budgets(model, data, cfg, levels or ())  # the model's sites of the kinds asked, each budget against them
    validation.check_output_dir(outdir, "outdir")
    return cfg


def optimize(
    model: nn.Module,
    data: Dataset | str,
    budget: int | None = None,
    budgets: Iterable[int | None] | None = None,
    outdir: str | os.PathLike = "relu_opt_out",
    config: OptimizeConfig | None = None,
    base_spec: str = "",
    progress: bool = False,
    **options,
) -> OptimizeResult | list[OptimizeResult]:
    """Return the OptimizeResult of optimizing `model` (a list with `budgets`, one folder each).

    Budgets: `budget` (elements per sample to keep), `budgets` (a frontier), or the options
    rounds_budget / latency_budget; with none, the lowest modeled latency whose validation accuracy
    stays within max_drop (1 point). `options` are OptimizeConfig fields. OUTDIR gets plan.json,
    model.pt, the verified model.onnx and report.md; relu_opt.load(folder) rebuilds the model."""
    from relu_opt.optimizer import optimize as optimize_one
    from relu_opt.optimizer import optimize_frontier, optimize_lowest_latency
    from relu_opt.reports import write_optimize_report, write_pareto

    data = _dataset(data)
    cfg = check_optimize(model, data, budget, budgets, outdir, config, **options)
    levels = None if budgets is None else list(budgets)
    outdir = Path(outdir)
    distributed.setup(cfg.device)
    if levels is not None:
        results = optimize_frontier(model, data, levels, cfg, outdir, base_spec, progress)
    elif cfg.searches:
        results = [optimize_lowest_latency(model, data, cfg, outdir, base_spec, progress)]
    else:
        results = [optimize_one(model, data, cfg, outdir, base_spec, progress)]

    def reports() -> None:
        for r in results:
            write_optimize_report(r, Path(r.outdir), cfg.pricing)
        if levels is not None:
            write_pareto(results, outdir)

    distributed.on_main(reports)
    return results if levels is not None else results[0]


def _samples(x, y, data, data_dir, samples: int, shape: tuple[int, ...], dealer: bool):
    """Return (x, y): the given samples, a dataset's first test samples, or seeded random inputs; the
    dealer gets zeros (it never sees a sample)."""
    validation.check_int("samples", samples)
    if dealer:
        return torch.zeros(samples, *shape[1:]), None
    if x is not None:
        if len(x) == 0:
            raise InputShapeError("x holds no samples; give at least one")
        if y is not None and (not isinstance(y, torch.Tensor) or len(y) != len(x)):
            raise InputShapeError(f"y must be a tensor of {len(x)} labels, one per sample of x")
        return x, y
    if data is None:
        return torch.randn((samples, *shape[1:]), generator=torch.Generator().manual_seed(0)), None
    ds = dataset_for(data, data_dir, None, "MODEL", shape) if data == "synthetic" else _dataset(data, data_dir)
    if tuple(ds.input_shape[1:]) != tuple(shape[1:]):
        raise InputShapeError(
            f"dataset '{ds.name}' has inputs {ds.input_shape[1:]} but the model takes {tuple(shape[1:])}; "
            f"give a model for it, or --input-shape 1,{','.join(map(str, ds.input_shape[1:]))}"
        )
    test = ds.test.subset(samples)
    return test.x, test.y


def bench(
    model: nn.Module | str,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    data: Dataset | str | None = None,
    data_dir: str | os.PathLike | None = None,
    samples: int = 2,
    optimized: nn.Module | str | os.PathLike | None = None,
    pricing: Pricing | None = None,
    host: HostRole | None = None,
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    networks: tuple[Network, Network] | None = None,
    link: Network | str | None = None,
    public_coeffs: bool = False,
    batch: int | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    input_shape: str | tuple[int, ...] | None = None,
    num_classes: int | None = None,
    leaf: Iterable[str] = (),
    log: Callable[[str], None] = lambda _m: None,
) -> BenchResult:
    """Return the BenchResult of the original, the optimized (a module or an optimize folder) and the
    linear floor run with real parties and the dealer; on separate hosts (`host`), this process's part.

    `model` is a module or a spec (then weights, pretrained, input_shape, num_classes load it). Samples:
    `x` (and labels `y`), else the first `samples` test samples of `data`, else seeded random inputs."""
    from relu_opt.backends import LAN, WAN, load_link
    from relu_opt.encrypted import bench as bench_local
    from relu_opt.encrypted import bench_host
    from relu_opt.plan import read_plan, weights_mismatch

    pricing = pricing or Pricing()
    if not isinstance(pricing, Pricing):
        raise ConfigError(f"pricing is a {type(pricing).__name__}, not a relu_opt.Pricing")
    validation.check_float("timeout", timeout)
    for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0), ("batch", batch, 1)):
        validation.check_int(name, value, least)
    dealer = host is not None and host.is_dealer
    if dealer and not pricing.dealer_info().extra_process:
        raise ConfigError(f"--dealer {pricing.dealer_name} has no dealer process; start only the parties (--rank)")
    if dealer and weights is not None:  # the owner's weights do not belong on the dealer's host
        raise ConfigError("the dealer needs no weights (only the architecture); leave out --weights on its host")
    if host is not None and host.world_size != pricing.parties:
        raise ConfigError(f"{pricing.parties} parties priced but the hosts run {host.world_size}; give the same number")
    if isinstance(link, str):
        try:
            link = load_link(link)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if x is not None and not isinstance(x, torch.Tensor):
        raise InputShapeError(
            f"x is a {type(x).__name__}, not a tensor of samples; give e.g. torch.randn(2, 3, 32, 32)"
        )
    if networks is not None:
        from relu_opt.backends import parse_network

        networks = tuple(parse_network(n, n) if isinstance(n, str) else n for n in networks)
        if len(networks) != 2 or not all(isinstance(n, Network) for n in networks):
            raise ConfigError("networks must be two: (LAN, WAN), as relu_opt.Network or 'RTT_MS,MB_PER_S' strings")
    # the dataset fixes the input shape (the dealer never reads it); random inputs take the model's own
    named = data if isinstance(data, str) and data != "synthetic" and not dealer and input_shape is None else None
    if isinstance(model, str):
        wanted = (data if isinstance(data, str) else True) if pretrained else False  # shipped weights are public
        kw = dict(weights=weights, pretrained=wanted, input_shape=input_shape, num_classes=num_classes, leaf=leaf)
        m = load_model(model, data=named, data_dir=data_dir, **kw)
        model, shape = m.model, m.input_shape
    elif isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
    elif input_shape is not None or isinstance(data, Dataset) or named:
        shape = (
            parse_input_shape(input_shape)
            if input_shape is not None
            else (data if isinstance(data, Dataset) else _dataset(named, data_dir)).input_shape
        )
    else:
        shape = getattr(model, "default_input_shape", None)
        if shape is None:
            raise InputShapeError("give x= (the samples), data= or input_shape=: the model has no default_input_shape")
    x, y = _samples(x, y, data, data_dir, samples, tuple(shape), dealer)
    if batch is not None and batch > len(x):
        raise ConfigError(f"--batch {batch} is more than the {len(x)} samples; give --batch {len(x)} or more --samples")
    _example(model, x[:1])
    warnings: list[str] = []
    if isinstance(optimized, str | os.PathLike):
        folder, plan = str(optimized), read_plan(optimized)
        optimized = load(folder, model=model)  # rebuilt on MODEL once its architecture is checked to fit
        mismatch = weights_mismatch(plan, model, folder)
        if mismatch and (host is None or (not dealer and host.rank == 0)):  # only the owner holds the weights
            log(f"warning: {mismatch}")
            warnings.append(mismatch)
        public_coeffs = public_coeffs or plan.public_coeffs
        validation.check_optimized_fits(optimized, model, tuple(x[:1].shape), folder)
    elif optimized is not None:
        validation.check_optimized_fits(optimized, model, tuple(x[:1].shape), "optimized")
    kw = dict(optimized=optimized, runs=runs, warmup=warmup, timeout=timeout, networks=networks or (LAN, WAN))
    kw.update(link=link, public_coeffs=public_coeffs, batch=batch)
    if host is not None:  # the cost model is never measured here: that would start parties of its own
        r = bench_host(model, x, host, pricing, y=y, cost_model=pricing.cost_model(measure=False), **kw)
    else:
        r = bench_local(
            model, x, y, pricing=pricing, cost_model=pricing.cost_model(timeout=timeout, note=log), log=log, **kw
        )
    return replace(r, warnings=(*warnings, *r.warnings)) if warnings else r


@dataclass(frozen=True)
class TrainOutcome:
    """A training run: its history, and accuracies in percent (as OptimizeResult's) on validation and test."""

    result: TrainResult
    val_accuracy: float
    test_accuracy: float
    path: str | None


def train(
    model: nn.Module,
    data: Dataset | str,
    output: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    **options,
) -> TrainOutcome:
    """Return the TrainOutcome of training `model` in place (SGD, one-cycle cosine; `options` are
    TrainConfig fields); with OUTPUT, its state dict is written there and OUTPUT.ckpt keeps each epoch."""
    from relu_opt import atomic
    from relu_opt.training import evaluate, fit

    data = _dataset(data)
    try:
        cfg = replace(config or TrainConfig(), **options)
    except TypeError as exc:  # an option TrainConfig does not have
        raise ConfigError(f"{exc}; see relu_opt.TrainConfig for the options") from None
    validation.check_int("epochs", cfg.epochs)
    validation.check_int("batch_size", cfg.batch_size)
    validation.check_int("max_train", cfg.max_train)
    validation.check_float("lr", cfg.lr)
    validation.check_device(cfg.device)
    validation.check_output_file(output, "output")
    _fits(model, data)
    distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt = None if output is None else Path(output).with_name(Path(output).name + ".ckpt")
    result = fit(model, data, cfg, checkpoint=ckpt, resume=resume)
    if output is not None:
        atomic.save_torch(model.cpu().state_dict(), output)
    _, test_acc = evaluate(model, data.test)
    return TrainOutcome(result, 100 * result.val_acc, 100 * test_acc, None if output is None else str(output))


def run(
    config: RunConfig | None = None,
    runs_dir: str | os.PathLike = "runs",
    command: str = "",
    log: Callable[[str], None] = lambda _m: None,
) -> RunResult:
    """Return the RunResult of the main job (baseline, optimize, verified ONNX, encrypted bench, report
    folder RUNS_DIR/<timestamp>/); the cost model and caches come from config.optimize.pricing."""
    from relu_opt.pipeline import run as run_job

    config = config or RunConfig()
    if not isinstance(config, RunConfig):
        raise ConfigError(f"config is a {type(config).__name__}, not a relu_opt.pipeline.RunConfig")
    validation.check_output_dir(runs_dir, "runs_dir")
    distributed.setup(config.optimize.device)
    return run_job(config, runs_dir=runs_dir, command=command, log=log)


def report(rundir: str | os.PathLike) -> Path:
    """Return the report.md written anew from a run folder's report.json (checked before use)."""
    from relu_opt.reports import render_run

    if not (Path(rundir) / "report.json").is_file():
        raise ConfigError(f"'{rundir}' has no report.json; give a folder that `relu-opt run` wrote")
    if (Path(rundir) / "plan.json").is_file():
        raise ConfigError(
            f"'{rundir}' is an optimize folder (its report.md is written with it); give a `relu-opt run` folder"
        )
    return render_run(rundir)


def check_writable(path: str | os.PathLike | None, option: str, folder: bool = False) -> None:
    """Raise ConfigError unless a file (or, with `folder`, a folder) can be written at `path` (None passes)."""
    (validation.check_output_dir if folder else validation.check_output_file)(path, option)


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write `obj` as JSON at `path` atomically (whole or not at all); return the path."""
    from relu_opt import atomic

    atomic.write_json(Path(path), obj)
    return Path(path)


def link(host: HostRole, timeout: float = 120):
    """Return the LinkMeasurement (RTT, bandwidth per direction) to party 0 over the backend's transport."""
    validation.check_float("timeout", timeout)
    return Pricing().engine().measure_link(host, timeout)


__all__ += ["Loaded", "check_writable", "write_json"]
