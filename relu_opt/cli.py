"""The relu-opt command line: parse, call the API, render with rich. Nothing else lives here."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relu_opt import api, atomic
from relu_opt.errors import InputShapeError, ReluOptError
from relu_opt.export import DEFAULT_OPSET
from relu_opt.graph import parse_input_shape
from relu_opt.loading import load_weights, resolve_model
from relu_opt.models import get_entry, list_models
from relu_opt.passes.census import Census

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
            except ReluOptError as exc:
                if _debug["on"]:
                    raise
                err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(2) from None

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
NumClassesOpt = Annotated[int, typer.Option("--num-classes", help="Classes of a zoo model's head.")]


def _load(spec: str, input_shape: str | None, weights: Path | None, num_classes: int):
    shape = parse_input_shape(input_shape) if input_shape else None
    loaded = resolve_model(spec, num_classes=num_classes, in_channels=shape[1] if shape else 3)
    shape = shape or loaded.default_input_shape
    if shape is None:
        raise InputShapeError(
            f"'{spec}' has no default input shape; pass --input-shape, e.g. --input-shape 1,3,32,32"
        )
    if weights is not None:
        load_weights(loaded.model, weights)
    return loaded.model.eval(), loaded.name, shape


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
    """List the built-in architectures."""
    t = Table("name", "default input", "description")
    for name in list_models():
        e = get_entry(name)
        t.add_row(name, ",".join(map(str, e.default_input_shape)), e.description)
    out.print(t)


@command("count")
def count_cmd(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    num_classes: NumClassesOpt = 10,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the census as JSON here.")
    ] = None,
) -> None:
    """Print where the ReLUs (and other non-linear ops) are: per site elements, share and feeding MACs."""
    net, name, shape = _load(model, input_shape, weights, num_classes)
    c = api.count(net, torch.randn(shape), leaf or (), name=name)
    out.print(_census_table(c))
    out.print(
        f"ReLU elements per sample: [bold]{c.total_relu:,}[/]   MACs: {c.total_macs:,}   params: {c.params:,}"
    )
    if json_path:
        atomic.write_json(json_path, c.to_dict())
        out.print(f"wrote {json_path}")


@command("export")
def export_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write.")],
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    num_classes: NumClassesOpt = 10,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (11-20).", min=7, max=21)] = DEFAULT_OPSET,
) -> None:
    """Write a verified ONNX graph: checker, onnxruntime parity and ReLU count against the census."""
    net, _, shape = _load(model, input_shape, weights, num_classes)
    r = api.export(net, torch.randn(shape), output, opset=opset, leaf=leaf or ())
    out.print(f"wrote {r.path} (opset {r.opset})")
    out.print(
        f"parity vs PyTorch: max abs error {r.max_abs_err:.3g} (output scale {r.output_scale:.3g}, "
        f"relative {r.rel_err:.2g})"
    )
    out.print(
        f"ONNX ReLU elements per sample: [bold]{r.onnx_relu:,}[/] (census {r.census_totals.get('relu', 0):,})"
    )
    others = {k: v for k, v in r.onnx_totals.items() if k != "relu"}
    if others:
        out.print("other non-linear ONNX elements: " + ", ".join(f"{k} {v:,}" for k, v in others.items()))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
