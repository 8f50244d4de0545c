"""Accuracy vs modeled private-inference latency: the ReLU-count selector against the latency selector.

Fashion-MNIST ResNet-20 from the shipped pretrained weights, optimized to 1/N of its ReLUs for each N in
--fractions by both selectors, and by the latency selector alone to --latency-levels x the original's
modeled WAN latency (what `optimize` and `run` try when given no budget), all with the same ranking and
fine-tuning. Each row has the test accuracy and the cost model's rounds, MB per party and LAN/WAN seconds
of one forward at batch 1. Two comparisons: pairs at the same test accuracy (within --tolerance points),
and, for each accuracy-loss limit in --limits (validation points, as a user would choose), the cheapest row
each selector reaches within it: the count selector's fewest ReLUs, the latency selector's lowest latency.
Writes benchmarks/results/latency_fashion_resnet20.{json,md,png} after every row, merging with the rows
already there (same baseline). Resumable: rerun the same command.

    python benchmarks/latency_frontier.py                        # about an hour on 2 CPU cores
    python benchmarks/latency_frontier.py --fractions 20 --epochs 0.3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
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
from relu_opt.optimizer import OptimizeConfig, modeled_latency, optimize
from relu_opt.training import evaluate

RESULTS = Path(__file__).parent / "results"
STEM = "latency_fashion_resnet20"


def run_row(model, data, args, selector: str, budget: int | None, level: float | None = None) -> dict:
    """Optimize one (selector, ReLU budget) or one latency level (a fraction of the original's modeled
    latency, latency selector) and return its row; a failed fine-tuning is a row too."""
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
    if level is not None:
        cfg = replace(cfg, latency_budget=round(level * modeled_latency(model, data.train.x[:1], cfg), 4))
    row = {"selector": selector, "budget": budget, "level": level, "strategy": args.strategy, "epochs": args.epochs}
    row["freeze_bn"] = args.freeze_bn
    try:
        r = optimize(model, data, cfg, args.work / selector / cfg.dirname, base_spec="resnet20")
    except FinetuneFailed as exc:
        return {**row, "failed": str(exc), "test_accuracy": None, "wall_s": round(time.perf_counter() - t0, 1)}
    sel = r.selection
    return {
        **row,
        "relu": r.elements_after,
        "test_accuracy": round(r.accuracy_after, 2),
        "val_accuracy": round(r.val_accuracy_after, 2),
        "sites_with_relu": sum(c["action"] != "replace" for c in sel["choices"]),
        "rounds": sel["rounds"],
        "mb_per_party": round(sel["bytes"] / 1e6, 3),
        "wan_s": round(sel["latency_s"]["wan"], 4),
        "lan_s": round(sel["latency_s"]["lan"], 4),
        "wall_s": round(r.wall_s, 1),
    }


def row_name(r: dict) -> str:
    """Return a row's constraint as a reader sees it: "14,425 ReLUs" or "0.35x latency"."""
    return f"{r['level']:g}x latency" if r.get("level") is not None else f"{r['budget']:,} ReLUs"


def _key(r: dict) -> tuple:
    return (r["selector"], r.get("budget"), r.get("level"), r["strategy"], r["epochs"], r.get("freeze_bn"))


def at_limits(rows: list[dict], baseline_val: float, limits: list[float]) -> list[dict]:
    """Return, per accuracy-loss limit (validation points), each selector's cheapest row within it: the
    count selector's fewest ReLUs, the latency selector's lowest modeled WAN latency; with the ratios."""
    ok = [r for r in rows if r.get("test_accuracy") is not None]
    out = []
    for limit in limits:
        within = [r for r in ok if baseline_val - r["val_accuracy"] <= limit + 1e-9]
        cnt = min((r for r in within if r["selector"] == "count"), key=lambda r: r["relu"], default=None)
        lat = min((r for r in within if r["selector"] == "latency"), key=lambda r: r["wan_s"], default=None)
        entry = {"limit": limit, "count": cnt and row_name(cnt), "latency": lat and row_name(lat)}
        if cnt and lat:
            entry.update(
                accuracy=[lat["test_accuracy"], cnt["test_accuracy"]],
                rounds=[lat["rounds"], cnt["rounds"]],
                fewer_rounds=round(cnt["rounds"] / max(lat["rounds"], 1), 2),
                wan_s=[lat["wan_s"], cnt["wan_s"]],
                lower_wan=lat["wan_s"] < cnt["wan_s"],
            )
        out.append(entry)
    return out


def pairs(rows: list[dict], tolerance: float) -> list[dict]:
    """Return, for each latency row, the count rows within `tolerance` points and the rounds/WAN ratios."""
    ok = [r for r in rows if r.get("test_accuracy") is not None]
    out = []
    for lat in (r for r in ok if r["selector"] == "latency"):
        for cnt in (r for r in ok if r["selector"] == "count"):
            if abs(lat["test_accuracy"] - cnt["test_accuracy"]) <= tolerance:
                out.append(
                    {
                        "latency_row": row_name(lat),
                        "count_row": row_name(cnt),
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
        f"`{a['strategy']}`, {a['epochs']} epoch(s) of distillation for every row. Baseline validation "
        f"accuracy {b.get('val_accuracy', float('nan')):.2f}%.",
        "",
        "| selector | constraint | ReLUs (ONNX) | sites with ReLUs | test acc | change | val acc | rounds | MB/party "
        "| WAN s | LAN s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("test_accuracy") is None:
            lines.append(f"| {r['selector']} | {row_name(r)} | failed: {r['failed'][:60]} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['selector']} | {row_name(r)} | {r['relu']:,} | {r['sites_with_relu']} | "
            f"{r['test_accuracy']:.2f}% | {r['test_accuracy'] - b['test_accuracy']:+.2f} | {r['val_accuracy']:.2f}% | "
            f"{r['rounds']:.0f} | {r['mb_per_party']:.1f} | {r['wan_s']:.2f} | {r['lan_s']:.3f} |"
        )
    if result.get("limits"):
        lines += [
            "",
            "At equal accuracy-loss limits (validation points below the baseline): the count selector's fewest "
            "ReLUs and the latency selector's lowest modeled WAN latency among the rows within the limit",
            "",
            "| limit | latency row | count row | test acc | rounds | fewer rounds | WAN s | lower WAN |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in result["limits"]:
            if "rounds" not in e:
                lines.append(f"| {e['limit']:g} | {e['latency'] or 'none'} | {e['count'] or 'none'} | | | | | |")
                continue
            lines.append(
                f"| {e['limit']:g} | {e['latency']} | {e['count']} | {e['accuracy'][0]:.2f} / {e['accuracy'][1]:.2f} | "
                f"{e['rounds'][0]:.0f} / {e['rounds'][1]:.0f} | {e['fewer_rounds']:.2f}x | "
                f"{e['wan_s'][0]:.2f} / {e['wan_s'][1]:.2f} | {'yes' if e['lower_wan'] else 'no'} |"
            )
    lines += ["", f"Same accuracy (within {a['tolerance']} points): latency row vs count row", ""]
    if result["pairs"]:
        lines += [
            "| rows (latency / count) | test acc | rounds | fewer rounds | WAN s | lower WAN |",
            "|---|---|---|---|---|---|",
        ]
        for p in result["pairs"]:
            lines.append(
                f"| {p['latency_row']} / {p['count_row']} | {p['accuracy'][0]:.2f} / "
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

    from relu_opt.reports import _savefig

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


def _split(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def earlier_rows(stem: Path, base: dict) -> list[dict]:
    """Return the rows an earlier invocation measured on the same baseline weights."""
    path = stem.with_suffix(".json")
    try:
        old = json.loads(path.read_text())
        rows = old["rows"] if old["baseline"].get("sha256") == base["sha256"] else []
    except (OSError, ValueError, KeyError, TypeError):
        return []
    for r in rows:  # rows from before latency levels existed
        r.setdefault("level", None)
    return rows


def baseline_cost(model, example) -> dict:
    """Return the cost model's rounds, MB and LAN/WAN seconds of the unoptimized model at batch 1."""
    from relu_opt.backends import Pricing
    from relu_opt.modeled_cost import modeled_cost

    pricing = Pricing()
    m = modeled_cost(pricing.engine().prepare(model, example[:1]), pricing.cost_model())
    return {"rounds": m.rounds, "mb_per_party": round(m.mb_per_party, 3), "wan_s": m.wan_s, "lan_s": m.lan_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="10,20", help="budgets as 1/N of the baseline ReLUs")
    ap.add_argument("--selectors", default="count,latency")
    ap.add_argument("--strategy", default="taylor")
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, the same for every row")
    ap.add_argument("--max-drop", type=float, default=None, help="validation points a row may lose (both)")
    ap.add_argument("--tolerance", type=float, default=0.3, help="points within which accuracies are equal")
    ap.add_argument(
        "--latency-levels", default="0.3,0.35", help="latency selector rows at these fractions of the original's"
    )
    ap.add_argument("--limits", default="0.5,1", help="accuracy-loss limits (validation points) to compare at")
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
    base["val_accuracy"] = round(100 * evaluate(model, data.val)[1], 2)
    base.update(baseline_cost(model, data.train.x), sha256=get_pretrained("resnet20", "fashion-mnist").sha256)
    plan = [(selector, total // int(f), None) for f in _split(args.fractions) for selector in _split(args.selectors)]
    plan += [("latency", None, float(level)) for level in _split(args.latency_levels)]
    stem = args.out / STEM
    rows = earlier_rows(stem, base)
    for i, (selector, budget, level) in enumerate(plan, 1):
        row = run_row(model, data, args, selector, budget, level)
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
        console.print(f"[{i}/{len(plan)}]", row)
        result = {
            "baseline": base,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "complete": i == len(plan),
            "rows": rows,
            "pairs": pairs(rows, args.tolerance),
            "limits": at_limits(rows, base["val_accuracy"], [float(x) for x in _split(args.limits)]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(stem.with_suffix(".json"), result)
        atomic.write_text(stem.with_suffix(".md"), markdown(result))
        plot(result, stem.with_suffix(".png"))
    table = Table("selector", "budget", "ReLUs", "sites", "test acc", "rounds", "MB", "WAN s")
    for r in rows:
        ok = r.get("test_accuracy") is not None
        table.add_row(
            r["selector"],
            row_name(r),
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
