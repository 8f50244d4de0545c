"""Accuracy vs modeled private-inference latency: the ReLU-count selector against the latency selector.

Fashion-MNIST ResNet-20 from the shipped pretrained weights, optimized to 1/N of its ReLUs for each N in
--fractions by both selectors, with the same ranking, fine-tuning and accuracy-loss limit (--max-drop).
Each row has the test accuracy and the cost model's rounds, MB per party and LAN/WAN seconds of one
forward at batch 1; pairs at the same accuracy (within --tolerance points) compare rounds and WAN latency.
Writes benchmarks/results/latency_fashion_resnet20.{json,md,png}. Resumable: rerun the same command.

    python benchmarks/latency_frontier.py                        # about an hour on 2 CPU cores
    python benchmarks/latency_frontier.py --fractions 20 --epochs 0.3   # a quick look
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

from relu_opt import atomic, count
from relu_opt.cache import cache_dir
from relu_opt.data import load_dataset
from relu_opt.finetune import FinetuneFailed
from relu_opt.models import create_model
from relu_opt.models.pretrained import get_pretrained
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.train import evaluate

RESULTS = Path(__file__).parent / "results"
STEM = "latency_fashion_resnet20"


def run_row(model, data, args, selector: str, budget: int) -> dict:
    """Optimize one (selector, budget) and return its row; a failed fine-tuning is a row too."""
    t0 = time.perf_counter()
    cfg = OptimizeConfig(
        budget=budget,
        strategy=args.strategy,
        epochs=args.epochs,
        max_drop=args.max_drop,
        selector=selector,
        seed=args.seed,
        freeze_bn=args.freeze_bn,
    )
    row = {"selector": selector, "budget": budget, "strategy": args.strategy, "epochs": args.epochs}
    row["freeze_bn"] = args.freeze_bn
    try:
        r = optimize(model, data, cfg, args.work / selector / f"budget_{budget}", base_spec="resnet20")
    except FinetuneFailed as exc:
        return {**row, "failed": str(exc), "test_accuracy": None, "wall_s": round(time.perf_counter() - t0, 1)}
    sel = r.selection
    return {
        **row,
        "relu": r.relu_after,
        "test_accuracy": round(r.accuracy_after, 2),
        "val_accuracy": round(r.val_accuracy_after, 2),
        "sites_with_relu": sum(c["action"] != "replace" for c in sel["choices"]),
        "rounds": sel["rounds"],
        "mb_per_party": round(sel["bytes"] / 1e6, 3),
        "wan_s": round(sel["latency_s"]["wan"], 4),
        "lan_s": round(sel["latency_s"]["lan"], 4),
        "wall_s": round(r.wall_s, 1),
    }


def pairs(rows: list[dict], tolerance: float) -> list[dict]:
    """Return, for each latency row, the count rows within `tolerance` points and the rounds/WAN ratios."""
    ok = [r for r in rows if r.get("test_accuracy") is not None]
    out = []
    for lat in (r for r in ok if r["selector"] == "latency"):
        for cnt in (r for r in ok if r["selector"] == "count"):
            if abs(lat["test_accuracy"] - cnt["test_accuracy"]) <= tolerance:
                out.append(
                    {
                        "latency_budget": lat["budget"],
                        "count_budget": cnt["budget"],
                        "accuracy": [lat["test_accuracy"], cnt["test_accuracy"]],
                        "rounds": [lat["rounds"], cnt["rounds"]],
                        "fewer_rounds": round(cnt["rounds"] / max(lat["rounds"], 1), 2),
                        "wan_s": [lat["wan_s"], cnt["wan_s"]],
                        "lower_wan": lat["wan_s"] < cnt["wan_s"],
                    }
                )
    return out


def markdown(result: dict) -> str:
    """Return the rows and the same-accuracy comparisons as Markdown."""
    b, a = result["baseline"], result["args"]
    lines = [
        "# Accuracy vs modeled latency: ResNet-20 on Fashion-MNIST",
        "",
        f"Baseline: {b['relu']:,} ReLUs, {b['test_accuracy']:.2f}% test, {b['rounds']:.0f} rounds, "
        f"{b['mb_per_party']:.1f} MB per party, WAN {b['wan_s']:.2f} s (modeled, batch 1). Ranking "
        f"`{a['strategy']}`, {a['epochs']} epoch(s) of distillation, accuracy-loss limit "
        f"{a['max_drop'] if a['max_drop'] is not None else 'none'} for both selectors.",
        "",
        "| selector | budget | ReLUs (ONNX) | sites with ReLUs | test acc | change | rounds | MB/party | WAN s"
        " | LAN s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("test_accuracy") is None:
            lines.append(f"| {r['selector']} | {r['budget']:,} | failed: {r['failed'][:60]} | | | | | | | |")
            continue
        lines.append(
            f"| {r['selector']} | {r['budget']:,} | {r['relu']:,} | {r['sites_with_relu']} | "
            f"{r['test_accuracy']:.2f}% | {r['test_accuracy'] - b['test_accuracy']:+.2f} | {r['rounds']:.0f} | "
            f"{r['mb_per_party']:.1f} | {r['wan_s']:.2f} | {r['lan_s']:.3f} |"
        )
    lines += ["", f"Same accuracy (within {a['tolerance']} points): latency row vs count row", ""]
    if result["pairs"]:
        lines += [
            "| budgets (latency / count) | test acc | rounds | fewer rounds | WAN s | lower WAN |",
            "|---|---|---|---|---|---|",
        ]
        for p in result["pairs"]:
            lines.append(
                f"| {p['latency_budget']:,} / {p['count_budget']:,} | {p['accuracy'][0]:.2f} / "
                f"{p['accuracy'][1]:.2f} | {p['rounds'][0]:.0f} / {p['rounds'][1]:.0f} | {p['fewer_rounds']:.2f}x | "
                f"{p['wan_s'][0]:.2f} / {p['wan_s'][1]:.2f} | {'yes' if p['lower_wan'] else 'no'} |"
            )
    else:
        lines.append("No pair of rows lands within the tolerance.")
    m = result["machine"]
    lines += ["", f"Measured on {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Accuracy against modeled WAN seconds and against rounds, one series per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relu_opt.report import _savefig

    b = result["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "wan_s", "modeled WAN seconds (batch 1)"), (axes[1], "rounds", "rounds")):
        for selector in ("count", "latency"):
            pts = sorted(
                (r[key], r["test_accuracy"])
                for r in result["rows"]
                if r["selector"] == selector and r.get("test_accuracy") is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{selector} selector")
        ax.scatter([b[key]], [b["test_accuracy"]], marker="*", s=150, color="black", label="baseline", zorder=5)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ResNet-20, Fashion-MNIST: accuracy vs private-inference cost")
    _savefig(fig, path)
    plt.close(fig)


def baseline_cost(model, example) -> dict:
    """Return the cost model's rounds, MB and LAN/WAN seconds of the unoptimized model at batch 1."""
    from relu_opt.crypto_backend.cost_calibration import calibrate
    from relu_opt.crypto_backend.modeled_cost import modeled_cost
    from relu_opt.passes.pi import prepare_for_pi

    m = modeled_cost(prepare_for_pi(model, example[:1]), calibrate())
    return {"rounds": m.rounds, "mb_per_party": round(m.mb_per_party, 3), "wan_s": m.wan_s, "lan_s": m.lan_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="10,20", help="budgets as 1/N of the baseline ReLUs")
    ap.add_argument("--selectors", default="count,latency")
    ap.add_argument("--strategy", default="taylor")
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, the same for every row")
    ap.add_argument("--max-drop", type=float, default=None, help="validation points a row may lose (both)")
    ap.add_argument("--tolerance", type=float, default=0.3, help="points within which accuracies are equal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorm in eval mode while fine-tuning (with most sites polynomial, one exploding batch "
        "pushed a running variance to 3e11 and validation to 11%% in a pilot)",
    )
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench" / STEM)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    data = load_dataset("fashion-mnist")
    model = create_model("resnet20", pretrained="fashion-mnist").eval()
    total = count(model, data.train.x[:1]).total_relu
    base = {"relu": total, "test_accuracy": round(100 * evaluate(model, data.test)[1], 2)}
    base.update(baseline_cost(model, data.train.x), sha256=get_pretrained("resnet20", "fashion-mnist").sha256)
    rows = []
    for f in args.fractions.split(","):
        for selector in args.selectors.split(","):
            rows.append(run_row(model, data, args, selector, total // int(f)))
            console.print(rows[-1])
    result = {
        "baseline": base,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "pairs": pairs(rows, args.tolerance),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / STEM
    atomic.write_json(stem.with_suffix(".json"), result)
    atomic.write_text(stem.with_suffix(".md"), markdown(result))
    plot(result, stem.with_suffix(".png"))
    table = Table("selector", "budget", "ReLUs", "sites", "test acc", "rounds", "MB", "WAN s")
    for r in rows:
        ok = r.get("test_accuracy") is not None
        table.add_row(
            r["selector"],
            f"{r['budget']:,}",
            f"{r['relu']:,}" if ok else "-",
            str(r.get("sites_with_relu", "-")),
            f"{r['test_accuracy']:.2f}" if ok else "failed",
            f"{r['rounds']:.0f}" if ok else "-",
            f"{r['mb_per_party']:.1f}" if ok else "-",
            f"{r['wan_s']:.2f}" if ok else "-",
        )
    console.print(table)
    console.print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
