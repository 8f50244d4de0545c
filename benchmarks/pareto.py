"""Accuracy vs ReLUs for every ranking strategy on Fashion-MNIST ResNet-20 (1x28x28).

Trains (or loads the cached) baseline, optimizes it to 1/5, 1/20 and 1/100 of its ReLUs with each
strategy and the same fine-tuning, and writes benchmarks/results/pareto_fashion_resnet20.{json,md,png}.
Every run is resumable: rerun the same command after an interruption.

    python benchmarks/pareto.py                 # about an hour on 2 CPU cores
    python benchmarks/pareto.py --epochs 0.2 --strategies taylor,random   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from relu_opt import atomic
from relu_opt.cache import cache_dir
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.report import pareto_plot
from relu_opt.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).parent / "results"
CACHE = cache_dir()


def baseline(data, epochs: int, console: Console):
    """Return the trained ResNet-20 (cached under the cache dir) and its test accuracy in percent."""
    path = CACHE / "baselines" / "resnet20_fashion-mnist.pt"
    model = create_model("resnet20", num_classes=10, in_channels=1)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        console.print(f"training the baseline for {epochs} epochs (cached at {path})")
        fit(
            model,
            data,
            TrainConfig(epochs=epochs, lr=0.05),
            checkpoint=path.with_name(path.name + ".ckpt"),
            resume=True,
        )
        atomic.save_torch(model.state_dict(), path)
    return model.eval(), 100 * evaluate(model, data.test)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="taylor,drop-one,snl,random")
    ap.add_argument("--fractions", default="5,20,100", help="budgets as 1/N of the baseline ReLUs")
    ap.add_argument("--replace", default="poly")
    ap.add_argument("--granularity", default="channel")
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, the same for every run")
    ap.add_argument("--baseline-epochs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=CACHE / "bench" / "pareto_fashion_resnet20")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    data = load_dataset("fashion-mnist")
    model, base_acc = baseline(data, args.baseline_epochs, console)
    from relu_opt import count

    total = count(model, data.train.x[:1]).total_relu
    budgets = [total // int(f) for f in args.fractions.split(",")]
    rows = []
    for strategy in args.strategies.split(","):
        for budget in budgets:
            t0 = time.perf_counter()
            cfg = OptimizeConfig(
                budget=budget, strategy=strategy, replace=args.replace, granularity=args.granularity, epochs=args.epochs
            )
            r = optimize(
                model,
                data,
                cfg,
                args.work / f"{strategy}_{args.replace}_{args.granularity}" / f"budget_{budget}",
                base_spec="resnet20",
            )
            rows.append(
                {
                    "strategy": strategy,
                    "replace": args.replace,
                    "granularity": args.granularity,
                    "budget": budget,
                    "relu": r.relu_after,
                    "test_accuracy": round(r.accuracy_after, 2),
                    "val_accuracy": round(r.val_accuracy_after, 2),
                    "wall_s": round(r.wall_s, 1),
                    "wall_s_this_call": round(time.perf_counter() - t0, 1),
                    "epochs": args.epochs,
                }
            )
            console.print(rows[-1])
    result = {
        "baseline": {"relu": total, "test_accuracy": round(base_acc, 2), "epochs": args.baseline_epochs},
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "pareto_fashion_resnet20"
    atomic.write_json(stem.with_suffix(".json"), result)
    atomic.write_text(stem.with_suffix(".md"), markdown(result))
    series: dict[str, list] = {}
    for row in rows:
        series.setdefault(row["strategy"], []).append((max(row["relu"], 1), row["test_accuracy"]))
    pareto_plot(series, (total, base_acc), stem.with_suffix(".png"), "ResNet-20, Fashion-MNIST")
    table = Table("strategy", "budget", "ReLUs", "fewer", "test acc", "change", "wall s")
    for row in rows:
        table.add_row(
            row["strategy"],
            f"{row['budget']:,}",
            f"{row['relu']:,}",
            f"{total / max(row['relu'], 1):.0f}x",
            f"{row['test_accuracy']:.2f}",
            f"{row['test_accuracy'] - base_acc:+.2f}",
            f"{row['wall_s']:.0f}",
        )
    console.print(table)
    console.print(f"wrote {stem}.json, .md and .png")


def markdown(result: dict) -> str:
    """Return the results table with the issue's targets checked per row."""
    b = result["baseline"]
    lines = [
        "# Accuracy vs ReLUs: ResNet-20 on Fashion-MNIST",
        "",
        f"Baseline: {b['relu']:,} ReLUs, {b['test_accuracy']:.2f}% test accuracy ({b['epochs']} epochs). "
        "Replacement and granularity as listed; ReLUs counted on the exported ONNX graph; the same "
        f"fine-tuning ({result['rows'][0]['epochs'] if result['rows'] else '?'} epochs of distillation) for "
        "every row. Targets: >=20x fewer ReLUs within 0.5 points, >=100x within 2 points.",
        "",
        "| strategy | replace | granularity | budget | ReLUs | fewer | test acc | change | target | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fold = b["relu"] / max(r["relu"], 1)
        drop = b["test_accuracy"] - r["test_accuracy"]
        target = "-"
        if fold >= 100:
            target = "met (100x, <=2)" if drop <= 2 else "missed (100x, <=2)"
        elif fold >= 20:
            target = "met (20x, <=0.5)" if drop <= 0.5 else "missed (20x, <=0.5)"
        lines.append(
            f"| {r['strategy']} | {r['replace']} | {r['granularity']} | {r['budget']:,} | {r['relu']:,} | "
            f"{fold:.0f}x | {r['test_accuracy']:.2f}% | {-drop:+.2f} | {target} | {r['wall_s']:.0f} |"
        )
    m = result["machine"]
    lines += ["", f"Measured on {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
