"""The shipped ResNet-20 (Fashion-MNIST) optimized for CrypTen and for SPU's Cheetah, each plan benched under
both engines: where the selections differ, what each costs on the other engine, and the share of the cost in
linear layers against non-linear sites per model and engine.

    python benchmarks/cheetah_vs_crypten.py [--samples 2] [--work DIR] [--out benchmarks/results/cheetah_vs_crypten]

Each optimization (the no-budget lowest-latency search, one epoch of fine-tuning per try) is kept in --work, so
a rerun resumes; the benches run two real parties each (CrypTen with its third-party dealer). Writes OUT.md and
OUT.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import relu_opt as ro

ENGINES = {
    "CrypTen": ro.Pricing(backend="crypten"),
    "Cheetah": ro.Pricing(backend="spu", protocol="cheetah"),
}


def _optimize(name: str, pricing: ro.Pricing, work: Path) -> Path:
    """Return the folder of the lowest-latency plan priced by `pricing` (made once, then reused)."""
    folder = work / name
    done = sorted(folder.glob("*/plan.json"))
    if done:
        return done[-1].parent
    m = ro.load_model("resnet20", pretrained=True, data="fashion-mnist")
    r = ro.optimize(m.model, m.data, outdir=folder, config=ro.OptimizeConfig(pricing=pricing), base_spec=m.name)
    return Path((r[-1] if isinstance(r, list) else r).outdir)


def _result(folder: Path) -> dict:
    d = json.loads((folder / "report.json").read_text())
    return d.get("result", d)


def _choices(folder: Path) -> dict[str, str]:
    sel = _result(folder).get("selection") or {}
    return {c["site"]: f"{c['action']} {c['kept']}/{c['elements']}" for c in sel.get("choices", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2, help="test samples per bench, one query at a time")
    ap.add_argument("--work", type=Path, default=Path("runs/cheetah_vs_crypten"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cheetah_vs_crypten"))
    args = ap.parse_args()
    plans = {name: _optimize(name, p, args.work) for name, p in ENGINES.items()}
    rows, t0 = [], time.time()
    for plan, folder in plans.items():
        report = _result(folder)
        for engine, pricing in ENGINES.items():
            b = ro.bench("resnet20", pretrained=True, data="fashion-mnist", optimized=folder, pricing=pricing,
                         samples=args.samples, batch=1, timeout=900)  # fmt: skip
            for m in b.models:
                if plan != "CrypTen" and m.name != "optimized":
                    continue  # original and floor once per engine
                rows.append(
                    {
                        "plan": f"optimized for {plan}" if m.name == "optimized" else m.name,
                        "engine": engine,
                        "test_accuracy": report["accuracy_after"] if m.name == "optimized" else None,
                        "relus": m.relu_elements,
                        "mb_per_party": max(m.bytes_per_party) / 1e6,
                        "rounds": m.rounds,
                        "setup_or_offline_mb": m.offline_bytes / 1e6,
                        "linear_share": m.linear_share,
                        "predicted_linear_share": m.predicted_linear_share,
                        "wall_s": m.wall_s_median,
                        "wan_s": m.wan_s,
                        "lan_s": m.lan_s,
                        "top1_agreement": m.top1_agreement,
                        "predicted_mb": None if m.predicted_bytes is None else m.predicted_bytes / 1e6,
                    }
                )
    choices = {plan: _choices(folder) for plan, folder in plans.items()}
    sites = list(next(iter(choices.values())))
    differ = [s for s in sites if len({c.get(s) for c in choices.values()}) > 1]
    lines = [
        "# ResNet-20 on Fashion-MNIST: optimized for CrypTen vs for Cheetah, each benched under both",
        "",
        f"`python benchmarks/cheetah_vs_crypten.py --samples {args.samples}`; {args.samples} test images one query "
        "at a time, two real parties each (CrypTen with its third-party dealer; Cheetah has none). MB per party: "
        "both directions; rounds: CrypTen's, or Cheetah's estimate (the quieter party's messages); setup/offline: "
        "CrypTen's dealer traffic, Cheetah's first-forward OT setup. Linear share: of the bytes, measured from "
        "the engine's per-op profile (SPU only). WAN/LAN: modeled on measured compute.",
        "",
        "| model | engine | test acc | ReLUs | MB/party | predicted MB | rounds | setup/offline MB | linear share "
        "(pred.) | wall s | LAN s | WAN s | top-1 = plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2f}%"
        share = "-" if r["linear_share"] is None else f"{100 * r['linear_share']:.0f}%"
        if r["predicted_linear_share"] is not None:
            share += f" ({100 * r['predicted_linear_share']:.0f}%)"
        pred = "-" if r["predicted_mb"] is None else f"{r['predicted_mb']:.2f}"
        lines.append(
            f"| {r['plan']} | {r['engine']} | {acc} | {r['relus']:,} | {r['mb_per_party']:.2f} | {pred} | "
            f"{r['rounds']} | {r['setup_or_offline_mb']:.2f} | {share} | {r['wall_s']:.2f} | {r['lan_s']:.2f} | "
            f"{r['wan_s']:.2f} | {r['top1_agreement']:.2f} |"
        )
    lines += ["", f"Sites where the two plans differ ({len(differ)} of {len(sites)}):", ""]
    lines += ["| site | " + " | ".join(f"for {p}" for p in choices) + " |", "|---" * (len(choices) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(c.get(s, "-") for c in choices.values()) + " |" for s in differ]
    lines += ["", f"Benches took {time.time() - t0:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"rows": rows, "choices": choices}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
