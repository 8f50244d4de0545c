"""Epoch time of data-parallel training on 1, 2, ... processes, side by side with the accuracy each reached.

Each row is the real command, `relu-opt train MODEL --nproc N` (relu_opt.distributed: DistributedDataParallel
over gloo on CPU, NCCL with --device cuda, one GPU per process), with the same seed and global batch; the epoch
time is what training recorded per epoch (start-up, data loading and the final test are in the wall column).
Writes benchmarks/results/distributed_epochs.{json,md} with the machine named.

    python benchmarks/distributed_epochs.py                        # ResNet-20, Fashion-MNIST, 1 and 2 CPU processes
    python benchmarks/distributed_epochs.py --model resnet18 --data cifar10 --data-dir ~/data --device cuda \\
        --nprocs 1,2,4 --input-shape 1,3,32,32
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from relu_opt import atomic


def device_name(device: str) -> str:
    """Return a human name for the device the rows ran on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def measure(args: argparse.Namespace, nproc: int, work: Path) -> dict:
    """Return one row: train with `nproc` processes and read the epoch times from its checkpoint."""
    out = work / f"w{nproc}.pt"
    cmd = [sys.executable, "-m", "relu_opt", "train", args.model, "-o", str(out), "--data", args.data]
    cmd += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device]
    cmd += ["--seed", str(args.seed), "--nproc", str(nproc)]
    for opt in ("data_dir", "max_train", "input_shape"):
        if getattr(args, opt) is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    history = torch.load(out.with_name(out.name + ".ckpt"), weights_only=True)["history"]
    test = re.search(r"test accuracy ([\d.]+)%", r.stdout)
    seconds = [h["seconds"] for h in history]
    return {
        "processes": nproc,
        "epoch_s": seconds,
        "epoch_s_mean": sum(seconds) / len(seconds),
        "val_accuracy": 100 * history[-1]["val_acc"],
        "test_accuracy": float(test.group(1)) if test else None,
        "train_loss": history[-1]["train_loss"],
        "wall_s": wall,
        "command": " ".join(cmd[1:]).replace(str(work), "TMP"),
    }


def markdown(result: dict) -> str:
    """Return the results as a markdown page."""
    rows = result["rows"]
    base = rows[0]["epoch_s_mean"]
    lines = [
        "# Data-parallel training: epoch time by process count",
        "",
        f"`python benchmarks/distributed_epochs.py {result['argv']}` on {result['device']}, torch "
        f"{result['torch']}: {result['model']} on {result['data']}, {result['epochs']} epoch(s), global batch "
        f"{result['batch_size']}, seed {result['seed']}. Each row is `relu-opt train ... --nproc N`: the same "
        "global batches split over N processes (DDP); the epoch time is training's own record.",
        "",
        "| processes | epoch s | vs 1 process | val acc | test acc | train loss | wall s (with start-up) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = "" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2f}%"
        lines.append(
            f"| {r['processes']} | {r['epoch_s_mean']:.1f} | x{r['epoch_s_mean'] / base:.2f} | "
            f"{r['val_accuracy']:.2f}% | {test} | {r['train_loss']:.4f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--input-shape", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--nprocs", default="1,2", help="process counts, e.g. 1,2,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    counts = [int(n) for n in args.nprocs.split(",")]
    with tempfile.TemporaryDirectory(prefix="relu-opt-ddp-") as work:
        rows = [measure(args, n, Path(work)) for n in counts]
    result = {
        "argv": " ".join(sys.argv[1:]),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "model": args.model,
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "rows": rows,
    }
    atomic.write_json(args.out / "distributed_epochs.json", result)
    atomic.write_text(args.out / "distributed_epochs.md", markdown(result))
    table = Table("processes", "epoch s", "val acc", "test acc", "wall s")
    for r in rows:
        test = "" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2f}%"
        table.add_row(
            str(r["processes"]), f"{r['epoch_s_mean']:.1f}", f"{r['val_accuracy']:.2f}%", test, f"{r['wall_s']:.1f}"
        )
    Console().print(table)
    print(f"wrote {args.out / 'distributed_epochs.md'}")


if __name__ == "__main__":
    main()
