"""Accuracy vs ReLUs for every ranking strategy on Fashion-MNIST ResNet-20 (1x28x28).

Starts from the shipped pretrained ResNet-20 (`--baseline pretrained`, the default; `--baseline train`
trains one for --baseline-epochs instead), optimizes it to 1/N of its ReLUs for each N in --fractions with
each strategy, seed and the same fine-tuning, and writes benchmarks/results/pareto_fashion_resnet20.{json,md,
png}. A row whose fine-tuning fails (diverges on every retry, or drops more than --max-drop) is recorded as
failed, not dropped. Every run is resumable: rerun the same command after an interruption.

    python benchmarks/pareto.py                 # hours on 2 CPU cores
    python benchmarks/pareto.py --epochs 0.2 --strategies taylor,random   # a quick look
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

from relu_opt import atomic
from relu_opt.cache import cache_dir
from relu_opt.data import load_dataset
from relu_opt.errors import ExportError
from relu_opt.finetune import FinetuneFailed
from relu_opt.models import create_model
from relu_opt.models.pretrained import get_pretrained
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.reports import pareto_plot
from relu_opt.training import TrainConfig, evaluate, fit

RESULTS = Path(__file__).parent / "results"
CACHE = cache_dir()


def baseline(data, epochs: int, console: Console, source: str = "pretrained"):
    """Return the baseline ResNet-20 (shipped, or trained and cached) and its test accuracy in percent."""
    if source == "pretrained":
        model = create_model("resnet20", pretrained="fashion-mnist")
        return model.eval(), 100 * evaluate(model, data.test)[1]
    path = CACHE / "baselines" / f"resnet20_fashion-mnist_e{epochs}.pt"
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
    ap.add_argument("--fractions", default="5,20,100,300,1000", help="budgets as 1/N of the baseline ReLUs")
    ap.add_argument("--seeds", default="0", help="seeds per row, comma separated (the spread goes in the results)")
    ap.add_argument("--baseline", choices=("pretrained", "train"), default="pretrained")
    ap.add_argument("--max-drop", type=float, default=None, help="validation points a row may lose")
    ap.add_argument("--replace", default="poly")
    ap.add_argument("--granularity", default="channel", help="comma separated: channel,pixel,site")
    ap.add_argument(
        "--selector", default="count", help="count: accuracy vs ReLUs as the papers count them; latency: priced"
    )
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, the same for every run")
    ap.add_argument(
        "--snl-samples",
        type=int,
        default=0,
        help="training images snl trains masks and weights on (0: the whole training split, as SNL does)",
    )
    ap.add_argument(
        "--range-weight",
        type=float,
        default=0.0,
        help="fine-tuning loss weight of polynomial inputs past their fitted range (OptimizeConfig.range_weight)",
    )
    ap.add_argument("--snl-epochs", type=float, default=1.0, help="epochs of snl's joint mask and weight training")
    ap.add_argument("--baseline-epochs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=CACHE / "bench" / "pareto_fashion_resnet20")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the JSON, Markdown and plot from the rows measured"
    )
    args = ap.parse_args()
    console = Console()
    if args.report_only:
        rewrite(args.out / "pareto_fashion_resnet20", console)
        return
    data = load_dataset("fashion-mnist")
    model, base_acc = baseline(data, args.baseline_epochs, console, args.baseline)
    from relu_opt import count

    total = count(model, data.train.x[:1]).total_relu
    budgets = [total // int(f) for f in args.fractions.split(",")]
    baseline_info = {"relu": total, "test_accuracy": round(base_acc, 2), "epochs": args.baseline_epochs}
    if args.baseline == "pretrained":
        rec = get_pretrained("resnet20", "fashion-mnist")
        baseline_info.update(epochs=None, source="pretrained", command=rec.command, sha256=rec.sha256)
    plan = [
        (granularity, strategy, budget, seed)
        for granularity in args.granularity.split(",")
        for strategy in args.strategies.split(",")
        for budget in budgets
        for seed in (int(x) for x in args.seeds.split(","))
    ]
    stem = args.out / "pareto_fashion_resnet20"
    rows = earlier_rows(stem, baseline_info)
    for i, (granularity, strategy, budget, seed) in enumerate(plan, 1):
        row = run_row(model, data, args, strategy, granularity, budget, seed)
        rows = [r for r in rows if _row_key(r) != _row_key(row)] + [row]
        console.print(f"[{i}/{len(plan)}]", row)
        # written after every row, so an interrupted benchmark still leaves what it measured
        write_results(stem, baseline_info, rows, total, base_acc, complete=i == len(plan))
    table = Table("strategy", "budget", "seed", "ReLUs", "fewer", "test acc", "change", "wall s")
    for row in rows:
        acc = row["test_accuracy"]
        table.add_row(
            row["strategy"],
            f"{row['budget']:,}",
            str(row["seed"]),
            f"{row['relu']:,}",
            f"{total / max(row['relu'], 1):.0f}x",
            "failed" if acc is None else f"{acc:.2f}",
            "-" if acc is None else f"{acc - base_acc:+.2f}",
            f"{row['wall_s']:.0f}",
        )
    console.print(table)
    console.print(f"wrote {stem}.json, .md and .png")


def rewrite(stem: Path, console: Console) -> None:
    """Write the JSON, Markdown and plot again from the rows in the JSON (after the report's format changed)."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; run the benchmark first")
    old = json.loads(path.read_text())
    b = old["baseline"]
    write_results(stem, b, old["rows"], b["relu"], b["test_accuracy"], old["complete"], old.get("machine"))
    console.print(f"rewrote {stem}.json, .md and .png from {len(old['rows'])} rows")


def _row_key(row: dict) -> tuple:
    return (
        row["strategy"],
        row["replace"],
        row["granularity"],
        row["budget"],
        row.get("seed", 0),
        row.get("selector", "count"),
        row["epochs"],
        row.get("rank_samples"),
        row.get("rank_epochs"),
        row.get("range_weight", 0.0),
    )


def earlier_rows(stem: Path, baseline_info: dict) -> list[dict]:
    """Return the rows an earlier invocation measured on the same baseline (other settings are merged in)."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
        same = (
            old["baseline"].get("sha256") == baseline_info.get("sha256")
            and old["baseline"]["relu"] == (baseline_info["relu"])
        )
        return list(old["rows"]) if same else []
    except (ValueError, KeyError, TypeError):
        return []


def write_results(
    stem: Path,
    baseline_info: dict,
    rows: list[dict],
    total: int,
    base_acc: float,
    complete: bool,
    machine: dict | None = None,
):
    """Write the JSON, Markdown and plot for the rows measured so far; `complete` says whether all are in."""
    result = {
        "baseline": baseline_info,
        "complete": complete,
        "rows": rows,
        "spread": seed_spread(rows),
        "versus_random": versus_random(rows),
        "machine": machine or {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stem.with_suffix(".json"), result)
    atomic.write_text(stem.with_suffix(".md"), markdown(result))
    series: dict[str, list] = {}
    for row in rows:
        if row["test_accuracy"] is not None:
            label = f"{row['strategy']} ({row['granularity']})"
            series.setdefault(label, []).append((max(row["relu"], 1), row["test_accuracy"]))
    pareto_plot(series, (total, base_acc), stem.with_suffix(".png"), "ResNet-20, Fashion-MNIST")


def run_row(model, data, args, strategy: str, granularity: str, budget: int, seed: int) -> dict:
    """Optimize one (strategy, budget, seed) and return its row; a failed fine-tuning is a row too."""
    t0 = time.perf_counter()
    cfg = OptimizeConfig(
        budget=budget,
        strategy=strategy,
        replace=args.replace,
        granularity=granularity,
        epochs=args.epochs,
        seed=seed,
        max_drop=args.max_drop,
        selector=args.selector,
        range_weight=args.range_weight,
    )
    row = {"strategy": strategy, "replace": args.replace, "granularity": granularity, "budget": budget}
    row.update(seed=seed, epochs=args.epochs, selector=args.selector)
    if args.range_weight:
        row.update(range_weight=args.range_weight)
    if strategy == "snl":  # SNL trains masks and weights together on the training split before fine-tuning
        cfg = replace(cfg, rank_samples=args.snl_samples or len(data.train), rank_epochs=args.snl_epochs)
        row.update(rank_samples=cfg.rank_samples, rank_epochs=cfg.rank_epochs)
    suffix = (f"_seed{seed}" if seed else "") + ("" if args.selector == "count" else f"_{args.selector}")
    suffix += f"_range{args.range_weight:g}" if args.range_weight else ""
    try:
        r = optimize(
            model,
            data,
            cfg,
            args.work / f"{strategy}_{args.replace}_{granularity}{suffix}" / f"budget_{budget}",
            base_spec="resnet20",
        )
    except (FinetuneFailed, ExportError) as exc:  # a row that fails is a result too, not a crash
        return {
            **row,
            "relu": budget,
            "test_accuracy": None,
            "val_accuracy": None,
            "failed": str(exc),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    attempts = r.finetune.get("attempts", [])
    return {
        **row,
        "relu": r.elements_after,
        "test_accuracy": round(r.accuracy_after, 2),
        "val_accuracy": round(r.val_accuracy_after, 2),
        "finetune_attempts": len(attempts),
        "finetune_failures": [a["failure"] for a in attempts if a["failure"]],
        "wall_s": round(r.wall_s, 1),
        "wall_s_this_call": round(time.perf_counter() - t0, 1),
    }


def seed_spread(rows: list[dict]) -> list[dict]:
    """Return min, max and mean test accuracy per (strategy, budget) run with more than one seed."""
    out = []
    for (strategy, granularity, budget, *_), rs in _by_setting(rows).items():
        if len(rs) < 2:
            continue
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        out.append(
            {
                "strategy": strategy,
                "granularity": granularity,
                "budget": budget,
                "seeds": len(rs),
                "failed": len(rs) - len(accs),
                "retried": sum(r.get("finetune_attempts", 1) > 1 for r in rs),
                "min": min(accs) if accs else None,
                "max": max(accs) if accs else None,
                "mean": round(sum(accs) / len(accs), 2) if accs else None,
            }
        )
    return out


def _by_setting(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Group count-selector rows that differ only in seed (latency-selector rows are left out)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("selector", "count") == "count":
            key = (r["strategy"], r["granularity"], r["budget"], r["epochs"], r.get("range_weight", 0.0))
            groups.setdefault(key, []).append(r)
    return groups


def versus_random(rows: list[dict]) -> list[dict]:
    """Return each strategy's accuracy beside random's at the same setting: seed 0, and the seed means."""

    def key(r):
        return (r["granularity"], r["budget"], r["epochs"], r.get("selector", "count"), r.get("range_weight", 0.0))

    random = {key(r): r["test_accuracy"] for r in rows if r["strategy"] == "random" and r.get("seed", 0) == 0}
    means = {(s["strategy"], s["granularity"], s["budget"]): s for s in seed_spread(rows)}
    out = []
    for r in rows:
        ref = random.get(key(r))
        if r["strategy"] == "random" or r.get("seed", 0) != 0 or ref is None or r["test_accuracy"] is None:
            continue
        entry = {
            "strategy": r["strategy"],
            "granularity": r["granularity"],
            "budget": r["budget"],
            "accuracy": r["test_accuracy"],
            "random": ref,
            "difference": round(r["test_accuracy"] - ref, 2),
        }
        mine = means.get((r["strategy"], r["granularity"], r["budget"]))
        theirs = means.get(("random", r["granularity"], r["budget"]))
        if r.get("selector", "count") == "count" and mine and theirs and None not in (mine["mean"], theirs["mean"]):
            entry.update(
                mean=mine["mean"],
                random_mean=theirs["mean"],
                mean_difference=round(mine["mean"] - theirs["mean"], 2),
                seeds=[mine["seeds"] - mine["failed"], theirs["seeds"] - theirs["failed"]],
            )
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    """Return the results table with the issue's targets checked per row."""
    b = result["baseline"]
    source = "shipped pretrained weights" if b.get("source") == "pretrained" else f"{b['epochs']} epochs"
    lines = [
        "# Accuracy vs ReLUs: ResNet-20 on Fashion-MNIST",
        "",
        f"Baseline: {b['relu']:,} ReLUs, {b['test_accuracy']:.2f}% test accuracy "
        f"({source}). "
        "Replacement, granularity and fine-tuning epochs (distillation from the baseline) as listed; ReLUs "
        "counted on the exported ONNX graph. Targets: >=20x fewer ReLUs within 0.5 points, >=100x within 1 point. "
        "attempts: fine-tuning attempts the row needed (a failed attempt is rolled back to its last good epoch, "
        "or the start when none was good, and goes on at 0.3x the learning rate; rows measured before "
        "2026-12-01 restarted from the start; the JSON's finetune_failures says why, where recorded). "
        "snl rows first train masks and weights together (images and epochs in the JSON's rank_samples and "
        "rank_epochs); their fine-tuning starts from those weights."
        + ("" if result.get("complete", True) else " **Incomplete: the benchmark is still running or was stopped.**"),
        "",
        "| strategy | replace | granularity | epochs | budget | seed | ReLUs | fewer | test acc | change | target "
        "| wall s | attempts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fold = b["relu"] / max(r["relu"], 1)
        if r["test_accuracy"] is None:
            acc, change, target = "failed", "-", "-"
        else:
            drop = b["test_accuracy"] - r["test_accuracy"]
            acc, change, target = f"{r['test_accuracy']:.2f}%", f"{-drop:+.2f}", "-"
            if fold >= 100:
                target = "met (100x, <=1)" if drop <= 1 else "missed (100x, <=1)"
            elif fold >= 20:
                target = "met (20x, <=0.5)" if drop <= 0.5 else "missed (20x, <=0.5)"
        lines.append(
            f"| {r['strategy']} | {r['replace']} | {r['granularity']} | {r['epochs']:g} | {r['budget']:,} | "
            f"{r.get('seed', 0)} | "
            f"{r['relu']:,} | {fold:.0f}x | {acc} | {change} | {target} | {r['wall_s']:.0f} | "
            f"{r.get('finetune_attempts', '-')} |"
        )
    spread = seed_spread(result["rows"])
    if spread:
        lines += ["", "Spread over seeds (rows run with more than one seed):", ""]
        lines += [
            "| strategy | budget | seeds | failed | retried | min | max | mean | spread |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in spread:
            lo, hi = s["min"], s["max"]
            lines.append(
                f"| {s['strategy']} | {s['budget']:,} | {s['seeds']} | {s['failed']} | {s.get('retried', 0)} | "
                + (
                    f"{lo:.2f}% | {hi:.2f}% | {s['mean']:.2f}% | {hi - lo:.2f} |"
                    if lo is not None
                    else "- | - | - | - |"
                )
            )
    versus = versus_random(result["rows"])
    if versus:
        lines += [
            "",
            "Each strategy against random (same granularity, budget, epochs): seed 0, and the means over the "
            "seeds both were run with (successful runs counted as strategy/random):",
            "",
        ]
        lines += [
            "| strategy | granularity | budget | accuracy | random | difference | mean | random mean | "
            "mean difference | runs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in versus:
            mean = (
                f"{v['mean']:.2f}% | {v['random_mean']:.2f}% | {v['mean_difference']:+.2f} | "
                f"{v['seeds'][0]}/{v['seeds'][1]} |"
                if "mean" in v
                else "- | - | - | - |"
            )
            lines.append(
                f"| {v['strategy']} | {v['granularity']} | {v['budget']:,} | {v['accuracy']:.2f}% | "
                f"{v['random']:.2f}% | {v['difference']:+.2f} | {mean}"
            )
    m = result["machine"]
    lines += ["", f"Measured on {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
