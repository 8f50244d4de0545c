"""Reports readable without the tool: Markdown tables and matplotlib figures from result JSON."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from relu_opt import atomic


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def optimize_markdown(r) -> str:
    """Return report.md for one OptimizeResult."""
    fold = r.relu_before / max(r.relu_after, 1)
    head = (
        f"# relu-opt: {_budget(r)}\n\n"
        f"Strategy `{r.strategy}`, replacement `{r.replace}`, granularity `{r.granularity}`.\n\n"
        + _md_table(
            ["", "ReLUs per sample", "test accuracy", "validation accuracy"],
            [
                ["before", f"{r.relu_before:,}", f"{r.accuracy_before:.2f}%", f"{r.val_accuracy_before:.2f}%"],
                [
                    "after",
                    f"{r.relu_after:,} ({fold:.1f}x fewer)",
                    f"{r.accuracy_after:.2f}%",
                    f"{r.val_accuracy_after:.2f}%",
                ],
            ],
        )
        + f"\nReLUs after are counted on the exported ONNX graph (`model.onnx`); wall time {r.wall_s:.0f} s.\n\n"
    )
    kinds = getattr(r, "kinds", None) or {}
    if set(kinds) - {"relu"}:  # beyond ReLU: the kept elements of each optimized kind
        head += (
            "## Kinds\n\n"
            + _md_table(
                ["kind", "elements before", "after (ONNX)", "own budget"],
                [
                    [k, f"{v['before']:,}", f"{v['after']:,}", "-" if v.get("budget") is None else f"{v['budget']:,}"]
                    for k, v in kinds.items()
                ],
            )
            + "\nThe ReLU columns above and below count the kept elements of these kinds.\n\n"
        )
    rows = [
        [
            s.site,
            f"{s.elements:,}",
            f"{s.kept:,}",
            f"{s.kept / s.elements:.1%}",
            s.replacement,
            "-" if s.fit_error is None else f"{s.fit_error:.3f}",
        ]
        for s in r.sites
    ]
    return (
        head
        + "## Sites\n\n"
        + _md_table(["site", "elements", "ReLUs kept", "kept", "rest", "poly fit rel. MSE"], rows)
        + selection_markdown(getattr(r, "selection", None) or {})
    )


def _budget(r) -> str:
    """Return what the result was optimized to, e.g. "budget 12,900" or "rounds 60"."""
    if r.budget is not None:
        return f"budget {r.budget:,}"
    constraints = (getattr(r, "selection", None) or {}).get("constraints", "")
    return f"budget {constraints}" if constraints else "no ReLU budget"


def selection_markdown(sel: dict) -> str:
    """Return the per-site choices of a Selection (its to_dict()) as a Markdown section ("" if none)."""
    if not sel.get("choices"):
        return ""
    priced = sel.get("rounds") is not None
    md = f"\n## Choices\n\nSelector `{sel['selector']}` under {sel['constraints']}"
    if priced:
        lat = sel.get("latency_s", {})
        md += f"; modeled at batch 1: {sel['rounds']:.0f} rounds, {sel['bytes'] / 1e6:.2f} MB per party, " + ", ".join(
            f"{k.upper()} {v:.3g} s" for k, v in lat.items()
        )
    md += ".\n\n"
    rows = [
        [
            c["site"],
            c["kind"],
            c["action"],
            f"{c['kept']:,} / {c['elements']:,}",
            "-" if c.get("rounds") is None else f"{c['rounds']:g}",
            "-" if c.get("bytes") is None else f"{c['bytes'] / 1e6:.3f}",
            c.get("why", ""),
        ]
        for c in sel["choices"]
    ]
    return md + _md_table(["site", "kind", "choice", "kept", "rounds", "MB/party", "why"], rows)


def write_optimize_report(r, outdir: Path) -> None:
    """Write report.md for one OptimizeResult into `outdir`."""
    atomic.write_text(Path(outdir) / "report.md", optimize_markdown(r))


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic.write_bytes(path, buf.getvalue())


def pareto_plot(
    points: dict[str, list[tuple[int, float]]], baseline: tuple[int, float], path: Path, title: str
) -> None:
    """Plot accuracy against ReLUs (log x) for each series, with the baseline, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(points.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.scatter([baseline[0]], [baseline[1]], marker="*", s=150, color="black", label="baseline", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("ReLU elements per sample (ONNX)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


def write_pareto(results, outdir: Path) -> None:
    """Write pareto.json, pareto.md and pareto.png for the budgets of one optimize run."""
    outdir = Path(outdir)
    if not results:
        return
    base = results[0]
    rows = [
        {
            "budget": r.budget,
            "relu": r.relu_after,
            "test_accuracy": r.accuracy_after,
            "wall_s": r.wall_s,
            "outdir": r.outdir,
        }
        for r in results
    ]
    atomic.write_json(
        outdir / "pareto.json",
        {
            "baseline": {"relu": base.relu_before, "test_accuracy": base.accuracy_before},
            "strategy": base.strategy,
            "replace": base.replace,
            "granularity": base.granularity,
            "rows": rows,
        },
    )
    md = f"# Pareto frontier\n\nBaseline: {base.relu_before:,} ReLUs, {base.accuracy_before:.2f}% test accuracy.\n\n"
    md += _md_table(
        ["budget", "ReLUs (ONNX)", "fewer", "test accuracy", "change", "wall s"],
        [
            [
                "-" if r.budget is None else f"{r.budget:,}",
                f"{r.relu_after:,}",
                f"{r.relu_before / max(r.relu_after, 1):.1f}x",
                f"{r.accuracy_after:.2f}%",
                f"{r.accuracy_after - r.accuracy_before:+.2f}",
                f"{r.wall_s:.0f}",
            ]
            for r in results
        ],
    )
    atomic.write_text(outdir / "pareto.md", md)
    pareto_plot(
        {
            f"{base.strategy}/{base.replace}/{base.granularity}": [
                (max(r.relu_after, 1), r.accuracy_after) for r in results
            ]
        },
        (base.relu_before, base.accuracy_before),
        outdir / "pareto.png",
        "accuracy vs ReLUs",
    )


def census_plot(before: dict, after: dict, path: Path) -> None:
    """Bar chart of ReLU elements per site, before and after, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def per_site(c):
        out: dict[str, int] = {}
        for s in c["sites"]:
            if s["kind"] == "relu":
                out[s["name"]] = out.get(s["name"], 0) + s["elements"]
        return out

    b, a = per_site(before), per_site(after)
    names = list(b)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [b[n] for n in names], width=0.4, label=f"before ({before['total_relu']:,})")
    ax.bar([x + 0.2 for x in xs], [a.get(n, 0) for n in names], width=0.4, label=f"after ({after['total_relu']:,})")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ReLU elements per sample")
    ax.set_yscale("symlog")
    ax.set_title("ReLU census per site")
    ax.legend()
    _savefig(fig, path)
    plt.close(fig)


def run_markdown(r: dict) -> str:
    """Return report.md for a `relu-opt run` report.json."""
    base, cfg = r["baseline"], r["config"]
    opt = r["optimized"]
    lines = [
        "# relu-opt run",
        "",
        f"Model `{cfg['model']}` on `{cfg['data']}`; strategy `{cfg['strategy']}`, replacement `{cfg['replace']}`, "
        f"granularity `{cfg['granularity']}`.",
        "",
        "## Accuracy and ReLUs",
        "",
        "| model | ReLUs per sample | fewer | test accuracy |",
        "|---|---|---|---|",
        f"| baseline | {base['relu']:,} | 1x | {base['test_accuracy']:.2f}% |",
    ]
    for o in opt:
        lines.append(
            f"| budget {o['budget']:,} | {o['relu_after']:,} | {o['relu_before'] / max(o['relu_after'], 1):.1f}x"
            f" | {o['accuracy_after']:.2f}% |"
        )
    lines += [
        "",
        "ReLUs of optimized models are counted on their exported ONNX graphs.",
        "",
        "![census](census.png)",
        "",
        "![accuracy vs ReLUs](pareto.png)",
        "",
    ]
    b = r["bench"]
    nets = b.get("networks", {})
    lan, wan = nets.get("lan", {}), nets.get("wan", {})
    lines += [
        f"## Encrypted inference (CrypTen, {b['parties']} parties, {b['batch']} test samples in one batch)",
        "",
        f"LAN = {lan.get('rtt_ms', '?')} ms RTT, {lan.get('bandwidth_MBps', '?')} MB/s; "
        f"WAN = {wan.get('rtt_ms', '?')} ms RTT, {wan.get('bandwidth_MBps', '?')} MB/s; "
        "latency = measured compute + rounds x RTT + bytes each party sends one way / bandwidth per direction "
        "(a full-duplex link).",
        "",
        "| model | ReLUs | rounds | MB per party | wall s (median) | LAN s | WAN s | predicted rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in b["models"]:
        pred = "-" if m.get("predicted_rounds") is None else f"{m['predicted_rounds']:.0f}"
        lines.append(
            f"| {m['name']} | {m['relu_elements']:,} | {m['rounds']} | {max(m['bytes_per_party']) / 1e6:.2f} | "
            f"{m['wall_s_median']:.3f} | {m['lan_s']:.3f} | {m['wan_s']:.3f} | {pred} |"
        )
    lines += [
        "",
        "### Agreement with plaintext",
        "",
        "| model | max abs logit error | top-1 agreement | encrypted accuracy | plaintext accuracy |",
        "|---|---|---|---|---|",
    ]
    for m in b["models"]:
        acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.1f}%"
        pacc = "-" if m["plain_accuracy"] is None else f"{100 * m['plain_accuracy']:.1f}%"
        lines.append(f"| {m['name']} | {m['max_abs_err']:.2g} | {m['top1_agreement']:.2f} | {acc} | {pacc} |")
    if b.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in b["warnings"]]
    for name, ratio in b.get("ratios", {}).items():
        lines += [
            "",
            f"{name} / original: rounds x{ratio['rounds']:.2f}, bytes x{ratio['bytes_per_party']:.2f}, "
            f"LAN x{ratio['lan_s']:.2f}, WAN x{ratio['wan_s']:.2f}.",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        r.get("command") or "relu-opt run",
        "```",
        "",
        "| package | version |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["versions"].items()]
    lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.get("seconds", {}).items()), ""]
    return "\n".join(lines)


def render_run(rundir: str | Path) -> Path:
    """(Re)write report.md, census.png and pareto.png of a run folder from its report.json; returns report.md."""
    from relu_opt.checked_io import read_json
    from relu_opt.errors import CorruptFileError

    rundir = Path(rundir)
    keys = ("config", "baseline", "census_before", "census_after", "optimized", "bench")
    path = rundir / "report.json"
    r = read_json(path, keys, "run report", "rerun `relu-opt run` to write it again")
    try:
        return _render_run(rundir, r)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptFileError(
            f"run report '{path}' is malformed ({type(exc).__name__}: {exc}); rerun `relu-opt run` to write it again"
        ) from None


def _render_run(rundir: Path, r: dict) -> Path:
    census_plot(r["census_before"], r["census_after"], rundir / "census.png")
    points = {r["config"]["strategy"]: [(max(o["relu_after"], 1), o["accuracy_after"]) for o in r["optimized"]]}
    pareto_plot(
        points, (r["baseline"]["relu"], r["baseline"]["test_accuracy"]), rundir / "pareto.png", "accuracy vs ReLUs"
    )
    return atomic.write_text(rundir / "report.md", run_markdown(r))
