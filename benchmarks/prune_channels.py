"""ReLU-only optimization against ReLU + structure (channels and residual branches, `--prune channels`) on the
shipped ResNet-20 (Fashion-MNIST), under CrypTen and under SPU's Cheetah: test accuracy against modeled and
measured bytes, send actions and time, with two real parties per bench, and one figure per backend.

    python benchmarks/prune_channels.py [--samples 2] [--epochs E] [--backends CrypTen,Cheetah] [--work DIR]

Each backend is optimized twice with the no-budget search (the lowest modeled latency within --max-drop, 1
point of validation accuracy), once with --prune none and once with --prune channels, on the network given
per backend (Cheetah: a bandwidth-bound link, where its bytes decide; CrypTen: the WAN). Optimizations are
kept in --work, so a rerun resumes. Writes OUT.md, OUT.json and OUT_<backend>.png and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import relu_opt as ro

# backend -> (pricing, fine-tuning per search level): a pruned ResNet-20 relearns more than one whose ReLUs
# became polynomials, and its epochs are shorter
BACKENDS = {
    "CrypTen": (ro.Pricing(backend="crypten", network="wan"), {"epochs": 1.0, "lr": 0.01}),
    "Cheetah": (ro.Pricing(backend="spu", protocol="cheetah", network="0.1,10"), {"epochs": 6.0, "lr": 0.02}),
}


def _optimize(folder: Path, pricing: ro.Pricing, prune: str, tuning: dict, max_drop: float) -> dict | str:
    """Return the report of the lowest-latency result in `folder` (made once, then reused), or why none."""
    m = ro.load_model("resnet20", pretrained=True, data="fashion-mnist")
    config = ro.OptimizeConfig(pricing=pricing, prune=prune, max_drop=max_drop, **tuning)
    try:
        r = ro.optimize(m.model, m.data, outdir=folder, config=config, base_spec=m.name, progress=True)
    except ro.ReluOptError as exc:  # no latency level met the accuracy limit
        return str(exc).split(";")[0]
    return (r[-1] if isinstance(r, list) else r).to_dict()


def _row(label: str, backend: str, m, accuracy: float | None, pruning: dict | None) -> dict:
    return {
        "model": label,
        "backend": backend,
        "test_accuracy": accuracy,
        "relus": m.relu_elements,
        "mb": max(m.bytes_per_party) / 1e6,
        "predicted_mb": None if m.predicted_bytes is None else m.predicted_bytes / 1e6,
        "sends_per_party": m.sends_per_party,
        "rounds": m.rounds,
        "setup_mb": m.offline_bytes / 1e6,
        "wall_s": m.wall_s_median,
        "lan_s": m.lan_s,
        "wan_s": m.wan_s,
        "top1_agreement": m.top1_agreement,
        "structure": (pruning or {}).get("removed", "-"),
    }


def _figure(rows: list[dict], backend: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in (r for r in rows if r["backend"] == backend and r["test_accuracy"] is not None):
        ax.scatter(r["mb"], r["test_accuracy"], label=f"{r['model']} (measured)")
        if r["predicted_mb"] is not None:
            ax.scatter(r["predicted_mb"], r["test_accuracy"], marker="x", label=f"{r['model']} (modeled)")
    ax.set_xlabel("MB per forward and party, both directions (batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet-20 / Fashion-MNIST under {backend}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2, help="test samples per bench, one query at a time")
    ap.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs per level (default per backend)")
    ap.add_argument("--max-drop", type=float, default=1.0, help="validation points a result may lose")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="which of " + ", ".join(BACKENDS))
    ap.add_argument("--work", type=Path, default=Path("runs/prune_channels"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_channels"))
    args = ap.parse_args()
    rows, notes, t0 = [], [], time.time()
    for backend in args.backends.split(","):
        pricing, tuning = BACKENDS[backend]
        tuning = {**tuning, **({"epochs": args.epochs} if args.epochs is not None else {})}
        results = {
            p: _optimize(args.work / backend / p, pricing, p, tuning, args.max_drop) for p in ("none", "channels")
        }
        failed = {p: r for p, r in results.items() if isinstance(r, str)}
        for prune, report in results.items():
            if prune in failed:
                continue
            b = ro.bench("resnet20", pretrained=True, data="fashion-mnist", optimized=report["outdir"],
                         pricing=replace(pricing), samples=args.samples, batch=1, timeout=900)  # fmt: skip
            for m in b.models:
                if m.name == "original" and not any(r["backend"] == backend for r in rows):
                    rows.append(_row("original", backend, m, report["accuracy_before"], None))
                elif m.name == "optimized":
                    label = "ReLU-only" if prune == "none" else "ReLU + structure"
                    rows.append(_row(label, backend, m, report["accuracy_after"], report.get("pruning")))
        notes += [f"{backend}, --prune {p}: no result ({why})" for p, why in failed.items()]
        _figure(rows, backend, Path(f"{args.out}_{backend.lower()}.png"))
    lines = [
        "# ReLU-only vs ReLU + structure (`--prune channels`) on ResNet-20 / Fashion-MNIST",
        "",
        f"`python benchmarks/prune_channels.py --samples {args.samples}`: each backend's no-budget search (lowest "
        "modeled latency within 1 validation point) with --prune none and with --prune channels (fine-tuning per "
        "level: "
        + "; ".join(f"{b} {t['epochs']:g} epochs at lr {t['lr']:g}" for b, (_, t) in BACKENDS.items())
        + "); CrypTen priced on the WAN (40 ms, 100 MB/s), Cheetah on 0.1 ms, 10 MB/s (bytes decide there). "
        f"Benches: {args.samples} test images one query at a time, two real parties (CrypTen with its third-party "
        "dealer; Cheetah has none). MB: a party's traffic of one steady forward, both directions (in 2PC, all "
        "that crosses the link); sends/party: send actions "
        "(CrypTen: its rounds); setup: CrypTen's dealer traffic, Cheetah's first-forward setup.",
        "",
        "| model | backend | test acc | ReLUs | MB | modeled MB | sends/party | setup MB | wall s | LAN s | WAN s "
        "| top-1 = plain | structure removed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pred = "-" if r["predicted_mb"] is None else f"{r['predicted_mb']:.2f}"
        sends = "/".join(str(s) for s in r["sends_per_party"]) if r["sends_per_party"] else str(r["rounds"])
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['test_accuracy']:.2f}% | {r['relus']:,} | {r['mb']:.2f} | {pred} | "
            f"{sends} | {r['setup_mb']:.2f} | {r['wall_s']:.2f} | {r['lan_s']:.2f} | {r['wan_s']:.2f} | "
            f"{r['top1_agreement']:.2f} | {r['structure']} |"
        )
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    lines += ["", f"Took {time.time() - t0:.0f} s (optimizations resumed from --work count only what was left)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
