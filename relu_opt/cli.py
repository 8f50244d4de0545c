"""The relu-opt command line: parse options, call relu_opt's public API, print what relu_opt.render builds."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape

import relu_opt as ro
from relu_opt import cli_options as o
from relu_opt import render

app = typer.Typer(
    help="Find the non-linearities a model does not need for private inference, rewrite them, and measure the "
    "saving with real parties.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out, err = Console(quiet=(_worker := os.environ.get("RANK", "0") != "0")), Console(stderr=True, quiet=_worker)
_debug = {"on": bool(os.environ.get("RELU_OPT_DEBUG"))}


def _fail(message: str, code: int, quiet: bool = False) -> None:
    if _debug["on"]:
        raise
    if (line := ro.distributed.error_line(message, quiet)) is not None:  # of a torchrun job's ranks, each error once
        Console(stderr=True).print(escape(line), soft_wrap=True)
    raise typer.Exit(code) from None


def command(*args, nproc: bool = False, **kwargs):
    """app.command that prints a ReluOptError as one line and exits 2 (traceback with --debug); with `nproc`
    the command also takes --nproc N and then runs as N torchrun ranks."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                if (n := k.pop("nproc", 1)) > 1 and not ro.distributed.launched():  # as N torchrun ranks
                    raise typer.Exit(ro.distributed.spawn(n, sys.argv[1:]))
                ro.distributed.setup(k.get("device", "cpu"))  # a torchrun rank joins its job first
                return fn(*a, **k)
            except ro.TrainingInterrupted as exc:  # a signal stopped every rank: rank 0 says so
                _fail(str(exc), 130, quiet=True)
            except ro.ReluOptError as exc:
                _fail(f"error: {exc}", 2)
            except (EOFError, MemoryError) as exc:  # a truncated file somewhere, or a job too big for memory
                what = "a file ended early (truncated?)" if isinstance(exc, EOFError) else "out of memory"
                _fail(f"error: {what}: {exc or type(exc).__name__}", 2)
            except KeyboardInterrupt:
                _fail("interrupted; finished stages are saved, so the same command resumes", 130)

        if nproc:
            sig = inspect.signature(fn, eval_str=True)
            wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), o.NPROC])
        return app.command(*args, **kwargs)(wrapper)

    return deco


# a usage error (a bad or missing option) in one line, not typer's panel
typer.rich_utils.rich_format_error = lambda e: err.print(render.usage_line(e), soft_wrap=True, markup=False)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    if debug:
        _debug["on"] = True


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _load(model, weights, pretrained, data, data_dir, input_shape, leaf):
    kw = dict(weights=weights, pretrained=pretrained, data=data, data_dir=data_dir, input_shape=input_shape)
    return ro.load_model(model, leaf=leaf or (), **kw)


def _print(items) -> None:
    for item in items:
        out.print(item, soft_wrap=isinstance(item, str))


def _json(path: Path | None, obj: dict) -> None:
    if path:
        out.print(f"wrote {ro.write_json(path, obj)}")


@command("models")
def models_cmd() -> None:
    """List the built-in architectures and the pretrained weights shipped for them (--pretrained)."""
    out.print(render.models_table(ro.zoo()))


@command("count")
def count_cmd(
    model: o.Model,
    input_shape: o.Shape = None,
    weights: o.Weights = None,
    leaf: o.Leaf = None,
    num_classes: o.Classes = None,
    pretrained: o.Pretrained = False,
    json_path: o.Json = None,
) -> None:
    """Print where the ReLUs (and other non-linear ops) are: per site elements, share and feeding MACs."""
    ro.check_writable(json_path, "--json")
    m = ro.load_model(model, weights=weights, pretrained=pretrained, input_shape=input_shape, num_classes=num_classes)
    c = ro.count(m.model, torch.randn(m.input_shape), leaf or (), name=m.name)
    _print(render.count_lines(c))
    _json(json_path, c.to_dict())


@command("export")
def export_cmd(
    model: o.Model,
    output: o.OnnxOut,
    input_shape: o.Shape = None,
    weights: o.Weights = None,
    leaf: o.Leaf = None,
    num_classes: o.Classes = None,
    pretrained: o.Pretrained = False,
    opset: o.Opset = ro.DEFAULT_OPSET,
    public_coeffs: o.PublicCoeffs = False,
) -> None:
    """Write a verified ONNX graph: checker, onnxruntime parity and ReLU count against the census."""
    ro.check_writable(output, "-o")
    m = ro.load_model(model, weights=weights, pretrained=pretrained, input_shape=input_shape, num_classes=num_classes)
    r = ro.export(m.model, torch.randn(m.input_shape), output, opset, leaf or (), public_coeffs)
    _print(render.export_lines(r))


@command("bench")
def bench_cmd(
    model: o.Model,
    leaf: o.Leaf = None,
    optimized: o.Optimized = None,
    parties: o.Parties = 2,
    samples: o.Samples = 2,
    batch: o.Batch = None,
    data: o.BenchData = None,
    data_dir: o.DataDir = None,
    runs: o.Runs = 3,
    warmup: o.Warmup = 1,
    timeout: o.Timeout = 300,
    lan: o.Lan = "0.5,1000",
    wan: o.Wan = "40,100",
    json_path: o.Json = None,
    input_shape: o.Shape = None,
    weights: o.Weights = None,
    num_classes: o.Classes = None,
    pretrained: o.Pretrained = False,
    rank: o.Rank = None,
    role: o.Role = None,
    world_size: o.WorldSize = None,
    master_addr: o.MasterAddrOpt = None,
    master_port: o.MasterPortOpt = None,
    ifname: o.Ifname = None,
    link: o.Link = None,
    public_coeffs: o.BenchPublicCoeffs = False,
    dealer: o.Dealer = None,
    backend: o.BackendOpt = ro.DEFAULT_BACKEND,
    protocol: o.Protocol = None,
    cache_dir: o.CacheDir = None,
) -> None:
    """Run the original, optimized and linear-floor models with real parties (and the dealer); report online
    rounds and bytes, offline (dealer) bytes, and latency."""
    ro.check_writable(json_path, "--json")
    host = ro.HostRole.from_options(role, rank, world_size, parties, master_addr, master_port, ifname)
    n = host.world_size if host is not None else parties
    pricing = ro.Pricing(backend, dealer, n, cache=_str(cache_dir), protocol=protocol)
    networks = (ro.parse_network("lan", lan), ro.parse_network("wan", wan))
    if pricing.insecure and host is not None and not host.is_dealer:  # a local bench says it with its others
        err.print(f"[bold red]warning:[/] --dealer {pricing.dealer_name}: {pricing.insecure}", soft_wrap=True)
    kw = dict(data=data, data_dir=data_dir, samples=samples, optimized=optimized, pricing=pricing, host=host)
    kw.update(runs=runs, warmup=warmup, timeout=timeout, networks=networks, link=link, public_coeffs=public_coeffs)
    kw.update(batch=batch, weights=weights, pretrained=pretrained, input_shape=input_shape, num_classes=num_classes)
    kw.update(leaf=leaf or ())
    who = "running " + pricing.describe() if host is None else f"{host.role} {host.rank}: waiting for the others"
    with out.status(who + " (the first bench also measures the cost model)"):
        r = ro.bench(model, log=lambda m: err.print(escape(m), soft_wrap=True), **kw)
    if host is not None and host.is_dealer:
        out.print(f"the dealer served the run over {r.hosts['interface']} and stopped")
    else:
        _print(render.bench_lines(r))
    _json(json_path, r.to_dict())


@command("link")
def link_cmd(
    rank: o.LinkRank,
    master_addr: o.MasterAddr,
    world_size: o.LinkWorldSize = 2,
    master_port: o.MasterPort = 29500,
    ifname: o.LinkIfname = None,
    timeout: o.LinkTimeout = 120,
    json_path: o.LinkJson = None,
) -> None:
    """Measure RTT and bandwidth per direction between the parties, over the backend's own transport."""
    ro.check_writable(json_path, "--json")
    host = ro.HostRole.from_options("party", rank, world_size, world_size, master_addr, master_port, ifname)
    with out.status(f"party {rank}: measuring the link to party 0 at {master_addr}"):
        m = ro.link(host, timeout)
    _print(render.link_lines(m, rank))
    _json(json_path, m.to_dict())


@command("train", nproc=True)
def train_cmd(
    model: o.Model,
    output: o.WeightsOut,
    data: o.Data = "fashion-mnist",
    data_dir: o.DataDir = None,
    epochs: o.TrainEpochs = 5,
    lr: o.Lr = 0.05,
    batch_size: o.BatchSize = 128,
    max_train: o.MaxTrain = None,
    resume: o.Resume = False,
    device: o.Device = "cpu",
    weights: o.Weights = None,
    pretrained: o.Pretrained = False,
    input_shape: o.Shape = None,
    leaf: o.Leaf = None,
    seed: o.TrainSeed = 0,
) -> None:
    """Train a baseline: SGD + cosine, a checkpoint each epoch (OUTPUT.ckpt), --resume, Ctrl-C saves."""
    ro.check_writable(output, "-o")
    torch.manual_seed(seed)
    m = _load(model, weights, pretrained, data, data_dir, input_shape, leaf)
    options = dict(epochs=epochs, lr=lr, batch_size=batch_size, max_train=max_train, device=device, seed=seed)
    r = ro.train(m.model, m.data, output, resume=resume, **options)
    out.print(render.train_line(r), soft_wrap=True)


@command("rank", nproc=True)
def rank_cmd(
    model: o.Model,
    weights: o.Weights = None,
    pretrained: o.Pretrained = False,
    data: o.Data = "fashion-mnist",
    data_dir: o.DataDir = None,
    input_shape: o.Shape = None,
    leaf: o.Leaf = None,
    strategy: o.Strategy = "taylor",
    replace: o.Replace = "poly",
    granularity: o.Granularity = "channel",
    kinds: o.RankKinds = None,
    budget: o.RankBudget = None,
    samples: o.RankSamples = 5000,
    finetune_steps: o.FinetuneSteps = 0,
    seed: o.RankSeed = 0,
    json_path: o.Json = None,
    device: o.Device = "cpu",
) -> None:
    """Rank each site (and channel or pixel) by how much the model needs it: the ranking `optimize` uses
    with the same options (every kind, every replacement, the same cache)."""
    ro.check_writable(json_path, "--json")
    config = ro.OptimizeConfig(
        budget=budget,
        strategy=strategy,
        replace=replace,
        granularity=granularity,
        kinds=kinds or (),
        rank_samples=samples,
        rank_finetune_steps=finetune_steps,
        device=device,
        seed=seed,
    )
    m = _load(model, weights, pretrained, data, data_dir, input_shape, leaf)
    crit = ro.rank(m.model, m.data, config, progress=True)
    out.print(render.rank_table(crit))
    _json(json_path, crit.to_dict())


def _optimize_config(o: dict) -> ro.OptimizeConfig:
    """Return the OptimizeConfig of the options optimize and run share."""
    keys = ("backend", "dealer", "parties", "network", "cache", "protocol")
    pricing = ro.Pricing(**{k: o.pop(k) for k in keys})
    return ro.OptimizeConfig(pricing=pricing, **o)


@command(
    "optimize",
    nproc=True,
    epilog="Budgets: --budget (elements per sample, exact on the ONNX graph), --rounds-budget and --latency-budget "
    "(modeled by the backend's cost model on --network). With none, the lowest modeled latency (0.25, 0.35, 0.5, "
    "0.7 of the original's) whose validation accuracy stays within --max-drop (default 1 point).",
)
def optimize_cmd(
    model: o.Model,
    output: o.FolderOut,
    leaf: o.Leaf = None,
    budget: o.OptimizeBudget = None,
    budgets: o.Budgets = None,
    weights: o.Weights = None,
    pretrained: o.Pretrained = False,
    data: o.Data = "fashion-mnist",
    data_dir: o.DataDir = None,
    strategy: o.Strategy = "taylor",
    replace: o.Replace = "poly",
    granularity: o.Granularity = "channel",
    degree: o.Degree = 2,
    poly_per: o.PolyPer = "channel",
    epochs: o.Epochs = 1.0,
    lr: o.OptimizeLr = 0.01,
    input_shape: o.Shape = None,
    rank_samples: o.OptimizeRankSamples = 5000,
    snl_epochs: o.SnlEpochs = 1.0,
    max_train: o.MaxTrain = None,
    range_weight: o.RangeWeight = 0.0,
    max_drop: o.MaxDrop = None,
    device: o.Device = "cpu",
    kinds: o.OptimizeKinds = None,
    kind_budget: o.KindBudget = None,
    selector: o.Selector = "latency",
    rounds_budget: o.RoundsBudget = None,
    latency_budget: o.LatencyBudget = None,
    network: o.NetworkOpt = "wan",
    prune: o.Prune = None,
    public_coeffs: o.PublicCoeffs = False,
    parties: o.Parties = 2,
    dealer: o.Dealer = None,
    backend: o.BackendOpt = ro.DEFAULT_BACKEND,
    protocol: o.Protocol = None,
    cache_dir: o.CacheDir = None,
    seed: o.OptimizeSeed = 0,
) -> None:
    """Keep the most critical non-linear elements that fit the budgets, replace the rest, fine-tune with KD."""
    if budget is not None and budgets is not None:
        raise ro.ConfigError("give --budget or --budgets, not both")
    options = {k: v for k, v in locals().items() if k not in ("model", "output", "budget", "budgets", "weights")}
    for k in ("pretrained", "data", "data_dir", "input_shape", "kind_budget", "snl_epochs", "cache_dir", "leaf"):
        del options[k]
    options.update(kinds=kinds or (), kind_budgets=o.kind_budgets(kind_budget), rank_epochs=snl_epochs)
    config = _optimize_config({**options, "cache": _str(cache_dir)})
    ro.check_writable(output, "-o", folder=True)
    m = _load(model, weights, pretrained, data, data_dir, input_shape, leaf)
    # each budget in a folder of its own, with the frontier's pareto.md; no budget: the search's folders
    levels = o.ints(budgets, "--budgets") or ([budget] if budget is not None or not config.searches else None)
    ro.check_optimize(m.model, m.data, None, levels, output, config)
    if weights is None and not pretrained:
        err.print("warning: no --weights or --pretrained given: the model optimized is untrained", soft_wrap=True)
    r = ro.optimize(m.model, m.data, None, levels, output, config, base_spec=m.name, progress=True)
    _print(render.optimize_lines(r if isinstance(r, list) else [r], auto=config.searches))
    if levels is not None:
        out.print(f"wrote {output}/pareto.md and pareto.png")


@command("run", nproc=True)
def run_cmd(
    model: o.RunModel = "resnet20",
    data: o.Data = "fashion-mnist",
    data_dir: o.DataDir = None,
    weights: o.Weights = None,
    pretrained: o.RunPretrained = True,
    max_drop: o.MaxDrop = None,
    budget: o.RunBudget = None,
    budgets: o.RunBudgets = None,
    strategy: o.Strategy = "taylor",
    replace: o.Replace = "poly",
    granularity: o.Granularity = "channel",
    baseline_epochs: o.BaselineEpochs = 3,
    epochs: o.Epochs = 1.0,
    max_train: o.MaxTrain = None,
    samples: o.RunSamples = None,
    batch: o.RunBatch = 1,
    parties: o.Parties = 2,
    timeout: o.Timeout = 300,
    runs_dir: o.RunsDir = Path("runs"),
    cache_dir: o.CacheDir = None,
    dealer: o.Dealer = None,
    backend: o.BackendOpt = ro.DEFAULT_BACKEND,
    protocol: o.Protocol = None,
    device: o.Device = "cpu",
    public_coeffs: o.PublicCoeffs = False,
    selector: o.Selector = "latency",
    rounds_budget: o.RoundsBudget = None,
    latency_budget: o.LatencyBudget = None,
    network: o.NetworkOpt = "wan",
    prune: o.Prune = None,
) -> None:
    """The main job: baseline, optimize, verified ONNX, an encrypted bench with real parties and a dealer that
    is neither of them, and a report folder."""
    if budget is not None and budgets is not None:
        raise ro.ConfigError("give --budget or --budgets, not both")
    optimize = dict(strategy=strategy, replace=replace, granularity=granularity, epochs=epochs, max_train=max_train)
    optimize.update(max_drop=max_drop, device=device, public_coeffs=public_coeffs, selector=selector)
    optimize.update(rounds_budget=rounds_budget, latency_budget=latency_budget, prune=prune)
    optimize.update(dealer=dealer, parties=parties, network=network, cache=_str(cache_dir))
    optimize.update(backend=backend, protocol=protocol)
    config = ro.RunConfig(
        model=model,
        data=data,
        data_dir=_str(data_dir),
        weights=_str(weights),
        pretrained=pretrained,
        budgets=tuple(o.ints(budgets, "--budgets") or ([budget] if budget is not None else [])),
        baseline_epochs=baseline_epochs,
        samples=samples,
        bench_batch=batch,
        timeout=timeout,
        optimize=_optimize_config(optimize),
    )
    command_line = "relu-opt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("relu-opt") else "relu-opt run"
    r = ro.run(config, runs_dir, command_line, log=lambda m: out.print(f"[bold cyan]>[/] {escape(m)}", soft_wrap=True))
    _print(render.run_summary(r))


@command("report")
def report_cmd(
    rundir: o.RunDir,
) -> None:
    """Re-render a run's report.md and figures from its report.json."""
    out.print(f"wrote {ro.report(rundir)}")


def _exit_on_signal(signum, _frame) -> None:
    """Turn SIGTERM and SIGHUP into an exit that runs every cleanup (parties stopped, temp files removed); in a
    torchrun job (it stops the ranks when one fails) the training cut short says why instead."""
    resumes = len(sys.argv) > 1 and sys.argv[1] in ("run", "optimize", "train")
    hint = "; finished stages are saved, so the same command resumes" if resumes else ""
    if ro.distributed.world_size() == 1:
        err.print(f"stopped by signal {signum}{hint}", soft_wrap=True)
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    app()


if __name__ == "__main__":
    main()
