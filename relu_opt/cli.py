"""The relu-opt command line: parse, call the API, render with rich. Nothing else lives here."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relu_opt import api, atomic, validation
from relu_opt.data import load_dataset
from relu_opt.errors import ConfigError, InputShapeError, ReluOptError, WeightsError
from relu_opt.export import DEFAULT_OPSET
from relu_opt.graph import parse_input_shape, propagate_shapes, trace
from relu_opt.loading import load_weights, resolve_model
from relu_opt.models import get_entry, list_models
from relu_opt.passes.census import Census
from relu_opt.train import TrainingInterrupted

app = typer.Typer(
    help="Find the ReLUs a model does not need for private inference, rewrite them, and measure the saving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
_debug = {"on": bool(os.environ.get("RELU_OPT_DEBUG"))}


def command(*args, **kwargs):
    """app.command that prints a ReluOptError as one line and exits 2 (traceback with --debug)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except TrainingInterrupted as exc:
                if _debug["on"]:
                    raise
                err.print(escape(str(exc)), soft_wrap=True)
                raise typer.Exit(130) from None
            except ReluOptError as exc:
                if _debug["on"]:
                    raise
                err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(2) from None
            except (EOFError, MemoryError) as exc:  # a truncated file somewhere, or a job too big for memory
                if _debug["on"]:
                    raise
                what = "a file ended early (truncated?)" if isinstance(exc, EOFError) else "out of memory"
                err.print(f"[bold red]error:[/] {what}: {escape(str(exc) or type(exc).__name__)}", soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                if _debug["on"]:
                    raise
                err.print("interrupted; finished stages are saved, so the same command resumes", soft_wrap=True)
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(wrapper)

    return deco


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    if debug:
        _debug["on"] = True


ModelArg = Annotated[
    str,
    typer.Argument(
        help="A zoo name (see `relu-opt models`), path/to/file.py:ClassOrFactory, or package.module:factory.",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Example input shape N,C,H,W (default: the zoo model's own, 1,3,32,32).",
    ),
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="State dict to load (torch.save(model.state_dict())).")
]
LeafOpt = Annotated[
    list[str] | None,
    typer.Option("--leaf", help="Module class (or qualified name) fx should not trace into; repeatable."),
]
NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", help="Classes of a zoo model's head (default 10, or the weights').")
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option(
        "--max-drop",
        min=0,
        help="Validation accuracy points the optimized model may lose; a larger drop fails and saves nothing.",
    ),
]
PublicCoeffsOpt = Annotated[
    bool,
    typer.Option(
        "--public-coeffs",
        help="Polynomials that cannot be folded into their neighbouring linear layers get public coefficients "
        "under private inference: a degree-2 site costs one square (one round) instead of products with secret "
        "coefficients, and reveals those coefficients (part of the weights) to the parties. Recorded in plan.json.",
    ),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained",
        help="Start from the weights shipped for this zoo model (`relu-opt models` lists them); sha256-checked.",
    ),
]
SelectorOpt = Annotated[
    str,
    typer.Option(
        "--selector",
        help="How kept elements are placed: 'latency' (priced by the backend's cost model: few sites, fewest "
        "rounds) or 'count' (highest criticality anywhere: the ReLU-count objective).",
    ),
]
RoundsBudgetOpt = Annotated[
    float | None,
    typer.Option("--rounds-budget", help="Modeled communication rounds of one forward (latency selector)."),
]
LatencyBudgetOpt = Annotated[
    float | None,
    typer.Option("--latency-budget", help="Modeled seconds of one forward on --network (latency selector)."),
]
NetworkOpt = Annotated[
    str, typer.Option("--network", help="Network the latency selector prices: lan, wan or RTT_MS,MB_PER_S.")
]
DealerOpt = Annotated[
    str | None,
    typer.Option(
        "--dealer",
        help="Who deals the correlated randomness (Beaver triples). Default 'third-party': a dealer process that "
        "is neither party (on separate hosts, a third host started with --role dealer); its traffic is reported "
        "as offline cost. 'party0': party 0 deals (the engine's own default), so party 0 can read the client's "
        "input: INSECURE, labelled so in every table, JSON and report; only to compare with old figures.",
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cost-model cache (default $RELU_OPT_CACHE, else ~/.cache/relu-opt)."),
]


def _load(
    spec: str,
    input_shape: str | None,
    weights: Path | None,
    num_classes: int | None,
    leaf: list[str] | None = None,
    fix: str = "pass --input-shape N,C,H,W that the model takes",
    classes: int | None = None,
    pretrained: bool | str = False,
):
    validation.check_int("--num-classes", num_classes)
    validation.check_input_file(weights, "--weights")
    shape = parse_input_shape(input_shape) if input_shape else None
    if pretrained and weights is not None:
        raise WeightsError("give --pretrained or --weights, not both")
    loaded = resolve_model(spec, num_classes, shape[1] if shape else None, pretrained=pretrained)
    shape = shape or loaded.default_input_shape
    if shape is None:
        raise InputShapeError(f"'{spec}' has no default input shape; pass --input-shape, e.g. --input-shape 1,3,32,32")
    validation.check_leaf(loaded.model, leaf)
    validation.check_model_input(loaded.model, shape, f"'{spec}'", num_classes=classes, fix=fix)
    if weights is not None:
        load_weights(loaded.model, weights)
    return loaded.model.eval(), loaded.name, shape


def _opt_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _write_json(path: Path | None, obj) -> None:
    if path:
        atomic.write_json(path, obj)
        out.print(f"wrote {path}")


def _census_table(c: Census) -> Table:
    t = Table(title=f"{c.model}  input {tuple(c.input_shape)}", title_justify="left")
    for col, just in [("#", "right"), ("site", "left"), ("kind", "left"), ("shape", "left")]:
        t.add_column(col, justify=just)
    for col in ("elements", "share", "MACs in"):
        t.add_column(col, justify="right")
    for i, s in enumerate(c.sites):
        t.add_row(
            str(i),
            s.name,
            s.kind,
            "x".join(map(str, s.shape)),
            f"{s.elements:,}",
            f"{s.share:.1%}",
            f"{s.macs:,}",
        )
    t.add_section()
    for kind, total in sorted(c.totals_by_kind.items()):
        t.add_row("", "total", kind, "", f"{total:,}", "100.0%", "")
    return t


@command("models")
def models_cmd() -> None:
    """List the built-in architectures and the pretrained weights shipped for them (--pretrained)."""
    from relu_opt.models.pretrained import list_pretrained

    t = Table("name", "default input", "pretrained (test acc)", "description")
    for name in list_models():
        e = get_entry(name)
        shipped = ", ".join(f"{r.dataset} ({r.test_accuracy:.2f}%)" for r in list_pretrained(name)) or "-"
        t.add_row(name, ",".join(map(str, e.default_input_shape)), shipped, e.description)
    out.print(t)


@command("count")
def count_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    num_classes: NumClassesOpt = None,
    pretrained: PretrainedOpt = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the census as JSON here.")] = None,
) -> None:
    """Print where the ReLUs (and other non-linear ops) are: per site elements, share and feeding MACs."""
    validation.check_output_file(json_path, "--json")
    net, name, shape = _load(model, input_shape, weights, num_classes, leaf, pretrained=pretrained)
    c = api.count(net, torch.randn(shape), leaf or (), name=name)
    out.print(_census_table(c))
    out.print(f"ReLU elements per sample: [bold]{c.total_relu:,}[/]   MACs: {c.total_macs:,}   params: {c.params:,}")
    others = ", ".join(f"{k} {v:,}" for k, v in sorted(c.totals_by_kind.items()) if k != "relu")
    if others:
        out.print(f"other non-linear elements per sample: {others}")
    out.print(f"secure comparisons per sample (ReLU, ReLU6, max-pool, ...): [bold]{c.total_comparisons:,}[/]")
    _write_json(json_path, c.to_dict())


@command("export")
def export_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write.")],
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    num_classes: NumClassesOpt = None,
    pretrained: PretrainedOpt = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (11-20).", min=7, max=21)] = DEFAULT_OPSET,
    public_coeffs: PublicCoeffsOpt = False,
) -> None:
    """Write a verified ONNX graph: checker, onnxruntime parity and ReLU count against the census."""
    validation.check_output_file(output)
    net, _, shape = _load(model, input_shape, weights, num_classes, leaf, pretrained=pretrained)
    r = api.export(net, torch.randn(shape), output, opset=opset, leaf=leaf or (), public_coeffs=public_coeffs)
    out.print(f"wrote {r.path} (opset {r.opset})")
    out.print(
        f"parity vs PyTorch: max abs error {r.max_abs_err:.3g} (output scale {r.output_scale:.3g}, "
        f"relative {r.rel_err:.2g})"
    )
    out.print(f"ONNX ReLU elements per sample: [bold]{r.onnx_relu:,}[/] (census {r.census_totals.get('relu', 0):,})")
    others = {k: v for k, v in r.onnx_totals.items() if k != "relu"}
    if others:
        out.print("other non-linear ONNX elements: " + ", ".join(f"{k} {v:,}" for k, v in others.items()))


def _samples(data: str | None, data_dir: Path | None, samples: int, shape: tuple[int, ...]):
    """Return (x, y) test samples from a dataset, or (random x, None) when no dataset is named."""
    if data is None:
        return torch.randn((samples, *shape[1:]), generator=torch.Generator().manual_seed(0)), None
    ds = load_dataset(data, data_dir)
    if tuple(ds.input_shape[1:]) != tuple(shape[1:]):
        raise InputShapeError(
            f"dataset '{data}' has inputs {ds.input_shape[1:]} but the model expects {shape[1:]}; "
            f"pass --input-shape 1,{','.join(map(str, ds.input_shape[1:]))}"
        )
    test = ds.test.subset(samples)
    return test.x, test.y


def _compact_table(title: str, columns: tuple[str, ...]) -> Table:
    """Return a borderless table that fits 80 columns: first column left-aligned, the rest right."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for col in columns:
        t.add_column(col, justify="left" if col == columns[0] else "right")
    return t


def _bench_table(r) -> Table:
    cols = {
        "ReLUs": lambda m: f"{m.relu_elements:,}",
        "cmp": lambda m: f"{m.comparisons:,}",
        "rounds": lambda m: str(m.rounds),
        "MB/party": lambda m: f"{max(m.bytes_per_party) / 1e6:.1f}",
        "off MB": lambda m: f"{m.offline_bytes / 1e6:.1f}",
        "wall": lambda m: f"{m.wall_s_median:.2f}",
        "link": lambda m: f"{m.predicted_s:.2f}",
        "LAN": lambda m: f"{m.lan_s:.2f}",
        "WAN": lambda m: f"{m.wan_s:.2f}",
        "+off": lambda m: f"{m.wan_total_s:.2f}",
    }
    # a column nobody can fill (no --link) is left out; secure comparisons beyond ReLU (ReLU6, max-pool,
    # ...) get a column only when they differ from the ReLUs
    cols = {k: f for k, f in cols.items() if not all(_is_none(m, k) for m in r.models)}
    if all(m.comparisons == m.relu_elements for m in r.models):
        del cols["cmp"]
    if not any(m.offline_bytes for m in r.models):  # no dealer traffic crosses a link
        del cols["off MB"], cols["+off"]
    n = r.samples or r.batch
    shown = f"batch {r.batch}" + (f" of {n} samples" if n != r.batch else "")
    title = f"{r.title}, {r.parties} parties, dealer {r.dealer}, {shown}, seconds" + _insecure(r)
    t = _compact_table(title, ("model", *cols))
    captions = [f"party {r.hosts['rank']} over {r.hosts['interface']}"] if r.hosts else []
    nets = ", ".join(f"{k.upper()} {v['rtt_ms']:g} ms {v['bandwidth_MBps']:g} MB/s" for k, v in r.networks.items())
    if r.link:
        nets += f", link {r.link['rtt_ms']:.3g} ms {r.link['bandwidth_MBps']:.3g} MB/s"
    captions.append(f"wall: measured here; {nets}: modeled (measured compute + round trips x RTT + bytes/bandwidth)")
    if "+off" in cols:
        captions.append("off MB: to and from the dealer; +off: WAN with it on the same link")
    if r.insecure:
        captions.append(f"[bold red]{r.insecure}[/] (--dealer {r.dealer})")
    if captions:
        t.caption, t.caption_justify = "\n".join(captions), "left"
    for m in r.models:
        t.add_row(m.name, *("-" if _is_none(m, k) else f(m) for k, f in cols.items()))
    return t


def _insecure(r) -> str:
    """Return the INSECURE mark a table title of bench result `r` carries ("" for an honest dealer)."""
    return f" [bold red]({r.insecure})[/]" if r.insecure else ""


def _agreement_table(r) -> Table | None:
    """Return the encrypted outputs against plaintext and labels, or None where nobody can tell (the
    weights and the samples are on separate hosts, and there are no labels)."""
    cols = {
        "max abs err": lambda m: f"{m.max_abs_err:.2g}",
        "top-1 = plain": lambda m: f"{m.top1_agreement:.2f}",
        "accuracy": lambda m: f"{m.accuracy:.0%}",
        "plain acc": lambda m: f"{m.plain_accuracy:.0%}",
    }
    cols = {k: f for k, f in cols.items() if not all(_is_none(m, k) for m in r.models)}
    if not cols:
        return None
    t = _compact_table("encrypted outputs" + _insecure(r), ("model", *cols))
    for m in r.models:
        t.add_row(m.name, *("-" if _is_none(m, k) else f(m) for k, f in cols.items()))
    return t


def _is_none(m, column: str) -> bool:
    attr = {
        "link": "predicted_s",
        "max abs err": "max_abs_err",
        "top-1 = plain": "top1_agreement",
        "accuracy": "accuracy",
        "plain acc": "plain_accuracy",
    }.get(column)
    return attr is not None and getattr(m, attr) is None


def _parse_link(text: str | None):
    from relu_opt.backends import load_link

    if text is None:
        return None
    try:
        return load_link(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@command("bench")
def bench_cmd(
    model: ModelArg,
    optimized: Annotated[
        Path | None, typer.Option("--optimized", help="An `relu-opt optimize` output folder to compare.")
    ] = None,
    parties: Annotated[int, typer.Option("--parties", min=2, help="Number of parties.")] = 2,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Test samples run encrypted.")] = 2,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            min=1,
            help="Samples per encrypted forward; costs and times are one batch's (1: one private query). "
            "Default: all samples at once.",
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Dataset for real samples and accuracy (default: random inputs).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the dataset files.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per model.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up runs per model.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before stuck parties are stopped.")] = 300,
    lan: Annotated[str, typer.Option("--lan", help="LAN profile RTT_MS,MB_PER_S.")] = "0.5,1000",
    wan: Annotated[str, typer.Option("--wan", help="WAN profile RTT_MS,MB_PER_S.")] = "40,100",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    pretrained: PretrainedOpt = False,
    rank: Annotated[int | None, typer.Option("--rank", help="Run only this party (one per host); see README.")] = None,
    role: Annotated[
        str | None,
        typer.Option(
            "--role",
            help="On separate hosts: 'party' (with --rank) or 'dealer' (the third host that deals the triples; "
            "give it the parties' --world-size, --master-addr and --master-port).",
        ),
    ] = None,
    world_size: Annotated[int | None, typer.Option("--world-size", help="Parties in a multi-host run.")] = None,
    master_addr: Annotated[str, typer.Option("--master-addr", help="Party 0's address.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option("--master-port", help="Party 0's rendezvous port.")] = 29500,
    ifname: Annotated[
        str | None, typer.Option("--ifname", help="Network interface for the parties' traffic (default: the route).")
    ] = None,
    link: Annotated[
        str | None,
        typer.Option("--link", help="Predict latency on this link: RTT_MS,MB_PER_S or a `relu-opt link --json` file."),
    ] = None,
    public_coeffs: Annotated[
        bool,
        typer.Option(
            "--public-coeffs",
            help="Unfoldable polynomials run with public coefficients (revealing them); on by itself when the "
            "--optimized folder's plan.json says so.",
        ),
    ] = False,
    dealer: DealerOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Run the original, optimized and linear-floor models with real parties (and the dealer); report online
    rounds and bytes, offline (dealer) bytes, and latency."""
    from relu_opt.backends import Pricing, parse_network
    from relu_opt.bench import bench, bench_host

    try:
        networks = (parse_network("lan", lan), parse_network("wan", wan))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    validation.check_float("--timeout", timeout)
    validation.check_output_file(json_path, "--json")
    validation.check_output_dir(cache_dir, "--cache-dir")
    if world_size is not None:
        validation.check_int("--world-size", world_size, 2)
    host = _host_role(role, rank, world_size or parties, master_addr, master_port, ifname)
    validation.check_int("--master-port", master_port, 1, 65535)
    if host is None and world_size is not None:
        raise ConfigError("--world-size is for parties on separate hosts (with --rank or --role dealer); use --parties")
    if world_size is not None and parties != 2 and parties != world_size:
        raise ConfigError(
            f"--parties {parties} and --world-size {world_size} disagree; on separate hosts give --world-size"
        )
    if dealer is not None:
        Pricing().engine().dealer(dealer)  # "" or an unknown name: refused with the choices
    pricing = Pricing(dealer=dealer or "", parties=world_size or parties, cache=_opt_str(cache_dir))
    if host is not None and host.is_dealer:
        if not pricing.dealer_info().extra_process:
            raise ConfigError(f"--dealer {pricing.dealer_name} has no dealer process; start only the parties (--rank)")
        if weights is not None:  # the owner's weights do not belong on the dealer's host
            raise ConfigError("the dealer needs no weights (only the architecture); leave out --weights on its host")
    dealer_only = host is not None and host.is_dealer  # the dealer needs the architecture, not the weights
    net, _, shape = _load(
        model,
        input_shape,
        None if dealer_only else weights,
        num_classes,
        pretrained=(data or True) if pretrained else False,  # shipped weights are public
    )
    opt = api.load(optimized) if optimized else None
    if opt is not None:
        validation.check_optimized_fits(opt, net, shape, str(optimized))
        public_coeffs = public_coeffs or _plan_public_coeffs(optimized)
    link_net = _parse_link(link)
    if dealer_only:
        x, y = torch.zeros(samples, *shape[1:]), None  # the dealer never sees a sample, nor reads --data
    else:
        x, y = _samples(data, data_dir, samples, shape)
    if pricing.insecure and host is not None:  # a local bench says it once, with its other warnings
        err.print(f"[bold red]warning:[/] --dealer {pricing.dealer_name}: {pricing.insecure}", soft_wrap=True)
    if host is not None:
        who = "the dealer" if host.is_dealer else f"party {host.rank} of {host.world_size}"
        with out.status(f"{who}: waiting for the others, then running"):
            r = bench_host(
                net,
                x,
                host,
                pricing,
                optimized=opt,
                y=y,
                runs=runs,
                warmup=warmup,
                timeout=timeout,
                networks=networks,
                link=link_net,
                public_coeffs=public_coeffs,
                cost_model=pricing.cost_model(measure=False),  # never measured here: it would start parties
                batch=batch,
            )
        if host.is_dealer:
            out.print(f"the dealer served the run over {r.hosts['interface']} and stopped")
            _write_json(json_path, r.to_dict())
        else:
            _print_bench(r, json_path)
        return
    with out.status(f"calibrating the cost model ({pricing.describe()}; cached after the first run)"):
        cost = pricing.cost_model(timeout=timeout)
    with out.status(f"running {pricing.describe()}"):
        r = bench(
            net,
            x,
            y,
            optimized=opt,
            pricing=pricing,
            runs=runs,
            warmup=warmup,
            timeout=timeout,
            networks=networks,
            cost_model=cost,
            log=lambda m: err.print(escape(m), soft_wrap=True),
            link=link_net,
            public_coeffs=public_coeffs,
            batch=batch,
        )
    _print_bench(r, json_path)


def _host_role(role: str | None, rank: int | None, world_size: int, addr: str, port: int, ifname: str | None):
    """Return the HostRole of a separate-hosts run from --role/--rank, or None for a local bench."""
    from relu_opt.backends import HostRole

    if role is None and rank is None:
        return None
    validation.check_choice("--role", role or "party", ("party", "dealer"))
    if role == "dealer":
        if rank is not None:
            raise ConfigError("--role dealer takes no --rank (the dealer is not a party); leave --rank out")
        return HostRole("dealer", world_size, world_size, addr, port, ifname)
    if rank is None:
        raise ConfigError("--role party needs --rank N (0 owns the model, 1 the input)")
    validation.check_int("--rank", rank, 0, world_size - 1)
    return HostRole("party", rank, world_size, addr, port, ifname)


def _plan_public_coeffs(optimized: Path) -> bool:
    """Return whether the optimized folder's plan chose public polynomial coefficients."""
    from relu_opt.plan import read_plan

    return read_plan(optimized).public_coeffs


def _prediction_table(r) -> Table | None:
    """Return the cost model's rounds and MB next to the measured ones, or None without predictions."""
    models = [m for m in r.models if m.predicted_rounds is not None]
    if not models:
        return None
    offline = any(m.offline_bytes or m.predicted_offline_bytes for m in models)
    cols = ("model", "rounds", "predicted", "MB/party", "predicted") + (("off MB", "predicted") if offline else ())
    t = _compact_table("cost model vs measured" + _insecure(r), cols)
    for m in models:
        row = [m.name, str(m.rounds), f"{m.predicted_rounds:.0f}"]
        row += [f"{max(m.bytes_per_party) / 1e6:.2f}", f"{m.predicted_bytes / 1e6:.2f}"]
        if offline:
            row += [f"{m.offline_bytes / 1e6:.2f}", f"{(m.predicted_offline_bytes or 0) / 1e6:.2f}"]
        t.add_row(*row)
    return t


def _print_bench(r, json_path: Path | None) -> None:
    out.print(_bench_table(r))
    for table in (_agreement_table(r), _prediction_table(r)):
        if table is not None:
            out.print(table)
    from relu_opt.report import ratio_line

    for name, ratio in r.ratios.items():
        out.print(ratio_line(name, ratio))
    _write_json(json_path, r.to_dict())


@command("link")
def link_cmd(
    rank: Annotated[int, typer.Option("--rank", help="This party's rank (0 hosts the rendezvous).")],
    master_addr: Annotated[str, typer.Option("--master-addr", help="Party 0's address.")],
    world_size: Annotated[int, typer.Option("--world-size", min=2, help="Parties.")] = 2,
    master_port: Annotated[int, typer.Option("--master-port", help="Party 0's rendezvous port.")] = 29500,
    ifname: Annotated[
        str | None, typer.Option("--ifname", help="Network interface for the parties' traffic (default: the route).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the other parties.")] = 120,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the measurement here (`bench --link FILE` reads it).")
    ] = None,
) -> None:
    """Measure RTT and bandwidth per direction between the parties, over the backend's own transport."""
    from relu_opt.backends import HostRole, Pricing

    validation.check_int("--rank", rank, 0, world_size - 1)
    validation.check_int("--master-port", master_port, 1, 65535)
    validation.check_float("--timeout", timeout)
    validation.check_output_file(json_path, "--json")

    host = HostRole("party", rank, world_size, master_addr, master_port, ifname)
    with out.status(f"party {rank}: measuring the link to party 0 at {master_addr}"):
        m = Pricing().engine().measure_link(host, timeout)
    t = _compact_table(f"link from party {rank} over {m.interface}", ("direction", "alone MB/s", "both at once MB/s"))
    for d, v in m.one_way_MBps.items():
        t.add_row(d, f"{v:.2f}", f"{m.duplex_MBps[d]:.2f}")
    out.print(t)
    out.print(
        f"RTT {m.rtt_ms:.3f} ms (median {m.rtt_median_ms:.3f}), bandwidth {m.bandwidth_MBps:.2f} MB/s per direction; "
        f"predict with: relu-opt bench ... --link {m.rtt_ms:.3f},{m.bandwidth_MBps:.2f}"
    )
    _write_json(json_path, m.to_dict())


DataOpt = Annotated[str, typer.Option("--data", help="Dataset: fashion-mnist, cifar10, cifar100, digits, synthetic.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Folder holding the dataset files.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]


def _check_device(device: str) -> str:
    return validation.check_device(device)


def _data_and_model(model, data, data_dir, weights, pretrained: bool = False, input_shape: str | None = None):
    ds = _dataset(data, data_dir, input_shape)
    shape = ",".join(map(str, ds.input_shape))
    fix = f"give a model that takes the {data} inputs ({shape})"
    net, name, input_shape = _load(
        model, shape, weights, ds.num_classes, fix=fix, classes=ds.num_classes, pretrained=data if pretrained else False
    )
    return ds, net, name, input_shape


def _dataset(data: str, data_dir: Path | None, input_shape: str | None):
    """Return the dataset; --input-shape sets the shape of `synthetic` (10 classes, like the papers' CIFAR-10
    head) and must match any other dataset's."""
    if input_shape is None:
        return load_dataset(data, data_dir, download=False)
    shape = parse_input_shape(input_shape)
    if data == "synthetic":
        return load_dataset(data, data_dir, shape=shape[1:], num_classes=10)
    ds = load_dataset(data, data_dir, download=False)
    if tuple(ds.input_shape[1:]) != tuple(shape[1:]):
        raise InputShapeError(
            f"--input-shape {input_shape} does not match {data}'s inputs {ds.input_shape}; leave it out, "
            "or use --data synthetic for random inputs of any shape"
        )
    return ds


@command("train")
def train_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Weights file to write (a state dict).")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs over the train split.")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (one-cycle cosine).")] = 0.05,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    max_train: Annotated[int | None, typer.Option("--max-train", help="Use only the first N train examples.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.ckpt.")] = False,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial weights and the data order.")] = 0,
) -> None:
    """Train a baseline: SGD + cosine, a checkpoint each epoch (OUTPUT.ckpt), --resume, Ctrl-C saves."""
    from relu_opt.train import TrainConfig, evaluate, fit

    validation.check_output_file(output)
    validation.check_float("--lr", lr)
    validation.check_int("--max-train", max_train)
    _check_device(device)
    torch.manual_seed(seed)
    ds, net, _, _ = _data_and_model(model, data, data_dir, weights, pretrained)
    cfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, max_train=max_train, device=_check_device(device), seed=seed
    )
    ckpt = output.with_name(output.name + ".ckpt")
    result = fit(net, ds, cfg, checkpoint=ckpt, resume=resume)
    atomic.save_torch(net.cpu().state_dict(), output)
    _, test_acc = evaluate(net, ds.test)
    out.print(f"val accuracy {result.val_acc:.2%}, test accuracy {test_acc:.2%}; wrote {output}")


StrategyOpt = Annotated[str, typer.Option("--strategy", help="Ranking: taylor, drop-one, snl or random.")]
ReplaceOpt = Annotated[
    str,
    typer.Option(
        "--replace",
        help="What replaces a dropped element: poly, square, identity (elementwise kinds); softmax sites "
        "default to 2quad and LayerNorm to frozen-norm.",
    ),
]
GranularityOpt = Annotated[str, typer.Option("--granularity", help="Unit of keeping a ReLU: site, channel, pixel.")]


def _parse_budgets(budget: int | None, budgets: str | None, required: bool = True) -> list[int]:
    return validation.parse_budgets(budget, budgets, required)


def _print_choices(sel: dict) -> None:
    """Print what the selector chose per site, what it costs and why."""
    if not sel or not sel.get("choices"):
        return
    priced = sel.get("rounds") is not None
    title = f"selector {sel['selector']} under {sel['constraints']}"
    if priced:
        lat = ", ".join(f"{k.upper()} {v:.3g} s" for k, v in sel.get("latency_s", {}).items())
        title += f": {sel['rounds']:.0f} rounds, {sel['bytes'] / 1e6:.1f} MB/party, {lat} (modeled, batch 1)"
    from relu_opt.report import CHOICE_COLUMNS, choice_rows

    t = Table(*CHOICE_COLUMNS, title=title)
    for row in choice_rows(sel):
        t.add_row(*row)
    out.print(t)


def _check_selection(selector: str, rounds_budget: float | None, latency_budget: float | None, network: str) -> None:
    """Raise ConfigError for a bad --selector, --rounds-budget, --latency-budget or --network."""
    from relu_opt.backends import Pricing
    from relu_opt.selection import SELECTORS

    validation.check_choice("--selector", selector, SELECTORS)
    validation.check_float("--rounds-budget", rounds_budget)
    validation.check_float("--latency-budget", latency_budget)
    if selector == "count" and (rounds_budget is not None or latency_budget is not None):
        raise ConfigError(
            "--rounds-budget and --latency-budget need --selector latency (the count selector ignores costs)"
        )
    Pricing(network=network)


def _check_method(strategy: str, replace: str, granularity: str, poly_per: str = "channel") -> None:
    from relu_opt.plan import REPLACEMENTS
    from relu_opt.ranking import STRATEGIES

    validation.check_choice("--strategy", strategy, sorted(STRATEGIES))
    validation.check_choice("--replace", replace, REPLACEMENTS)
    validation.check_choice("--granularity", granularity, ("site", "channel", "pixel"))
    validation.check_choice("--poly-per", poly_per, ("channel", "layer"))


def _parse_kinds(text: str | None) -> tuple[str, ...]:
    from relu_opt import ops

    kinds = tuple(k.strip() for k in (text or "").split(",") if k.strip())
    unknown = [k for k in kinds if k not in ops.kind_names()]
    if unknown:
        raise ConfigError(f"--kinds: unknown kind(s) {', '.join(unknown)}; known: {', '.join(ops.kind_names())}")
    return kinds


def _parse_kind_budgets(items: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--kind-budget '{item}' must be KIND=N, e.g. --kind-budget relu6=20000")
        try:
            out.append((_parse_kinds(kind)[0], int(value.replace("_", ""))))
        except (ValueError, IndexError):
            raise ConfigError(f"--kind-budget '{item}' must be KIND=N, e.g. --kind-budget relu6=20000") from None
        validation.check_int(f"--kind-budget {out[-1][0]}", out[-1][1], 0)
    return tuple(out)


@command("rank")
def rank_cmd(
    model: ModelArg,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    strategy: StrategyOpt = "taylor",
    replace: ReplaceOpt = "poly",
    granularity: GranularityOpt = "channel",
    budget: Annotated[int | None, typer.Option("--budget", help="Budget the snl masks aim for.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Examples the ranking looks at.")] = 5000,
    finetune_steps: Annotated[
        int, typer.Option("--finetune-steps", help="drop-one: distillation steps after replacing each site.")
    ] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the criticality table here.")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Rank each ReLU site (and channel or pixel) by how much the model needs it."""
    from relu_opt.optimizer import OptimizeConfig, _calibrate, _replacement_factory
    from relu_opt.ranking import RankContext, make_strategy

    _check_method(strategy, replace, granularity)
    validation.check_int("--samples", samples)
    validation.check_int("--finetune-steps", finetune_steps, 0)
    validation.check_int("--budget", budget, 0)
    validation.check_output_file(json_path, "--json")
    _check_device(device)
    ds, net, _, shape = _data_and_model(model, data, data_dir, weights, pretrained)
    cfg = OptimizeConfig(budget=budget or 0, replace=replace, granularity=granularity)
    gm = propagate_shapes(trace(net.eval()), ds.train.x[:1])
    coeffs, _ = _calibrate(gm, ds, cfg)
    ctx = RankContext(
        gm, ds, granularity, _replacement_factory(replace, coeffs, cfg.poly_per), samples, _check_device(device)
    )
    crit = make_strategy(strategy, budget=budget, finetune_steps=finetune_steps).rank(ctx)
    t = Table("site", "units", "ReLUs/unit", "score", "mean unit score", title=f"{strategy} criticality")
    for row in crit.to_dict()["sites"]:
        t.add_row(
            row["site"],
            f"{row['units']:,}",
            f"{row['unit_elements']:,}",
            f"{row['score']:.4g}",
            f"{row['mean_unit_score']:.4g}",
        )
    out.print(t)
    _write_json(json_path, crit.to_dict())


@command(
    "optimize",
    epilog="Budgets: --budget (ReLU elements per sample, exact on the ONNX graph), --rounds-budget and "
    "--latency-budget (modeled by the backend's cost model on --network); give any of them. With none, it looks "
    "for the lowest modeled latency (0.25, 0.35, 0.5, 0.7 of the original's) whose validation accuracy stays "
    "within --max-drop (default 1 point). The latency selector (default) places kept ReLUs in few sites, "
    "since a site that keeps any ReLU pays all of its rounds.",
)
def optimize_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for plan, model, ONNX and reports.")],
    budget: Annotated[int | None, typer.Option("--budget", help="ReLU elements per sample to keep.")] = None,
    budgets: Annotated[
        str | None, typer.Option("--budgets", help="Several budgets, comma separated: a frontier.")
    ] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    strategy: StrategyOpt = "taylor",
    replace: ReplaceOpt = "poly",
    granularity: GranularityOpt = "channel",
    degree: Annotated[int, typer.Option("--degree", min=1, max=4, help="Polynomial degree.")] = 2,
    poly_per: Annotated[str, typer.Option("--poly-per", help="Coefficients per 'channel' or per 'layer'.")] = "channel",
    epochs: Annotated[
        float, typer.Option("--epochs", help="Fine-tuning epochs (fractions train on a subset; 0: no fine-tuning).")
    ] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="Fine-tuning peak learning rate.")] = 0.01,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="Input shape N,C,H,W of --data synthetic (random images, 10 classes: cost studies need no "
            "dataset); other datasets fix their own.",
        ),
    ] = None,
    rank_samples: Annotated[
        int,
        typer.Option("--rank-samples", help="Examples the ranking looks at (snl trains masks and weights on them)."),
    ] = 5000,
    snl_epochs: Annotated[
        float,
        typer.Option(
            "--snl-epochs",
            help="snl: epochs over --rank-samples that masks and weights train together; fine-tuning goes on "
            "from those weights (SNL trains on the whole training split: pass --rank-samples 1000000).",
        ),
    ] = 1.0,
    max_train: Annotated[int | None, typer.Option("--max-train", help="Fine-tune on the first N examples.")] = None,
    range_weight: Annotated[
        float,
        typer.Option(
            "--range-weight",
            help="Loss weight of polynomial inputs past the range they were fitted on, from the first "
            "fine-tuning attempt (default 0: only retries add it, at 1.0; see README, fine-tuning guard).",
        ),
    ] = 0.0,
    max_drop: MaxDropOpt = None,
    device: DeviceOpt = "cpu",
    kinds: Annotated[
        str | None,
        typer.Option(
            "--kinds",
            help="Non-linear kinds to optimize, comma separated (relu,relu6,gelu,softmax,layernorm,...; "
            "default: every non-polynomial kind the model has; see `relu-opt count`).",
        ),
    ] = None,
    kind_budget: Annotated[
        list[str] | None,
        typer.Option("--kind-budget", help="KIND=N: a budget of its own for one kind; repeatable."),
    ] = None,
    selector: SelectorOpt = "latency",
    rounds_budget: RoundsBudgetOpt = None,
    latency_budget: LatencyBudgetOpt = None,
    network: NetworkOpt = "wan",
    public_coeffs: PublicCoeffsOpt = False,
    parties: Annotated[
        int, typer.Option("--parties", min=2, help="Computing parties the cost model prices (the dealer on top).")
    ] = 2,
    dealer: DealerOpt = None,
    cache_dir: CacheDirOpt = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the ranking's samples and the fine-tuning's data order.")
    ] = 0,
) -> None:
    """Keep the most critical non-linear elements that fit the budgets, replace the rest, fine-tune with KD."""
    from relu_opt.backends import Pricing
    from relu_opt.optimizer import OptimizeConfig, optimize_frontier

    levels = _parse_budgets(budget, budgets, required=False) or [None]
    auto = levels == [None] and rounds_budget is None and latency_budget is None
    _check_method(strategy, replace, granularity, poly_per)
    _check_selection(selector, rounds_budget, latency_budget, network)
    if auto and selector == "count":
        raise ConfigError("--selector count needs --budget (ReLUs); without a budget the latency selector searches")
    validation.check_float("--epochs", epochs, above=None, minimum=0.0)
    validation.check_float("--lr", lr)
    validation.check_int("--rank-samples", rank_samples)
    validation.check_float("--snl-epochs", snl_epochs)
    validation.check_int("--max-train", max_train)
    validation.check_float("--range-weight", range_weight, above=None, minimum=0.0)
    validation.check_output_dir(output)
    validation.check_output_dir(cache_dir, "--cache-dir")
    _check_device(device)
    ds, net, name, _ = _data_and_model(model, data, data_dir, weights, pretrained, input_shape)
    if weights is None and not pretrained:
        err.print(
            "warning: no --weights or --pretrained given, so the model being optimized is untrained", soft_wrap=True
        )
    cfg = OptimizeConfig(
        budget=levels[0],
        strategy=strategy,
        replace=replace,
        granularity=granularity,
        degree=degree,
        poly_per=poly_per,
        epochs=epochs,
        lr=lr,
        rank_samples=rank_samples,
        rank_epochs=snl_epochs,
        max_train=max_train,
        range_weight=range_weight,
        max_drop=max_drop,
        device=_check_device(device),
        kinds=_parse_kinds(kinds),
        kind_budgets=_parse_kind_budgets(kind_budget or []),
        selector=selector,
        rounds_budget=rounds_budget,
        latency_budget=latency_budget,
        pricing=Pricing(dealer=dealer or "", parties=parties, network=network, cache=_opt_str(cache_dir)),
        public_coeffs=public_coeffs,
        seed=seed,
    )
    if auto:  # no budget: the lowest modeled latency within --max-drop (1 point by default)
        from relu_opt.optimizer import optimize_lowest_latency

        results = [optimize_lowest_latency(net, ds, cfg, output, base_spec=name)]
    else:
        results = optimize_frontier(net, ds, levels, cfg, output, base_spec=name)
    t = Table(
        "budget",
        "kept (ONNX)",
        "fewer",
        "test acc before",
        "test acc after",
        "folder",
        title=f"{strategy} / {replace} / {granularity}",
    )
    for r in results:
        t.add_row(
            "-" if r.budget is None else f"{r.budget:,}",
            f"{r.relu_after:,}",
            f"{r.relu_before / max(r.relu_after, 1):.1f}x",
            f"{r.accuracy_before:.2f}%",
            f"{r.accuracy_after:.2f}%",
            r.outdir,
        )
    out.print(t)
    for r in results:
        if set(r.kinds) != {"relu"}:
            per = ", ".join(f"{k} {v['before']:,} -> {v['after']:,}" for k, v in r.kinds.items())
            out.print(f"{r.outdir}: elements per sample by kind (ONNX after): {per}")
    for r in results:
        _print_choices(r.selection)
    if not auto:
        out.print(f"wrote {output}/pareto.md and pareto.png")


def _summary(r) -> None:
    from relu_opt.report import bench_title, insecure_label

    base, opt, b = r.baseline, r.optimized[-1], r.bench
    models = {m["name"]: m for m in b["models"]}
    cols = ("model", "ReLUs", "test acc", "rounds", "MB/party", "off MB", "wall s", "WAN s", "+off")
    t = _compact_table(f"relu-opt run: {r.config['model']} on {r.config['data']}; {bench_title(b)}", cols)
    agree = ", ".join(f"{m['name']} {m['top1_agreement']:.2f}" for m in b["models"])
    wan = b.get("networks", {}).get("wan", {})
    t.caption = (
        f"wall s: measured here; WAN s: modeled on {wan.get('rtt_ms', '?'):g} ms, {wan.get('bandwidth_MBps', '?'):g} "
        "MB/s (measured compute + round trips x RTT + bytes/bandwidth), online; off MB: to and from the dealer; "
        f"+off: WAN with it on the same link; top-1 agreement with plaintext: {agree}"
    )
    t.caption_justify = "left"
    accs = {"original": base["test_accuracy"], "optimized": opt["accuracy_after"], "floor": None}
    for name in ("original", "optimized", "floor"):
        m = models.get(name)
        if m is None:
            continue
        acc = accs[name]
        t.add_row(
            name,
            f"{m['relu_elements']:,}",
            "-" if acc is None else f"{acc:.2f}%",
            str(m["rounds"]),
            f"{max(m['bytes_per_party']) / 1e6:.2f}",
            f"{m['offline_bytes'] / 1e6:.2f}",
            f"{m['wall_s_median']:.3f}",
            f"{m['wan_s']:.3f}",
            f"{m['wan_total_s']:.3f}",
        )
    out.print(t)
    ratio = b["ratios"].get("optimized", {})
    if ratio:
        out.print(
            f"optimized vs original: {base['relu'] / max(opt['relu_after'], 1):.1f}x fewer ReLUs, "
            f"{opt['accuracy_after'] - base['test_accuracy']:+.2f} points test accuracy, "
            f"rounds x{ratio['rounds']:.2f}, bytes x{ratio['bytes_per_party']:.2f}, WAN latency x{ratio['wan_s']:.2f} "
            f"online, x{ratio['wan_total_s']:.2f} with offline"
        )
    if insecure_label(b):
        err.print(f"[bold red]{insecure_label(b)}[/]: not private inference (--dealer {b['dealer']})")
    out.print(f"report: {r.rundir}/report.md")


@command("run")
def run_cmd(
    model: Annotated[
        str, typer.Argument(help="Model spec (zoo name, file.py:Class, package.module:factory).")
    ] = "resnet20",
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    weights: WeightsOpt = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Start from the shipped weights for MODEL on DATA when there are any; otherwise train a baseline.",
        ),
    ] = True,
    max_drop: MaxDropOpt = None,
    budget: Annotated[
        int | None,
        typer.Option(
            "--budget",
            help="ReLUs per sample to keep. Default: the lowest modeled latency within --max-drop (1 point) with "
            "the latency selector; 1/10 of the ReLUs with the count selector.",
        ),
    ] = None,
    budgets: Annotated[str | None, typer.Option("--budgets", help="Several budgets, comma separated.")] = None,
    strategy: StrategyOpt = "taylor",
    replace: ReplaceOpt = "poly",
    granularity: GranularityOpt = "channel",
    baseline_epochs: Annotated[int, typer.Option("--baseline-epochs", help="Epochs to train a baseline.")] = 3,
    epochs: Annotated[
        float, typer.Option("--epochs", help="Fine-tuning epochs per budget (fractions: a subset).")
    ] = 1.0,
    max_train: Annotated[int | None, typer.Option("--max-train", help="Use the first N train examples.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Test samples run encrypted.")] = 8,
    batch: Annotated[
        int,
        typer.Option(
            "--batch", min=1, help="Samples per encrypted forward; costs and times are one batch's (1: one query)."
        ),
    ] = 1,
    parties: Annotated[int, typer.Option("--parties", min=2, help="Computing parties (the dealer comes on top).")] = 2,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before stuck parties are stopped.")] = 300,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where report folders go.")] = Path("runs"),
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Cache (default $RELU_OPT_CACHE, else ~/.cache/relu-opt).")
    ] = None,
    dealer: DealerOpt = None,
    device: DeviceOpt = "cpu",
    public_coeffs: PublicCoeffsOpt = False,
    selector: SelectorOpt = "latency",
    rounds_budget: RoundsBudgetOpt = None,
    latency_budget: LatencyBudgetOpt = None,
    network: NetworkOpt = "wan",
) -> None:
    """The main job: baseline, optimize, verified ONNX, an encrypted bench with real parties and a dealer that
    is neither of them, and a report folder."""
    import sys

    from relu_opt.pipeline import RunConfig, run

    levels = validation.parse_budgets(budget, budgets, required=False)
    _check_method(strategy, replace, granularity)
    _check_selection(selector, rounds_budget, latency_budget, network)
    validation.check_int("--baseline-epochs", baseline_epochs)
    validation.check_float("--epochs", epochs)
    validation.check_int("--max-train", max_train)
    validation.check_float("--timeout", timeout)
    validation.check_input_file(weights, "--weights")
    validation.check_output_dir(runs_dir, "--runs-dir")
    validation.check_output_dir(cache_dir, "--cache-dir")
    cfg = RunConfig(
        model=model,
        data=data,
        data_dir=str(data_dir) if data_dir else None,
        weights=str(weights) if weights else None,
        pretrained=pretrained,
        max_drop=max_drop,
        budgets=tuple(levels),
        strategy=strategy,
        replace=replace,
        granularity=granularity,
        baseline_epochs=baseline_epochs,
        epochs=epochs,
        max_train=max_train,
        samples=samples,
        bench_batch=batch,
        parties=parties,
        timeout=timeout,
        device=_check_device(device),
        public_coeffs=public_coeffs,
        selector=selector,
        rounds_budget=rounds_budget,
        latency_budget=latency_budget,
        network=network,
        dealer=dealer or "",
    )
    command_line = "relu-opt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("relu-opt") else "relu-opt run"
    r = run(
        cfg,
        runs_dir=runs_dir,
        cache=cache_dir,
        command=command_line,
        log=lambda m: out.print(f"[bold cyan]>[/] {escape(m)}", soft_wrap=True),
    )
    _summary(r)


@command("report")
def report_cmd(
    rundir: Annotated[Path, typer.Argument(help="A folder `relu-opt run` wrote.", show_default=False)],
) -> None:
    """Re-render a run's report.md and figures from its report.json."""
    from relu_opt.report import render_run

    if not (rundir / "report.json").is_file():
        raise ConfigError(f"'{rundir}' has no report.json; give a folder that `relu-opt run` wrote")
    out.print(f"wrote {render_run(rundir)}")


def _exit_on_signal(signum, _frame) -> None:
    """Turn SIGTERM and SIGHUP into an exit that runs every cleanup (parties stopped, temp files removed)."""
    import sys

    resumes = len(sys.argv) > 1 and sys.argv[1] in ("run", "optimize", "train")
    hint = "; finished stages are saved, so the same command resumes" if resumes else ""
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
