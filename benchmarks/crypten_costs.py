"""Encrypted cost of original, optimized and linear-floor models under CrypTen (2 parties, localhost).

Writes benchmarks/results/crypten_costs.{json,md}. Models:
- ResNet-18 (CIFAR variant, random weights, batch 1): the issue's reference figures;
- ResNet-20 on Fashion-MNIST: the pareto.py baseline vs its optimized model at 1/20 of the ReLUs
  (taylor, poly, channel), on 8 real test images with labels.
Run benchmarks/pareto.py first for the second part; it is skipped when that folder is missing.

    python benchmarks/crypten_costs.py
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from rich.console import Console

from relu_opt import atomic, load
from relu_opt.backends import Pricing
from relu_opt.cache import cache_dir
from relu_opt.data import load_dataset
from relu_opt.encrypted import bench
from relu_opt.models import create_model
from relu_opt.pipeline import versions

CACHE = cache_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--optimized",
        type=Path,
        default=CACHE / "bench" / "pareto_fashion_resnet20" / "taylor_poly_channel" / "budget_7212",
    )
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    console = Console()
    pricing = Pricing()
    cost = pricing.cost_model()
    results = {
        "parties": 2,
        "priced_by": pricing.describe(),
        "cost_model": cost.to_dict(),
        "versions": versions(pricing),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "benches": {},
    }

    console.print("ResNet-18, random weights, batch 1")
    torch.manual_seed(0)
    r18 = bench(create_model("resnet18").eval(), torch.randn(1, 3, 32, 32), runs=args.runs, cost_model=cost)
    results["benches"]["resnet18_cifar_batch1"] = r18.to_dict()

    base = CACHE / "baselines" / "resnet20_fashion-mnist.pt"
    if base.is_file() and (args.optimized / "plan.json").is_file():
        console.print(f"ResNet-20 Fashion-MNIST vs {args.optimized}")
        data = load_dataset("fashion-mnist")
        model = create_model("resnet20", in_channels=1)
        model.load_state_dict(torch.load(base, weights_only=True))
        test = data.test.subset(args.samples)
        r20 = bench(model.eval(), test.x, test.y, optimized=load(args.optimized), runs=args.runs, cost_model=cost)
        results["benches"]["resnet20_fashion"] = r20.to_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "crypten_costs.json", results)
    atomic.write_text(args.out / "crypten_costs.md", markdown(results))
    console.print(markdown(results))


def markdown(results: dict) -> str:
    """Return the measured tables as Markdown."""
    lines = ["# Encrypted inference cost (CrypTen 0.4.1, 2 parties on localhost)", ""]
    for name, b in results["benches"].items():
        lines += [
            f"## {name} (batch {b['batch']})",
            "",
            "| model | ReLUs/sample | rounds | MB/party | wall s | LAN s | WAN s | predicted rounds | "
            "top-1 agree | enc. acc |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in b["models"]:
            acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.0f}%"
            lines.append(
                f"| {m['name']} | {m['relu_elements']:,} | {m['rounds']} | {max(m['bytes_per_party']) / 1e6:.1f} | "
                f"{m['wall_s_median']:.2f} | {m['lan_s']:.2f} | {m['wan_s']:.2f} | {m['predicted_rounds']:.0f} | "
                f"{m['top1_agreement']:.2f} | {acc} |"
            )
        for other, ratio in b["ratios"].items():
            lines.append(
                f"\n{other} / original: rounds x{ratio['rounds']:.2f}, bytes x{ratio['bytes_per_party']:.2f},"
                f" WAN latency x{ratio['wan_s']:.2f}"
            )
        lines.append("")
    m = results["machine"]
    lines.append(
        f"Measured on {m['cpus']} CPU cores ({m['platform']}); latency = measured compute + round trips x RTT "
        "+ bytes sent one way / bandwidth per direction (LAN 0.5 ms, 1 GB/s; WAN 40 ms, 100 MB/s)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
