"""The papers' setting: ResNet-18 on CIFAR-10 (557,056 ReLUs) at 100K / 50K / 25K / 12.9K ReLUs.

Needs the python-format CIFAR-10 folder (cifar-10-batches-py) under --data-dir, and a GPU to finish in
reasonable time (--device cuda). Writes benchmarks/results/cifar_resnet18.{json,md,png} with the device
named. Resumable: rerun the same command after an interruption.

    python benchmarks/cifar_resnet18.py --data-dir ~/data --device cuda
    python benchmarks/cifar_resnet18.py --data-dir tiny --max-train 64 --baseline-epochs 1 --epochs 0.5 \\
        --budgets 50000 --out /tmp/r     # the CPU smoke test the test suite runs
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from relu_opt import atomic, count
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.reports import pareto_plot
from relu_opt.training import TrainConfig, evaluate, fit

PAPER_BUDGETS = "100000,50000,25000,12900"


def device_name(device: str) -> str:
    """Return a human name for the device the run used."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="folder holding cifar-10-batches-py")
    ap.add_argument("--budgets", default=PAPER_BUDGETS)
    ap.add_argument("--strategy", default="snl")
    ap.add_argument("--replace", default="poly")
    ap.add_argument("--granularity", default="pixel")
    ap.add_argument("--baseline-epochs", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=100, help="fine-tuning epochs per budget")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="fixed BatchNorm statistics while fine-tuning (relu-opt's default, measured for 1-epoch runs; "
        "this benchmark's long fine-tuning lets BatchNorm adapt)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    console = Console()
    data = load_dataset("cifar10", args.data_dir)
    work = args.work or args.data_dir / "relu-opt-cifar_resnet18"
    model = create_model("resnet18", num_classes=10, in_channels=3)
    base = work / f"baseline_e{args.baseline_epochs}.pt"
    if base.is_file():
        model.load_state_dict(torch.load(base, weights_only=True))
    else:
        fit(
            model,
            data,
            TrainConfig(epochs=args.baseline_epochs, lr=0.1, max_train=args.max_train, device=args.device),
            checkpoint=base.with_suffix(".ckpt"),
            resume=True,
        )
        atomic.save_torch(model.cpu().state_dict(), base)
    model.eval()
    total = count(model, data.train.x[:1]).total_relu
    base_acc = 100 * evaluate(model, data.test, device=args.device)[1]
    model.cpu()
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        cfg = OptimizeConfig(
            budget=budget,
            strategy=args.strategy,
            replace=args.replace,
            granularity=args.granularity,
            epochs=args.epochs,
            max_train=args.max_train,
            device=args.device,
            freeze_bn=args.freeze_bn,
        )
        r = optimize(model, data, cfg, work / f"budget_{budget}", base_spec="resnet18")
        rows.append(
            {
                "budget": budget,
                "relu": r.elements_after,
                "test_accuracy": round(r.accuracy_after, 2),
                "wall_s": round(r.wall_s, 1),
            }
        )
    result = {
        "device": device_name(args.device),
        "baseline": {"relu": total, "test_accuracy": round(base_acc, 2)},
        "strategy": args.strategy,
        "replace": args.replace,
        "granularity": args.granularity,
        "epochs": args.epochs,
        "baseline_epochs": args.baseline_epochs,
        "max_train": args.max_train,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "cifar_resnet18"
    atomic.write_json(stem.with_suffix(".json"), result)
    lines = [
        f"# ResNet-18 on CIFAR-10 ({result['device']})",
        "",
        f"Baseline {total:,} ReLUs, {base_acc:.2f}% test accuracy. Strategy {args.strategy}, "
        f"{args.replace} replacement, {args.granularity} granularity, {args.epochs} fine-tuning epochs.",
        "",
        "| budget | ReLUs (ONNX) | test accuracy | wall s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['budget']:,} | {r['relu']:,} | {r['test_accuracy']:.2f}% | {r['wall_s']:.0f} |" for r in rows]
    atomic.write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    pareto_plot(
        {args.strategy: [(max(r["relu"], 1), r["test_accuracy"]) for r in rows]},
        (total, base_acc),
        stem.with_suffix(".png"),
        f"ResNet-18, CIFAR-10 ({result['device']})",
    )
    table = Table("budget", "ReLUs", "test acc", "wall s", title=result["device"])
    for r in rows:
        table.add_row(f"{r['budget']:,}", f"{r['relu']:,}", f"{r['test_accuracy']:.2f}", f"{r['wall_s']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
