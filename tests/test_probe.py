"""A stranger's hostile probe of relu-opt: inputs wrong in every way a new user might get them wrong.

Each case either gets a real result (exit 0 / a value that makes sense) or a refusal: on the command line
exit code 2 with exactly one non-empty line naming the bad input and no traceback; in Python a
relu_opt.ReluOptError whose message is one line. A refusal leaves nothing behind: every case runs in a
fresh folder (its own cache inside it) and the folder's listing after a refusal is the one before.

Nothing here launches parties or trains for long: the engine's launches (bench, calibration, link) and the
heavy stages of optimize/run are replaced by a guard that raises Launched, so a case that gets past every
input check ends at once ("launch" cases expect exactly that). Cases marked xfail(strict=True) are
findings: the tool misbehaves there (see each reason).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import relu_opt
from relu_opt.cli import app
from relu_opt.models import create_model

runner = CliRunner()


class Launched(Exception):  # noqa: N818 - a sentinel, not an error
    """Raised by the guards: the case got past every input check and would start parties or long work."""


# --- what the cases prepare in their folder ----------------------------------------------------------


class Tiny(nn.Module):
    """Another architecture for 1x8x8 inputs and 10 classes (other sites than small_cnn)."""

    default_input_shape = (1, 1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


class WithAux(nn.Module):
    """Forward returns (logits, features)."""

    default_input_shape = (1, 1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        h = self.conv(x).relu()
        return h.mean((2, 3)), h


# the models.py the CLI cases import: the classes above by their own source, then those only the CLI uses
MODELS_PY = "import torch\nfrom torch import nn\n\n\n" + "\n\n".join(map(inspect.getsource, (Tiny, WithAux)))
MODELS_PY += textwrap.dedent(
    """

    class NoShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 3)

        def forward(self, x):
            return self.conv(x).relu().mean((2, 3))

    def needs_args(width):
        return nn.Linear(width, 10)

    class FFT(nn.Module):
        default_input_shape = (1, 1, 8, 8)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            return self.fc(torch.fft.rfft(x).abs().relu().flatten(1)[:, :40])

    class Gelu(nn.Module):
        default_input_shape = (1, 1, 8, 8)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(nn.functional.gelu(x).flatten(1))
    """
)


def small1() -> nn.Module:
    """small_cnn for the digits data (1 channel, 10 classes)."""
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> dict[str, Path]:
    """Real optimize folders of small1() on digits (budget 200, no fine-tuning, count selector): "spec" made
    with base_spec="small_cnn" (as the CLI makes them), "module" without (as docs/api.md's example does)."""
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for name, spec in (("spec", "small_cnn"), ("module", "")):
        kw = dict(budget=200, epochs=0, rank_samples=64, selector="count", base_spec=spec)
        relu_opt.optimize(small1(), "digits", outdir=root / name, **kw)
        assert (root / name / "plan.json").is_file()
        shutil.rmtree(root / name / ".work", ignore_errors=True)
        out[name] = root / name
    return out


def _prep_weights(d: Path, _g) -> None:
    torch.save(small1().state_dict(), d / "w.pt")


def _prep_weights3(d: Path, _g) -> None:
    torch.save(create_model("small_cnn", num_classes=10, in_channels=3).state_dict(), d / "w3.pt")


def _prep_nan_weights(d: Path, _g) -> None:
    state = small1().state_dict()
    next(v for k, v in state.items() if k.endswith("weight")).view(-1)[0] = float("nan")
    torch.save(state, d / "wnan.pt")


def _prep_text(d: Path, _g) -> None:
    (d / "notes.pt").write_text("these are not weights\n")
    (d / "afile").write_text("a file, not a folder\n")
    (d / "adir").mkdir()


def _prep_models(d: Path, _g) -> None:
    (d / "models.py").write_text(MODELS_PY)


def _prep_opt(d: Path, g: dict[str, Path]) -> None:
    shutil.copytree(g["spec"], d / "opt")
    torch.save(small1().state_dict(), d / "w.pt")  # the weights the folder was optimized from


def _prep_opt_from_module(d: Path, g: dict[str, Path]) -> None:
    shutil.copytree(g["module"], d / "optmod")


def _prep_truncated_plan(d: Path, g: Path) -> None:
    _prep_opt(d, g)
    text = (d / "opt" / "plan.json").read_text()
    (d / "opt" / "plan.json").write_text(text[: len(text) // 2])


def _prep_list_plan(d: Path, g: Path) -> None:
    _prep_opt(d, g)
    (d / "opt" / "plan.json").write_text("[1, 2, 3]")


def _prep_text_model(d: Path, g: Path) -> None:
    _prep_opt(d, g)
    (d / "opt" / "model.pt").write_text("model weights went here\n")


def _edit_plan(edit: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def prep(d: Path, g: dict[str, Path]) -> None:
        _prep_opt(d, g)
        plan = json.loads((d / "opt" / "plan.json").read_text())
        edit(plan)
        (d / "opt" / "plan.json").write_text(json.dumps(plan))

    return prep


def _prep_cut_model(d: Path, g: dict[str, Path]) -> None:
    _prep_opt(d, g)
    data = (d / "opt" / "model.pt").read_bytes()
    (d / "opt" / "model.pt").write_bytes(data[: len(data) // 2])


def _prep_other_state(d: Path, g: dict[str, Path]) -> None:
    _prep_opt(d, g)
    shutil.copy(d / "w.pt", d / "opt" / "model.pt")


def _prep_frontier_root(d: Path, g: Path) -> None:
    """What `relu-opt optimize -o out --budget 200` leaves: out/budget_200/ and out/pareto.*"""
    (d / "out").mkdir()
    shutil.copytree(g["spec"], d / "out" / "budget_200")
    torch.save(small1().state_dict(), d / "w.pt")
    (d / "out" / "pareto.md").write_text("| budget |\n")


def _prep_runs(d: Path, _g) -> None:
    for name, text in {
        "listrun": "[]",
        "cutrun": '{"config": {"model": "small_cnn"}, "baseline": {',
        "emptyrun": "{}",
        "hollowrun": json.dumps(
            {"config": {}, "baseline": {}, "census_before": {}, "census_after": {}, "optimized": [], "bench": {}}
        ),
    }.items():
        (d / name).mkdir()
        (d / name / "report.json").write_text(text)


def _prep_links(d: Path, _g) -> None:
    (d / "inf_link.json").write_text('{"rtt_ms": Infinity, "bandwidth_MBps": 100}')
    (d / "bad_link.json").write_text('{"rtt": 4}')


PREP: dict[str, Callable[[Path, Path], None]] = {
    "w": _prep_weights,
    "w3": _prep_weights3,
    "wnan": _prep_nan_weights,
    "text": _prep_text,
    "models": _prep_models,
    "opt": _prep_opt,
    "optmod": _prep_opt_from_module,
    "plan3d": _edit_plan(lambda p: p.update(input_shape=[1, 8, 8])),
    "planrow": _edit_plan(lambda p: p["sites"][0].update(granularity="row")),
    "plansite": _edit_plan(lambda p: p["sites"][0].update(site="features_99")),
    "cutmodel": _prep_cut_model,
    "otherstate": _prep_other_state,
    "cutplan": _prep_truncated_plan,
    "listplan": _prep_list_plan,
    "textmodel": _prep_text_model,
    "frontier": _prep_frontier_root,
    "runs": _prep_runs,
    "links": _prep_links,
}


# --- cases -------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One probe: CLI args (a list) or an API call (a callable taking the case folder).

    refuse: regex the one-line refusal must match; ok: a check of the result (CLI Result or the returned
    value, and the folder); launch: the case must get past every check to the guarded launch."""

    action: list[str] | Callable[[Path], object]
    refuse: str | None = None
    ok: Callable[[object, Path], None] | None = None
    launch: bool = False
    prep: tuple[str, ...] = ()
    reads_data: bool = False  # the cache folder may appear (a dataset or ranking legitimately read/written)
    guard: bool = True  # replace launches, calibration, training and ranking by Launched
    extra: dict = field(default_factory=dict)


def cli(*args: str, **kw) -> Case:
    return Case(list(args), **kw)


def api(fn: Callable[[Path], object], **kw) -> Case:
    return Case(fn, **kw)


def _exit0(check: Callable[[str, Path], None] | None = None):
    def ok(r, d):
        assert r.exit_code == 0, r.output
        assert "Traceback" not in r.output
        if check:
            check(r.output, d)

    return ok


WEIGHTS = ("--weights", "w.pt")
DIGITS = ("--data", "digits", *WEIGHTS)
OPT = ("optimize", "small_cnn", *DIGITS, "--epochs", "0", "--rank-samples", "64", "--selector", "count")

CLI_CASES: dict[str, Case] = {
    # count: shapes, names, files
    "count-shape-3d": cli("count", "small_cnn", "--input-shape", "1,3,8", refuse=r"input shape 1,3,8"),
    "count-shape-nan": cli("count", "small_cnn", "--input-shape", "1,3,nan,8", refuse=r"--input-shape '1,3,nan,8'"),
    "count-shape-negative": cli("count", "small_cnn", "--input-shape", "1,-3,8,8", refuse=r"positive sizes"),
    "count-shape-float": cli("count", "small_cnn", "--input-shape", "1,3,8.5,8", refuse=r"--input-shape '1,3,8\.5,8'"),
    "count-shape-x-separated": cli(
        "count", "small_cnn", "--input-shape", "1x3x8x8", ok=_exit0(lambda out, d: assert_in("relu", out))
    ),
    "count-unknown-zoo-name": cli("count", "resnet21", refuse=r"resnet21"),
    "count-py-file-without-class": cli("count", "models.py", prep=("models",), refuse=r"models\.py:ClassName"),
    "count-missing-py-file": cli("count", "nothere.py:Net", refuse=r"nothere\.py' does not exist"),
    "count-factory-needs-args": cli("count", "models.py:needs_args", prep=("models",), refuse=r"needs_args"),
    "count-tuple-forward": cli("count", "models.py:WithAux", prep=("models",), refuse=r"returns a tuple"),
    "count-no-default-shape": cli("count", "models.py:NoShape", prep=("models",), refuse=r"--input-shape"),
    "count-leaf-unknown": cli("count", "small_cnn", "--leaf", "Transformer", refuse=r"--leaf 'Transformer'"),
    "count-num-classes-zero": cli("count", "small_cnn", "--num-classes", "0", refuse=r"--num-classes 0"),
    "count-num-classes-word": Case(
        ["count", "small_cnn", "--num-classes", "ten"],
        refuse=r"--num-classes",
    ),
    "count-weights-folder": cli(
        "count", "small_cnn", "--weights", "adir", prep=("text",), refuse=r"'adir' is a folder"
    ),
    "count-weights-text": cli("count", "small_cnn", "--weights", "notes.pt", prep=("text",), refuse=r"notes\.pt"),
    "count-weights-nan": cli(
        "count", "small_cnn", "--input-shape", "1,1,8,8", "--weights", "wnan.pt", prep=("wnan",), refuse=r"NaN"
    ),
    "count-weights-other-channels": cli(
        "count", "small_cnn", "--weights", "w.pt", prep=("w",), refuse=r"w\.pt' has wrong shapes"
    ),
    "count-weights-and-pretrained": cli(
        "count", "resnet20", "--weights", "w3.pt", "--pretrained", prep=("w3",), refuse=r"--pretrained or --weights"
    ),
    "count-pretrained-none-shipped": cli("count", "small_cnn", "--pretrained", refuse=r"small_cnn"),
    "count-json-is-folder": cli("count", "small_cnn", "--json", "adir", prep=("text",), refuse=r"--json 'adir'"),
    "count-json-under-file": cli(
        "count", "small_cnn", "--json", "afile/c.json", prep=("text",), refuse=r"--json 'afile/c\.json'.*is a file"
    ),
    "count-json-read-only-parent": cli("count", "small_cnn", "--json", "/proc/probe/c.json", refuse=r"/proc"),
    "count-json-new-parents": cli(
        "count",
        "small_cnn",
        "--json",
        "new/sub/c.json",
        ok=_exit0(lambda out, d: assert_json(d / "new" / "sub" / "c.json", "sites")),
    ),
    # export
    "export-to-folder": cli("export", "small_cnn", "-o", "adir", prep=("text",), refuse=r"-o 'adir' is a folder"),
    "export-opset-low": cli("export", "small_cnn", "-o", "m.onnx", "--opset", "3", refuse=r"--opset 3"),
    "export-tuple-forward": cli("export", "models.py:WithAux", "-o", "m.onnx", prep=("models",), refuse=r"tuple"),
    "export-new-parents": cli(
        "export",
        "small_cnn",
        "-o",
        "out/deep/m.onnx",
        "--input-shape",
        "1,3,8,8",
        ok=_exit0(lambda out, d: assert_file(d / "out" / "deep" / "m.onnx")),
    ),
    # optimize: budgets and options that do not apply
    "optimize-kind-budget-absent-kind": cli(
        *OPT, "--budget", "100", "--kind-budget", "relu6=10", "-o", "out", prep=("w",), refuse=r"relu6"
    ),
    "optimize-square-for-softmax-only": cli(
        *OPT,
        "--budget",
        "100",
        "--kinds",
        "softmax",
        "--replace",
        "square",
        "-o",
        "out",
        prep=("w",),
        refuse=r"softmax",
    ),
    "optimize-kind-budget-outside-kinds": cli(
        *OPT, "--budget", "10", "--kinds", "relu", "--kind-budget", "gelu=5", "-o", "out", prep=("w",), refuse=r"gelu"
    ),
    "optimize-kind-budget-no-value": cli(
        *OPT, "--budget", "10", "--kind-budget", "relu", "-o", "out", prep=("w",), refuse=r"--kind-budget 'relu'"
    ),
    "optimize-kind-budget-negative": cli(
        *OPT, "--budget", "10", "--kind-budget", "relu=-4", "-o", "out", prep=("w",), refuse=r"relu.*-4"
    ),
    "optimize-budget-and-budgets": cli(
        *OPT, "--budget", "10", "--budgets", "5", "-o", "out", prep=("w",), refuse=r"not both"
    ),
    "optimize-budgets-empty-entry": cli(*OPT, "--budgets", "100,,50", "-o", "out", prep=("w",), refuse=r"'100,,50'"),
    "optimize-budgets-words": cli(*OPT, "--budgets", "many,few", "-o", "out", prep=("w",), refuse=r"'many,few'"),
    "optimize-budget-negative": cli(*OPT, "--budget", "-5", "-o", "out", prep=("w",), refuse=r"-5"),
    "optimize-budget-too-big": cli(*OPT, "--budget", "999999", "-o", "out", prep=("w",), refuse=r"999,999.*1,792"),
    "optimize-degree-zero": cli(
        *OPT, "--budget", "10", "--degree", "0", "-o", "out", prep=("w",), refuse=r"--degree 0"
    ),
    "optimize-poly-per-pixel": cli(
        *OPT, "--budget", "10", "--poly-per", "pixel", "-o", "out", prep=("w",), refuse=r"'pixel'"
    ),
    "optimize-epochs-nan": cli(
        *OPT[:-6], "--budget", "10", "--epochs", "nan", "-o", "out", prep=("w",), refuse=r"--epochs nan"
    ),
    "optimize-epochs-negative": cli(
        *OPT[:-6], "--budget", "10", "--epochs", "-1", "-o", "out", prep=("w",), refuse=r"--epochs -1"
    ),
    "optimize-lr-inf": cli(*OPT, "--budget", "10", "--lr", "inf", "-o", "out", prep=("w",), refuse=r"--lr inf"),
    "optimize-max-drop-inf": cli(
        *OPT, "--budget", "10", "--max-drop", "inf", "-o", "out", prep=("w",), refuse=r"--max-drop inf"
    ),
    "optimize-range-weight-nan": cli(
        *OPT, "--budget", "10", "--range-weight", "nan", "-o", "out", prep=("w",), refuse=r"--range-weight"
    ),
    "optimize-count-without-budget": cli(
        *OPT, "-o", "out", prep=("w",), refuse=r"--selector count.*--budget|--budget.*--selector count"
    ),
    "optimize-count-with-rounds-budget": cli(
        *OPT, "--rounds-budget", "10", "-o", "out", prep=("w",), refuse=r"rounds.*(selector|latency)"
    ),
    "optimize-network-garbage": cli(
        *OPT, "--budget", "10", "--network", "fast", "-o", "out", prep=("w",), refuse=r"--network 'fast'"
    ),
    "optimize-network-zero-bandwidth": cli(
        *OPT, "--budget", "10", "--network", "40,0", "-o", "out", prep=("w",), refuse=r"'40,0'"
    ),
    "optimize-parties-one": cli(
        *OPT, "--budget", "10", "--parties", "1", "-o", "out", prep=("w",), refuse=r"--parties 1"
    ),
    "optimize-dealer-unknown": cli(*OPT, "--budget", "10", "--dealer", "me", "-o", "out", prep=("w",), refuse=r"me"),
    "optimize-out-is-file": cli(
        *OPT, "--budget", "10", "-o", "afile", prep=("w", "text"), refuse=r"-o 'afile' is a file"
    ),
    "optimize-cache-dir-is-file": cli(
        *OPT, "--budget", "10", "--cache-dir", "afile", "-o", "out", prep=("w", "text"), refuse=r"--cache-dir 'afile'"
    ),
    "optimize-shape-against-data": cli(
        *OPT, "--budget", "10", "--input-shape", "1,1,28,28", "-o", "out", prep=("w",), refuse=r"1,1,28,28"
    ),
    "optimize-device-tpu": cli(
        *OPT, "--budget", "10", "--device", "tpu", "-o", "out", prep=("w",), refuse=r"--device 'tpu'"
    ),
    "optimize-snl-epochs-with-taylor": cli(
        *OPT,
        "--budget",
        "100",
        "--strategy",
        "taylor",
        "--snl-epochs",
        "3",
        "-o",
        "out",
        prep=("w",),
        refuse=r"--snl-epochs",
    ),
    "optimize-untrained-warning-plus-error": cli(
        "optimize",
        "small_cnn",
        "--data",
        "digits",
        "--budget",
        "999999",
        "--epochs",
        "0",
        "--selector",
        "count",
        "-o",
        "out",
        refuse=r"999,999",
    ),
    # rank
    "rank-finetune-steps-with-taylor": cli(
        "rank", "small_cnn", *DIGITS, "--finetune-steps", "3", prep=("w",), refuse=r"--finetune-steps"
    ),
    "rank-strategy-unknown": cli("rank", "small_cnn", *DIGITS, "--strategy", "magic", prep=("w",), refuse=r"'magic'"),
    "rank-granularity-unknown": cli("rank", "small_cnn", *DIGITS, "--granularity", "row", prep=("w",), refuse=r"'row'"),
    "rank-samples-zero": cli("rank", "small_cnn", *DIGITS, "--samples", "0", prep=("w",), refuse=r"--rank-samples 0"),
    "rank-data-unknown": cli("rank", "small_cnn", "--data", "imagenet", refuse=r"imagenet"),
    "rank-data-missing-files": cli(
        "rank", "small_cnn", "--data", "cifar10", "--data-dir", "adir", prep=("text",), refuse=r"cifar"
    ),
    "rank-gelu-on-relu-model": cli("rank", "small_cnn", *DIGITS, "--kinds", "gelu", prep=("w",), refuse=r"gelu"),
    "rank-synthetic-no-shape": cli(
        "rank",
        "small_cnn",
        "--data",
        "synthetic",
        "--samples",
        "64",
        ok=_exit0(lambda out, d: assert_in("features", out)),
        guard=False,
    ),
    "rank-synthetic-with-shape": cli(
        "rank",
        "small_cnn",
        "--data",
        "synthetic",
        "--input-shape",
        "1,2,6,6",
        "--samples",
        "64",
        ok=_exit0(lambda out, d: assert_in("features", out)),
        guard=False,
    ),
    # bench: refused before any party starts
    "bench-master-port-without-rank": cli("bench", "small_cnn", "--master-port", "29511", refuse=r"--master-port"),
    "bench-ifname-without-rank": cli("bench", "small_cnn", "--ifname", "eth0", refuse=r"--ifname"),
    "bench-rank-too-high": cli("bench", "small_cnn", "--rank", "2", refuse=r"--rank 2"),
    "bench-dealer-with-rank": cli("bench", "small_cnn", "--role", "dealer", "--rank", "0", refuse=r"--rank"),
    "bench-role-unknown": cli("bench", "small_cnn", "--role", "client", "--rank", "1", refuse=r"'client'"),
    "bench-parties-vs-world-size": cli(
        "bench",
        "small_cnn",
        "--rank",
        "0",
        "--parties",
        "3",
        "--world-size",
        "2",
        refuse=r"--parties 3.*--world-size 2",
    ),
    "bench-party0-dealer-process": cli(
        "bench",
        "small_cnn",
        "--role",
        "dealer",
        "--dealer",
        "party0",
        refuse=r"party0.*dealer",
    ),
    "bench-runs-zero": cli("bench", "small_cnn", "--runs", "0", refuse=r"--runs 0"),
    "bench-timeout-nan": cli("bench", "small_cnn", "--timeout", "nan", refuse=r"--timeout nan"),
    "bench-batch-zero": cli("bench", "small_cnn", "--batch", "0", refuse=r"--batch 0"),
    "bench-wan-garbage": cli("bench", "small_cnn", "--wan", "slow", refuse=r"--wan 'slow'"),
    "bench-link-bad-json": cli(
        "bench", "small_cnn", "--link", "bad_link.json", prep=("links",), refuse=r"bad_link\.json"
    ),
    "bench-link-infinite-rtt": cli(
        "bench",
        "small_cnn",
        "--link",
        "inf_link.json",
        prep=("links",),
        refuse=r"inf_link\.json",
    ),
    "bench-optimized-missing": cli("bench", "small_cnn", "--optimized", "nothere", refuse=r"nothere"),
    "bench-optimized-other-model": cli(
        "bench", "models.py:Tiny", "--optimized", "opt", prep=("models", "opt"), refuse=r"another model|sites differ"
    ),
    "bench-optimized-truncated-plan": cli(
        "bench",
        "small_cnn",
        "--input-shape",
        "1,1,8,8",
        *WEIGHTS,
        "--optimized",
        "opt",
        prep=("cutplan",),
        refuse=r"plan\.json",
    ),
    "bench-optimized-text-model-pt": cli(
        "bench",
        "small_cnn",
        "--input-shape",
        "1,1,8,8",
        *WEIGHTS,
        "--optimized",
        "opt",
        prep=("textmodel",),
        refuse=r"model\.pt",
    ),
    "bench-optimized-frontier-root": cli(
        "bench",
        "small_cnn",
        "--input-shape",
        "1,1,8,8",
        *WEIGHTS,
        "--optimized",
        "out",
        prep=("frontier",),
        refuse=r"out.*budget_200",
    ),
    "bench-synthetic-no-shape": cli(
        "bench",
        "small_cnn",
        "--data",
        "synthetic",
        launch=True,
    ),
    "bench-synthetic-with-shape": cli(
        "bench",
        "small_cnn",
        "--data",
        "synthetic",
        "--input-shape",
        "1,3,16,16",
        launch=True,
    ),
    "bench-random-inputs-launches": cli("bench", "small_cnn", "--input-shape", "1,3,8,8", launch=True),
    # train
    "train-out-is-folder": cli(
        "train", "small_cnn", "--data", "digits", "-o", "adir", prep=("text",), refuse=r"-o 'adir'"
    ),
    "train-epochs-zero": cli(
        "train", "small_cnn", "--data", "digits", "-o", "w.pt", "--epochs", "0", refuse=r"--epochs 0"
    ),
    "train-lr-nan": cli("train", "small_cnn", "--data", "digits", "-o", "w.pt", "--lr", "nan", refuse=r"--lr nan"),
    "train-batch-size-negative": cli(
        "train", "small_cnn", "--data", "digits", "-o", "w.pt", "--batch-size", "-8", refuse=r"--batch-size -8"
    ),
    "train-device-cuda": cli(
        "train", "small_cnn", "--data", "digits", "-o", "w.pt", "--device", "cuda", refuse=r"cuda"
    ),
    "train-synthetic-tiny": cli(
        "train",
        "small_cnn",
        "--data",
        "synthetic",
        "--input-shape",
        "1,1,8,8",
        "--epochs",
        "1",
        "--max-train",
        "64",
        "-o",
        "net.pt",
        ok=_exit0(lambda out, d: assert_file(d / "net.pt")),
        guard=False,
    ),
    # report
    "report-missing-folder": cli("report", "norun", refuse=r"norun"),
    "report-json-is-list": cli("report", "listrun", prep=("runs",), refuse=r"listrun.*list"),
    "report-json-truncated": cli("report", "cutrun", prep=("runs",), refuse=r"cutrun.*not valid JSON"),
    "report-json-empty-object": cli("report", "emptyrun", prep=("runs",), refuse=r"emptyrun.*lacks"),
    "report-json-hollow": cli("report", "hollowrun", prep=("runs",), refuse=r"hollowrun.*malformed"),
    # link (refused before any socket is opened)
    "link-world-size-one": cli(
        "link", "--rank", "0", "--master-addr", "127.0.0.1", "--world-size", "1", refuse=r"--world-size 1"
    ),
    "link-port-zero": cli(
        "link", "--rank", "0", "--master-addr", "127.0.0.1", "--master-port", "0", refuse=r"--master-port 0"
    ),
    "link-timeout-negative": cli(
        "link", "--rank", "1", "--master-addr", "127.0.0.1", "--timeout", "-5", refuse=r"--timeout -5"
    ),
    "link-json-folder": cli(
        "link", "--rank", "1", "--master-addr", "127.0.0.1", "--json", "adir", prep=("text",), refuse=r"--json 'adir'"
    ),
    # run (refused before the baseline)
    "run-budget-and-budgets": cli(
        "run", "small_cnn", "--data", "digits", "--budget", "5", "--budgets", "4,3", refuse=r"not both"
    ),
    "run-samples-zero": cli("run", "small_cnn", "--data", "digits", "--samples", "0", refuse=r"--samples 0"),
    "run-runs-dir-file": cli(
        "run", "small_cnn", "--data", "digits", "--runs-dir", "afile", prep=("text",), refuse=r"afile"
    ),
    "run-budget-too-big": cli("run", "small_cnn", "--data", "digits", "--budget", "999999", refuse=r"999,999"),
    "run-unknown-model": cli("run", "lenet", "--data", "digits", refuse=r"lenet"),
    "run-baseline-epochs-zero": cli(
        "run", "small_cnn", "--data", "digits", "--baseline-epochs", "0", refuse=r"--baseline-epochs 0"
    ),
    # more options that do not apply, more bad numbers
    "optimize-degree-with-square": cli(
        *OPT,
        "--budget",
        "100",
        "--replace",
        "square",
        "--degree",
        "4",
        "-o",
        "out",
        prep=("w",),
        refuse=r"--degree",
    ),
    "rank-budget-with-taylor": cli(
        "rank",
        "small_cnn",
        *DIGITS,
        "--strategy",
        "taylor",
        "--budget",
        "100",
        prep=("w",),
        refuse=r"--budget",
    ),
    "optimize-kind-upper-case": cli(
        *OPT, "--budget", "10", "--kinds", "RELU", "-o", "out", prep=("w",), refuse=r"RELU"
    ),
    "optimize-replace-unknown": cli(
        *OPT, "--budget", "10", "--replace", "cube", "-o", "out", prep=("w",), refuse=r"'cube'"
    ),
    "optimize-latency-budget-zero": cli(
        *OPT[:-2], "--latency-budget", "0", "-o", "out", prep=("w",), refuse=r"--latency-budget 0"
    ),
    "optimize-max-train-zero": cli(
        *OPT, "--budget", "10", "--max-train", "0", "-o", "out", prep=("w",), refuse=r"--max-train 0"
    ),
    "optimize-weights-and-pretrained": cli(
        *OPT, "--budget", "10", "--pretrained", "-o", "out", prep=("w",), refuse=r"--pretrained or --weights"
    ),
    "optimize-out-read-only-parent": cli(*OPT, "--budget", "10", "-o", "/proc/probe/out", prep=("w",), refuse=r"/proc"),
    "optimize-frontier-real": cli(
        *OPT,
        "--budgets",
        "300,200",
        "-o",
        "out",
        prep=("w",),
        guard=False,
        ok=_exit0(
            lambda out, d: (
                [assert_json(d / "out" / f"budget_{b}" / "plan.json", "sites") for b in (300, 200)]
                and assert_file(d / "out" / "pareto.md")
            )
        ),
    ),
    "bench-digits-no-shape": cli("bench", "small_cnn", "--data", "digits", launch=True),  # the dataset fixes the shape
    "bench-digits-with-shape": cli("bench", "small_cnn", "--data", "digits", "--input-shape", "1,1,8,8", launch=True),
    "bench-optimized-matching": cli(
        "bench",
        "small_cnn",
        "--data",
        "digits",
        "--input-shape",
        "1,1,8,8",
        *WEIGHTS,
        "--optimized",
        "opt",
        prep=("opt",),
        launch=True,
    ),
    "bench-samples-zero": cli("bench", "small_cnn", "--samples", "0", refuse=r"--samples 0"),
    "bench-warmup-negative": cli("bench", "small_cnn", "--warmup", "-1", refuse=r"--warmup -1"),
    "bench-lan-one-number": cli("bench", "small_cnn", "--lan", "0.5", refuse=r"--lan '0\.5'"),
    "bench-json-folder": cli("bench", "small_cnn", "--json", "adir", prep=("text",), refuse=r"--json 'adir'"),
    "bench-world-size-one": cli("bench", "small_cnn", "--rank", "0", "--world-size", "1", refuse=r"--world-size 1"),
    "bench-cache-dir-file": cli(
        "bench", "small_cnn", "--cache-dir", "afile", prep=("text",), refuse=r"--cache-dir 'afile'"
    ),
    "train-out-read-only-parent": cli(
        "train", "small_cnn", "--data", "digits", "-o", "/proc/probe/w.pt", refuse=r"/proc"
    ),
    "train-max-train-negative": cli(
        "train", "small_cnn", "--data", "digits", "-o", "w.pt", "--max-train", "-3", refuse=r"--max-train -3"
    ),
    "report-a-file": cli("report", "afile", prep=("text",), refuse=r"afile"),
    "link-rank-negative": cli("link", "--rank", "-1", "--master-addr", "127.0.0.1", refuse=r"--rank -1"),
    "link-empty-address": cli(
        "link",
        "--rank",
        "1",
        "--master-addr",
        "",
        refuse=r"--master-addr",
    ),
    "run-count-with-rounds-budget": cli(
        "run", "small_cnn", "--data", "digits", "--selector", "count", "--rounds-budget", "5", refuse=r"selector"
    ),
    "run-network-three-numbers": cli("run", "small_cnn", "--data", "digits", "--network", "1,2,3", refuse=r"'1,2,3'"),
    "run-timeout-zero": cli("run", "small_cnn", "--data", "digits", "--timeout", "0", refuse=r"--timeout 0"),
    "run-weights-text": cli(
        "run", "small_cnn", "--data", "digits", "--weights", "notes.pt", prep=("text",), refuse=r"notes\.pt"
    ),
    "run-weights-other-channels": cli(
        "run", "small_cnn", "--data", "digits", "--weights", "w3.pt", prep=("w3",), refuse=r"w3\.pt"
    ),
    "export-unsupported-op": cli(
        "export",
        "models.py:FFT",
        "-o",
        "m.onnx",
        prep=("models",),
        refuse=r"fft_rfft",
    ),
    "export-gelu-opset-7": cli(
        "export",
        "models.py:Gelu",
        "-o",
        "m.onnx",
        "--opset",
        "7",
        prep=("models",),
        refuse=r"Erf",
    ),
    "export-vit-opset-9": cli(
        "export",
        "vit_tiny",
        "-o",
        "m.onnx",
        "--opset",
        "9",
        refuse=r"opset",
    ),
    "bench-optimized-plan-granularity-row": cli(
        "bench",
        "small_cnn",
        "--input-shape",
        "1,1,8,8",
        *WEIGHTS,
        "--optimized",
        "opt",
        prep=("planrow",),
        refuse=r"row",
    ),
    "run-batch-zero": cli(
        "run",
        "small_cnn",
        "--data",
        "digits",
        "--batch",
        "0",
        refuse=r"--batch 0",
    ),
    "models-extra-argument": Case(
        ["models", "resnet20"],
        refuse=r"resnet20",
    ),
}


# --- API cases ---------------------------------------------------------------------------------------


def _count_unbatched(_d):
    c = relu_opt.count(small1(), torch.zeros(1, 8, 8))
    return c


def _load_other_model(d):
    return relu_opt.load(d / "opt", model=Tiny())


def _bench_tensor_tuple(_d):
    return relu_opt.bench(small1(), (torch.zeros(2, 1, 8, 8),))


def _optimize_big(d):
    return relu_opt.optimize(small1(), "digits", budget=10**6, outdir=d / "out", epochs=0, selector="count")


def _check_rank(crit, d):
    assert isinstance(crit, relu_opt.Criticality)
    assert crit.to_dict()


def _check_loaded(m, d):
    assert isinstance(m, relu_opt.Loaded)
    assert m.input_shape == (1, 1, 8, 8) and m.data.input_shape[1:] == (1, 8, 8)
    assert m.model(torch.zeros(m.input_shape)).shape == (1, 10)


def _check_trained(r, d):
    assert isinstance(r, relu_opt.TrainOutcome) and 0.0 <= r.test_accuracy <= 100.0
    assert (d / "sub" / "net.pt").is_file()


def _check_load(gm, d):
    out = gm(torch.zeros(1, 1, 8, 8))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def _check_host(h, d):
    assert h.is_dealer and h.rank == 2 and h.world_size == 2 and h.master_port == 29500


def _check_census(c, d):
    assert c.total_relu == relu_opt.count(small1(), torch.zeros(1, 1, 8, 8)).total_relu


API_CASES: dict[str, Case] = {
    # load_model
    "load_model-shape-with-word": api(
        lambda d: relu_opt.load_model("small_cnn", input_shape=(1, "three", 8, 8)),
        refuse=r"three",
    ),
    "load_model-shape-with-float": api(
        lambda d: relu_opt.load_model("small_cnn", input_shape=[1, 3, 8.7, 8]),
        refuse=r"8\.7",
    ),
    "load_model-shape-int": api(
        lambda d: relu_opt.load_model("small_cnn", input_shape=32),
        refuse=r"32",
    ),
    "load_model-num-classes-string": api(
        lambda d: relu_opt.load_model("small_cnn", num_classes="10"),
        refuse=r"num-classes|num_classes",
    ),
    "load_model-num-classes-float": api(
        lambda d: relu_opt.load_model("small_cnn", num_classes=2.5),
        refuse=r"2\.5",
    ),
    "load_model-none": api(lambda d: relu_opt.load_model(None), refuse=r"None"),
    "load_model-module-pretrained": api(lambda d: relu_opt.load_model(Tiny(), pretrained=True), refuse=r"pretrained"),
    "load_model-shape-against-data": api(
        lambda d: relu_opt.load_model("small_cnn", data="digits", input_shape="1,1,28,28"), refuse=r"1,1,28,28"
    ),
    "load_model-synthetic-with-shape": api(
        lambda d: relu_opt.load_model("small_cnn", data="synthetic", input_shape="1,1,8,8"), ok=_check_loaded
    ),
    "load_model-weights-folder": api(
        lambda d: relu_opt.load_model("small_cnn", weights=d / "adir"), prep=("text",), refuse=r"adir' is a folder"
    ),
    # count / export
    "count-tuple-example": api(
        lambda d: relu_opt.count(small1(), (torch.zeros(1, 1, 8, 8),)), refuse=r"example is a tuple"
    ),
    "count-list-example": api(lambda d: relu_opt.count(small1(), [[0.0] * 8] * 8), refuse=r"example is a list"),
    "count-spec-string-model": api(lambda d: relu_opt.count("small_cnn", torch.zeros(1, 3, 8, 8)), refuse=r"str"),
    "count-tuple-forward": api(lambda d: relu_opt.count(WithAux(), torch.zeros(1, 1, 8, 8)), refuse=r"tuple"),
    "count-unbatched-example": api(
        _count_unbatched,
        refuse=r"1,8,8",
    ),
    "count-leaf-as-string": api(
        lambda d: relu_opt.count(small1(), torch.zeros(1, 1, 8, 8), leaf="Conv2d"), ok=_check_census
    ),
    "count-leaf-as-class": api(
        lambda d: relu_opt.count(small1(), torch.zeros(1, 1, 8, 8), leaf=[nn.Conv2d]), ok=_check_census
    ),
    "export-to-folder": api(
        lambda d: relu_opt.export(small1(), torch.zeros(1, 1, 8, 8), d / "adir"), prep=("text",), refuse=r"folder"
    ),
    "export-opset-string": api(
        lambda d: relu_opt.export(small1(), torch.zeros(1, 1, 8, 8), d / "m.onnx", opset="13"),
        refuse=r"--opset|opset",
    ),
    "export-opset-too-high": api(
        lambda d: relu_opt.export(small1(), torch.zeros(1, 1, 8, 8), d / "m.onnx", opset=99), refuse=r"--opset 99"
    ),
    # rank / optimize
    "rank-unknown-option": api(lambda d: relu_opt.rank(small1(), "digits", strides=2), refuse=r"strides"),
    "rank-config-string": api(lambda d: relu_opt.rank(small1(), "digits", config="taylor"), refuse=r"config is a str"),
    "rank-data-number": api(lambda d: relu_opt.rank(small1(), 42), refuse=r"data is a int"),
    "rank-work-is-file": api(
        lambda d: relu_opt.rank(small1(), "digits", work=d / "afile", rank_samples=64), prep=("text",), refuse=r"afile"
    ),
    "rank-three-channels-on-digits": api(
        lambda d: relu_opt.rank(create_model("small_cnn"), "digits"), refuse=r"small_cnn|SmallCNN|shape"
    ),
    "rank-real": api(
        lambda d: relu_opt.rank(small1(), "digits", work=d / "rk", rank_samples=64),
        ok=_check_rank,
        guard=False,
    ),
    "optimize-budget-and-budgets": api(
        lambda d: relu_opt.optimize(small1(), "digits", budget=10, budgets=[5], outdir=d / "out"), refuse=r"not both"
    ),
    "optimize-budgets-empty": api(
        lambda d: relu_opt.optimize(small1(), "digits", budgets=[], outdir=d / "out"), refuse=r"empty"
    ),
    "optimize-budgets-none-level": api(
        lambda d: relu_opt.optimize(small1(), "digits", budgets=[100, None], outdir=d / "out"), refuse=r"None"
    ),
    "optimize-budget-float": api(
        lambda d: relu_opt.optimize(small1(), "digits", budget=200.0, outdir=d / "out"), refuse=r"200\.0.*integer"
    ),
    "optimize-budget-bool": api(
        lambda d: relu_opt.optimize(small1(), "digits", budget=True, outdir=d / "out"), refuse=r"True"
    ),
    "optimize-budget-too-big": api(_optimize_big, refuse=r"1,000,000"),
    "optimize-outdir-file": api(
        lambda d: relu_opt.optimize(small1(), "digits", budget=5, outdir=d / "afile", selector="count"),
        prep=("text",),
        refuse=r"afile",
    ),
    "optimize-kind-budgets-absent": api(
        lambda d: relu_opt.optimize(
            small1(), "digits", budget=100, kind_budgets={"gelu": 5}, outdir=d / "out", selector="count", epochs=0
        ),
        refuse=r"gelu",
    ),
    "optimize-kind-budgets-triple": api(
        lambda d: relu_opt.OptimizeConfig(kind_budgets=[("relu", 5, 6)]),
        refuse=r"relu",
    ),
    "optimize-epochs-string": api(
        lambda d: relu_opt.optimize(small1(), "digits", budget=5, epochs="1", outdir=d / "out"), refuse=r"'1'"
    ),
    "OptimizeConfig-device-none": api(
        lambda d: relu_opt.OptimizeConfig(device=None),
        refuse=r"device",
    ),
    "OptimizeConfig-latency-inf": api(lambda d: relu_opt.OptimizeConfig(latency_budget=float("inf")), refuse=r"inf"),
    # Pricing / HostRole
    "Pricing-parties-float": api(lambda d: relu_opt.Pricing(parties=2.0), refuse=r"--parties 2\.0"),
    "Pricing-backend-unknown": api(lambda d: relu_opt.Pricing(backend="mp-spdz"), refuse=r"mp-spdz"),
    "Pricing-network-none": api(
        lambda d: relu_opt.Pricing(network=None),
        refuse=r"network",
    ),
    "Pricing-cache-file": api(lambda d: relu_opt.Pricing(cache=str(d / "afile")), prep=("text",), refuse=r"afile"),
    "HostRole-port-without-rank": api(
        lambda d: relu_opt.HostRole.from_options(None, None, master_port=29500), refuse=r"--master-port"
    ),
    "HostRole-rank-string": api(
        lambda d: relu_opt.HostRole.from_options("party", "1"),
        refuse=r"--rank",
    ),
    "HostRole-port-too-high": api(
        lambda d: relu_opt.HostRole.from_options("party", 0, master_port=70000), refuse=r"70000"
    ),
    "HostRole-dealer": api(lambda d: relu_opt.HostRole.from_options("dealer", None), ok=_check_host),
    # load / report
    "load-other-model": api(_load_other_model, prep=("opt",), refuse=r"another model|sites differ"),
    "load-truncated-plan": api(lambda d: relu_opt.load(d / "opt"), prep=("cutplan",), refuse=r"plan.*not valid JSON"),
    "load-plan-is-list": api(lambda d: relu_opt.load(d / "opt"), prep=("listplan",), refuse=r"holds a list"),
    "load-model-pt-text": api(lambda d: relu_opt.load(d / "opt"), prep=("textmodel",), refuse=r"model\.pt"),
    "load-a-file": api(lambda d: relu_opt.load(d / "afile"), prep=("text",), refuse=r"afile"),
    "load-model-as-spec-string": api(
        lambda d: relu_opt.load(d / "opt", model="small_cnn"),
        prep=("opt",),
        refuse=r"model",
    ),
    "load-real": api(lambda d: relu_opt.load(d / "opt"), prep=("opt",), ok=_check_load),
    "load-real-with-model": api(
        lambda d: relu_opt.load(d / "optmod", model=small1()), prep=("optmod",), ok=_check_load
    ),
    "load-folder-made-from-module": api(
        lambda d: relu_opt.load(d / "optmod"), prep=("optmod",), refuse=r"relu_opt\.load\(folder, model="
    ),
    "report-list": api(lambda d: relu_opt.report(d / "listrun"), prep=("runs",), refuse=r"list"),
    "report-hollow": api(lambda d: relu_opt.report(d / "hollowrun"), prep=("runs",), refuse=r"malformed"),
    # bench (refused before any party starts)
    "bench-x-tuple": api(
        _bench_tensor_tuple,
        refuse=r"x is a tuple",
    ),
    "bench-pricing-string": api(lambda d: relu_opt.bench(small1(), pricing="wan"), refuse=r"pricing is a str"),
    "bench-runs-zero": api(lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), runs=0), refuse=r"--runs 0"),
    "bench-timeout-inf": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), timeout=float("inf")), refuse=r"--timeout inf"
    ),
    "bench-link-garbage": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), link="fast"), refuse=r"--link 'fast'"
    ),
    "bench-other-model-folder": api(
        lambda d: relu_opt.bench(Tiny(), torch.zeros(2, 1, 8, 8), optimized=d / "opt"),
        prep=("opt",),
        refuse=r"another model|sites differ",
    ),
    "bench-no-shape-known": api(lambda d: relu_opt.bench(small1()), refuse=r"x="),
    "bench-empty-x": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(0, 1, 8, 8)),
        refuse=r"x|sample",
    ),
    "bench-labels-do-not-match": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), y=torch.zeros(5, dtype=torch.long)),
        refuse=r"y",
    ),
    "bench-module-folder-from-module": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), optimized=d / "optmod"),
        prep=("optmod",),
        launch=True,
    ),
    "bench-module-launches": api(lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8)), launch=True),
    # train
    "train-unknown-option": api(
        lambda d: relu_opt.train(small1(), "digits", learning_rate=0.1),
        refuse=r"learning_rate",
    ),
    "train-epochs-float": api(
        lambda d: relu_opt.train(small1(), "digits", epochs=1.5, max_train=64),
        refuse=r"--epochs 1\.5",
    ),
    "train-output-folder": api(
        lambda d: relu_opt.train(small1(), "digits", d / "adir", epochs=1), prep=("text",), refuse=r"folder"
    ),
    "train-device-none": api(
        lambda d: relu_opt.train(small1(), "digits", device=None),
        refuse=r"device",
    ),
    "train-real": api(
        lambda d: relu_opt.train(small1(), "digits", d / "sub" / "net.pt", epochs=1, max_train=64),
        ok=_check_trained,
        guard=False,
    ),
    # RunConfig / run
    "RunConfig-samples-float": api(
        lambda d: relu_opt.RunConfig(samples=2.5),
        refuse=r"2\.5",
    ),
    "RunConfig-samples-string": api(
        lambda d: relu_opt.RunConfig(samples="8"),
        refuse=r"samples",
    ),
    "RunConfig-budgets-int": api(
        lambda d: relu_opt.RunConfig(budgets=100),
        refuse=r"100",
    ),
    "RunConfig-budgets-string": api(
        lambda d: relu_opt.RunConfig(budgets="100"),
        refuse=r"'100'",
    ),
    "RunConfig-latency-levels-negative": api(
        lambda d: relu_opt.RunConfig(latency_levels=(-0.5,)),
        refuse=r"-0\.5|latency",
    ),
    "RunConfig-budget-in-optimize": api(
        lambda d: relu_opt.RunConfig(optimize=relu_opt.OptimizeConfig(budget=5)), refuse=r"budgets"
    ),
    "RunConfig-fraction-above-one": api(lambda d: relu_opt.RunConfig(fraction=1.5), refuse=r"--fraction 1\.5"),
    "RunConfig-weights-missing": api(lambda d: relu_opt.RunConfig(weights="gone.pt"), refuse=r"gone\.pt"),
    "run-config-string": api(lambda d: relu_opt.run("small_cnn"), refuse=r"config is a str"),
    "run-runs-dir-file": api(
        lambda d: relu_opt.run(relu_opt.RunConfig(data="digits"), runs_dir=d / "afile"), prep=("text",), refuse=r"afile"
    ),
    "run-budget-too-big": api(
        lambda d: relu_opt.run(relu_opt.RunConfig("small_cnn", "synthetic", budgets=(10**9,)), runs_dir=d / "runs"),
        refuse=r"1,000,000,000",
    ),
    "run-model-number": api(
        lambda d: relu_opt.run(relu_opt.RunConfig(model=123, data="digits"), runs_dir=d / "runs"),
        refuse=r"123",
    ),
    "run-model-unknown": api(
        lambda d: relu_opt.run(relu_opt.RunConfig(model="lenet", data="digits"), runs_dir=d / "runs"),
        refuse=r"lenet",
    ),
    # more API cases
    "count-nan-example": api(
        lambda d: relu_opt.count(small1(), torch.full((1, 1, 8, 8), float("nan"))), ok=_check_census
    ),
    "count-int-example": api(
        lambda d: relu_opt.count(small1(), torch.zeros(1, 1, 8, 8, dtype=torch.long)),
        refuse=r"Long|dtype|float",
    ),
    "export-read-only-parent": api(
        lambda d: relu_opt.export(small1(), torch.zeros(1, 1, 8, 8), "/proc/probe/m.onnx"), refuse=r"/proc"
    ),
    "rank-kinds-string-absent": api(
        lambda d: relu_opt.rank(small1(), "digits", kinds="gelu", rank_samples=64, work=d / "rk"), refuse=r"gelu"
    ),
    "optimize-synthetic-classes": api(
        lambda d: relu_opt.optimize(small1(), "synthetic", budget=10, outdir=d / "out"), refuse=r"4 classes"
    ),
    "optimize-count-with-latency": api(
        lambda d: relu_opt.optimize(small1(), "digits", outdir=d / "out", selector="count", latency_budget=1.0),
        refuse=r"selector",
    ),
    "load_model-synthetic-default-shape": api(
        lambda d: relu_opt.load_model("small_cnn", data="synthetic"),
        ok=lambda m, d: (m.input_shape == (1, 3, 32, 32)) or pytest.fail(str(m.input_shape)),
    ),
    "load_model-pretrained-other-data": api(
        lambda d: relu_opt.load_model("resnet20", pretrained="cifar10"), refuse=r"cifar10"
    ),
    "load_model-leaf-unknown": api(lambda d: relu_opt.load_model("small_cnn", leaf=("Nope",)), refuse=r"'Nope'"),
    "Pricing-parties-bool": api(lambda d: relu_opt.Pricing(parties=True), refuse=r"--parties True"),
    "Pricing-party0-insecure": api(
        lambda d: relu_opt.Pricing(dealer="party0"),
        ok=lambda p, d: ("INSECURE" in p.insecure and "INSECURE" in p.describe()) or pytest.fail(p.describe()),
    ),
    "HostRole-party-without-rank": api(lambda d: relu_opt.HostRole.from_options("party", None), refuse=r"--rank"),
    "HostRole-world-size-vs-parties": api(
        lambda d: relu_opt.HostRole.from_options("party", 0, world_size=3, parties=4), refuse=r"disagree"
    ),
    "bench-dealer-with-weights": api(
        lambda d: relu_opt.bench(
            "small_cnn", weights=d / "w.pt", input_shape="1,1,8,8", host=relu_opt.HostRole.from_options("dealer", None)
        ),
        prep=("w",),
        refuse=r"dealer needs no weights",
    ),
    "bench-x-wrong-channels": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 3, 8, 8)), refuse=r"2,3,8,8|1,3,8,8"
    ),
    "bench-networks-strings": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), networks=("lan", "wan")), launch=True
    ),
    "bench-samples-string": api(
        lambda d: relu_opt.bench(small1(), torch.zeros(2, 1, 8, 8), samples="2"),
        refuse=r"--samples",
    ),
    "bench-spec-with-data-launches": api(
        lambda d: relu_opt.bench("small_cnn", data="digits", input_shape="1,1,8,8"), launch=True
    ),
    "report-a-file": api(lambda d: relu_opt.report(d / "afile"), prep=("text",), refuse=r"afile"),
    "RunConfig-budgets-negative": api(lambda d: relu_opt.RunConfig(budgets=(100, -1)), refuse=r"-1"),
    "RunConfig-optimize-string": api(lambda d: relu_opt.RunConfig(optimize="fast"), refuse=r"optimize is a str"),
    "RunConfig-bench-batch-zero": api(lambda d: relu_opt.RunConfig(bench_batch=0), refuse=r"--batch 0"),
    "run-weights-text": api(
        lambda d: relu_opt.run(
            relu_opt.RunConfig("small_cnn", "digits", weights=str(d / "notes.pt")), runs_dir=d / "runs"
        ),
        prep=("text",),
        refuse=r"notes\.pt",
    ),
    "load-plan-input-shape-3d": api(
        lambda d: relu_opt.load(d / "opt"),
        prep=("plan3d",),
        refuse=r"plan|input",
    ),
    "load-plan-granularity-row": api(
        lambda d: relu_opt.load(d / "opt"),
        prep=("planrow",),
        refuse=r"row",
    ),
    "load-plan-site-renamed": api(lambda d: relu_opt.load(d / "opt"), prep=("plansite",), refuse=r"features_99"),
    "load-model-pt-truncated": api(lambda d: relu_opt.load(d / "opt"), prep=("cutmodel",), refuse=r"model\.pt"),
    "load-model-pt-other-state": api(
        lambda d: relu_opt.load(d / "opt"), prep=("otherstate",), refuse=r"model\.pt' does not fit the plan"
    ),
}


# --- the harness -------------------------------------------------------------------------------------


def assert_in(text: str, out: str) -> None:
    assert text in out, out


def assert_file(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path


def assert_json(path: Path, key: str) -> None:
    assert key in json.loads(path.read_text()), path


def listing(root: Path, skip: Path | None) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip is None or not (p == skip or skip in p.parents)}


def _raise_launched(*_a, **_k):
    raise Launched()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RELU_OPT_CACHE", str(work / ".cache"))
    return work


def _guard(monkeypatch) -> None:
    """Every launch of parties, calibration, link measurement, training and ranking raises Launched."""
    import relu_opt.encrypted
    import relu_opt.optimizer.planner
    import relu_opt.pipeline
    import relu_opt.training
    from relu_opt.backends import get_backend

    engine = type(get_backend("crypten"))
    for name in ("measure", "run_host", "calibrate", "measure_link"):
        if hasattr(engine, name):
            monkeypatch.setattr(engine, name, _raise_launched)
    monkeypatch.setattr(relu_opt.encrypted, "bench", _raise_launched)
    monkeypatch.setattr(relu_opt.encrypted, "bench_host", _raise_launched)
    monkeypatch.setattr(relu_opt.training, "fit", _raise_launched)
    monkeypatch.setattr(relu_opt.pipeline, "fit", _raise_launched)
    monkeypatch.setattr(relu_opt.optimizer.planner, "_rank", _raise_launched)


def _params(cases: dict[str, Case]):
    out = []
    for name, case in cases.items():
        marks = [pytest.mark.xfail(strict=True, reason="BUG: " + case.extra["xfail"])] if "xfail" in case.extra else []
        out.append(pytest.param(case, id=name, marks=marks))
    return out


def _prepare(case: Case, folder: Path, golden: dict[str, Path]) -> Path | None:
    for tag in case.prep:
        PREP[tag](folder, golden)
    return folder / ".cache" if case.reads_data else None


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} lines:\n{text}"
    return lines[0]


@pytest.mark.parametrize("case", _params(CLI_CASES))
def test_cli(case: Case, golden, folder, monkeypatch, capfd):
    skip = _prepare(case, folder, golden)
    if case.guard:
        _guard(monkeypatch)
    before = listing(folder, skip)
    capfd.readouterr()
    r = runner.invoke(app, case.action)
    # what reaches the terminal: the CLI's own output, and anything written straight to the file descriptors
    fd = capfd.readouterr()
    output = r.output + fd.out + fd.err
    assert "Traceback" not in output, output
    if case.launch:
        assert isinstance(r.exception, Launched), (r.exit_code, output, repr(r.exception))
    elif case.ok is not None:
        case.ok(r, folder)
    else:
        assert r.exit_code == 2, (r.exit_code, output, repr(r.exception))
        line = _one_line(output)
        assert re.search(case.refuse, line), line
        assert listing(folder, skip) == before, sorted(listing(folder, skip) ^ before)


@pytest.mark.parametrize("case", _params(API_CASES))
def test_api(case: Case, golden, folder, monkeypatch):
    skip = _prepare(case, folder, golden)
    if case.guard:
        _guard(monkeypatch)
    before = listing(folder, skip)
    if case.launch:
        with pytest.raises(Launched):
            case.action(folder)
    elif case.ok is not None:
        case.ok(case.action(folder), folder)
    else:
        with pytest.raises(relu_opt.ReluOptError) as info:
            case.action(folder)
        message = str(info.value).strip()
        assert message and "\n" not in message, message
        assert re.search(case.refuse, message), message
        assert listing(folder, skip) == before, sorted(listing(folder, skip) ^ before)


def test_case_counts():
    assert len(CLI_CASES) + len(API_CASES) >= 60
    assert len(API_CASES) >= 20
