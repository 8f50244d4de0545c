"""The command line's options: each option's help in one table, and the typed aliases the commands use."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from relu_opt.backends import DEFAULT_BACKEND, list_backends

HELP = {
    "--input-shape": "Example input shape N,C,H,W (default: the model's own; --data synthetic takes any).",
    "--weights": "State dict to load (torch.save(model.state_dict())).",
    "--leaf": "Module class or name fx should not trace into; repeatable.",
    "--num-classes": "Classes of a zoo model's head (default 10, or the weights').",
    "--pretrained": "Start from the weights shipped for this zoo model (`relu-opt models`).",
    "--data": "Dataset: fashion-mnist, cifar10, cifar100, digits, synthetic.",
    "--data-dir": "Folder holding the dataset files.",
    "--device": "cpu or cuda.",
    "--json": "Also write the result as JSON here.",
    "--max-drop": "Validation points the result may lose (default 1 without a budget); more fails, saving nothing.",
    "--strategy": "Ranking: taylor, drop-one, snl or random.",
    "--replace": "What replaces a dropped element: poly, square, identity (elementwise kinds); softmax defaults to "
    "2quad, LayerNorm to frozen-norm. Refused when it applies to none of the kinds optimized.",
    "--granularity": "Unit of keeping an element: site, channel, pixel.",
    "--public-coeffs": "Polynomials that cannot be folded into linear layers run with public coefficients (one "
    "square, one round, per degree-2 site), revealing them (part of the weights). Recorded in plan.json.",
    "--selector": "'latency' (priced by the backend's cost model: few sites, fewest round trips) or 'count' "
    "(highest criticality anywhere: the ReLU-count objective).",
    "--rounds-budget": "Modeled rounds of one forward (latency selector).",
    "--latency-budget": "Modeled seconds of one forward on --network (latency selector).",
    "--network": "Network the latency selector prices: lan, wan or RTT_MS,MB_PER_S.",
    "--prune": "Structure removed toward a latency goal beside the non-linear choices: 'channels' (output channels "
    "and residual branches, only where the non-linear choices alone cannot meet the goal; candidates compared "
    "after a short distillation) or 'none'. Default: channels when the backend's linear layers carry over 25% "
    "of the modeled latency on --network (said in the report).",
    "--backend": f"Engine that runs and prices the model: {', '.join(list_backends())} (default {DEFAULT_BACKEND}; "
    "spu is SecretFlow SPU, see --protocol). Selection is priced by this backend's cost model.",
    "--protocol": "Protocol of a backend with several. spu: cheetah (default; dealer-free 2PC, HE linear layers, "
    "silent OT), semi2k (only with --dealer party0: INSECURE) or aby3 (3 parties, --parties 3).",
    "--parties": "Computing parties (the dealer comes on top).",
    "--dealer": "Who deals the Beaver triples. The default backend's 'third-party': a process that is neither party "
    "(on separate hosts, a third host with --role dealer), its traffic reported as offline cost. 'party0': party 0 "
    "deals, so it can read the client's input: INSECURE, labelled so everywhere. SPU's cheetah and aby3: none.",
    "--cache-dir": "Cost-model and run cache (default $RELU_OPT_CACHE, else ~/.cache/relu-opt).",
    "--timeout": "Seconds before stuck parties are stopped.",
    "--epochs": "Fine-tuning epochs (fractions train on a subset; 0: none).",
    "--max-train": "Train on the first N examples only.",
    "--budget": "Elements per sample to keep (ReLUs for a ReLU network).",
    "--budgets": "Several budgets, comma separated: a frontier.",
    "--seed": "Seed of the initial weights, the ranking's samples and the data order.",
    "--kinds": "Kinds to optimize, comma separated (relu,relu6,gelu,softmax,layernorm,...; default: all).",
    "--samples": "Test samples run encrypted.",
    "--batch": "Samples per encrypted forward; costs are one batch's (1: one private query).",
    "--rank": "Run only this party (one per host; see docs/private-inference.md).",
    "--world-size": "Parties in a multi-host run.",
    "--master-addr": "Party 0's address.",
    "--master-port": "Party 0's rendezvous port.",
    "--ifname": "Network interface for the traffic (default: the route).",
}


def option(*names: str, **kw):
    """Return the typer Option for `names`, its help from HELP unless given."""
    return typer.Option(*names, help=kw.pop("help", None) or HELP[names[-1]], **kw)


Model = Annotated[
    str,
    typer.Argument(
        help="A zoo name (`relu-opt models`), path/to/file.py:Class, or package.module:factory.", show_default=False
    ),
]
Shape = Annotated[str | None, option("--input-shape")]
Weights = Annotated[Path | None, option("--weights")]
Leaf = Annotated[list[str] | None, option("--leaf")]
Classes = Annotated[int | None, option("--num-classes")]
Pretrained = Annotated[bool, option("--pretrained")]
Data = Annotated[str, option("--data")]
DataDir = Annotated[Path | None, option("--data-dir")]
Device = Annotated[str, option("--device")]
NPROC = inspect.Parameter(
    "nproc",
    inspect.Parameter.KEYWORD_ONLY,
    default=1,
    annotation=Annotated[
        int,
        option(
            "--nproc",
            min=1,
            help="Train on N processes of this host (data-parallel, torch.distributed; the same as `torchrun "
            "--nproc-per-node N -m relu_opt ...`, which also spans hosts). Only rank 0 writes and prints.",
        ),
    ],
)
Json = Annotated[Path | None, option("--json")]
MaxDrop = Annotated[float | None, option("--max-drop")]
Strategy = Annotated[str, option("--strategy")]
Replace = Annotated[str, option("--replace")]
Granularity = Annotated[str, option("--granularity")]
PublicCoeffs = Annotated[bool, option("--public-coeffs")]
Selector = Annotated[str, option("--selector")]
RoundsBudget = Annotated[float | None, option("--rounds-budget")]
LatencyBudget = Annotated[float | None, option("--latency-budget")]
NetworkOpt = Annotated[str, option("--network")]
Prune = Annotated[str | None, option("--prune")]
Parties = Annotated[int, option("--parties")]
BackendOpt = Annotated[str, option("--backend")]
Protocol = Annotated[str | None, option("--protocol")]
Dealer = Annotated[str | None, option("--dealer")]
CacheDir = Annotated[Path | None, option("--cache-dir")]
Timeout = Annotated[float, option("--timeout")]
Epochs = Annotated[float, option("--epochs")]
MaxTrain = Annotated[int | None, option("--max-train")]
Budget = Annotated[int | None, option("--budget")]
Budgets = Annotated[str | None, option("--budgets")]
Seed = Annotated[int, option("--seed")]
Kinds = Annotated[str | None, option("--kinds")]
Samples = Annotated[int, option("--samples")]
RunSamples = Annotated[
    int | None, option("--samples", help="Test samples run encrypted (default: 8, under --backend spu 4).")
]
Opset = Annotated[int, option("--opset", help="ONNX opset (7-21).")]
Optimized = Annotated[Path | None, option("--optimized", help="A `relu-opt optimize` folder to compare.")]
Batch = Annotated[
    int | None, option("--batch", help="Samples per encrypted forward (1: one private query). Default: all.")
]
BenchData = Annotated[str | None, option("--data", help="Dataset for real samples and accuracy (default: random).")]
Runs = Annotated[int, option("--runs", help="Timed runs per model.")]
Warmup = Annotated[int, option("--warmup", help="Untimed warm-up runs per model.")]
Lan = Annotated[str, option("--lan", help="LAN profile RTT_MS,MB_PER_S.")]
Wan = Annotated[str, option("--wan", help="WAN profile RTT_MS,MB_PER_S.")]
Rank = Annotated[int | None, option("--rank", help="Run only this party (one per host; docs/private-inference.md).")]
Role = Annotated[
    str | None,
    option("--role", help="On separate hosts: 'party' (with --rank) or 'dealer' (the third host dealing triples)."),
]
WorldSize = Annotated[int | None, option("--world-size", help="Parties in a multi-host run.")]
MasterAddr = Annotated[str, option("--master-addr", help="Party 0's address.")]
MasterPort = Annotated[int, option("--master-port", help="Party 0's rendezvous port.")]
Ifname = Annotated[str | None, option("--ifname", help="Network interface for the traffic (default: the route).")]
Link = Annotated[
    str | None, option("--link", help="Predict latency on this link: RTT_MS,MB_PER_S or a `relu-opt link --json` file.")
]
BenchPublicCoeffs = Annotated[
    bool, option("--public-coeffs", help="Unfoldable polynomials run with public coefficients (revealing them).")
]
LinkRank = Annotated[int, option("--rank", help="This party's rank (0 hosts the rendezvous).")]
LinkWorldSize = Annotated[int, option("--world-size", help="Parties.")]
LinkIfname = Annotated[str | None, option("--ifname", help="Network interface (default: the route).")]
LinkTimeout = Annotated[float, option("--timeout", help="Seconds to wait for the other parties.")]
LinkJson = Annotated[Path | None, option("--json", help="Write the measurement here (`bench --link FILE`).")]
TrainEpochs = Annotated[int, option("--epochs", help="Epochs over the train split.")]
Lr = Annotated[float, option("--lr", help="Peak learning rate (one-cycle cosine).")]
BatchSize = Annotated[int, option("--batch-size", help="Samples per step.")]
Resume = Annotated[bool, option("--resume", help="Continue from OUTPUT.ckpt.")]
TrainSeed = Annotated[int, option("--seed", help="Seed of the initial weights and the data order.")]
RankKinds = Annotated[str | None, option("--kinds", help="Kinds to rank, comma separated (default: every kind).")]
RankBudget = Annotated[int | None, option("--budget", help="Budget the snl masks aim for.")]
RankSamples = Annotated[int, option("--samples", "--rank-samples", help="Examples the ranking looks at.")]
FinetuneSteps = Annotated[int, option("--finetune-steps", help="drop-one: distillation steps per site.")]
RankSeed = Annotated[int, option("--seed", help="Seed of the ranking's samples.")]
OptimizeBudget = Annotated[int | None, option("--budget", help="Elements per sample to keep.")]
Degree = Annotated[int, option("--degree", help="Polynomial degree (1-4).")]
PolyPer = Annotated[str, option("--poly-per", help="Coefficients per 'channel' or per 'layer'.")]
OptimizeLr = Annotated[float, option("--lr", help="Fine-tuning peak learning rate.")]
OptimizeRankSamples = Annotated[int, option("--rank-samples", help="Examples the ranking looks at.")]
SnlEpochs = Annotated[float, option("--snl-epochs", help="snl: epochs its masks and weights train.")]
RangeWeight = Annotated[
    float, option("--range-weight", help="Loss weight of polynomial inputs past their fitted range (retries: 1).")
]
OptimizeKinds = Annotated[str | None, option("--kinds", help="Kinds to optimize, comma separated (default: all).")]
KindBudget = Annotated[list[str] | None, option("--kind-budget", help="KIND=N: a kind's own budget.")]
OptimizeSeed = Annotated[int, option("--seed", help="Seed of the ranking's samples and the data order.")]
RunPretrained = Annotated[
    bool, option("--pretrained/--no-pretrained", help="Start from the shipped weights when there are any.")
]
RunBudget = Annotated[
    int | None,
    option(
        "--budget",
        help="ReLUs to keep. Default: the lowest modeled latency within --max-drop (1 point); with --selector "
        "count, a tenth of the ReLUs.",
    ),
]
RunBudgets = Annotated[str | None, option("--budgets", help="Several budgets, comma separated.")]
BaselineEpochs = Annotated[int, option("--baseline-epochs", help="Epochs to train a baseline.")]
RunBatch = Annotated[int, option("--batch", help="Samples per encrypted forward (1: one private query).")]
RunsDir = Annotated[Path, option("--runs-dir", help="Where report folders go.")]
OnnxOut = Annotated[Path, option("-o", "--output", help="ONNX file to write.")]
WeightsOut = Annotated[Path, option("-o", "--output", help="Weights file to write (a state dict).")]
FolderOut = Annotated[Path, option("-o", "--output", help="Folder for plan, model, ONNX and reports.")]
RunModel = Annotated[str, typer.Argument(help="Model spec (zoo name, file.py:Class, package.module:factory).")]
RunDir = Annotated[Path, typer.Argument(help="A folder `relu-opt run` wrote.", show_default=False)]
MasterAddrOpt = Annotated[str | None, option("--master-addr", help="Party 0's address (default 127.0.0.1).")]
MasterPortOpt = Annotated[int | None, option("--master-port", help="Party 0's rendezvous port (default 29500).")]


def ints(text: str | None, option: str) -> list[int] | None:
    """Return the integers of 'N1,N2,...' (None for None)."""
    from relu_opt.errors import ConfigError

    parts = None if text is None else [p.strip().replace("_", "") for p in text.split(",")]
    if parts is not None and not all(p.lstrip("-").isdigit() for p in parts):
        what = "has an empty entry" if "" in parts else "must be integers separated by commas, e.g. 2000,1000"
        raise ConfigError(f"{option} '{text}' {what}")
    return None if parts is None else [int(p) for p in parts]


def kind_budgets(items: list[str] | None) -> tuple[tuple[str, int], ...]:
    """Return --kind-budget KIND=N items as (kind, n) pairs."""
    from relu_opt.errors import ConfigError

    pairs = []
    for item in items or []:
        kind, _, value = item.partition("=")
        n = ints(value, f"--kind-budget {item}") if value.strip() else None
        if not kind.strip() or n is None or len(n) != 1:
            raise ConfigError(f"--kind-budget '{item}' must be KIND=N, e.g. --kind-budget relu6=20000")
        pairs.append((kind.strip(), n[0]))
    return tuple(pairs)
