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
        f"# relu-opt: budget {r.budget:,}\n\n"
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
        head + "## Sites\n\n" + _md_table(["site", "elements", "ReLUs kept", "kept", "rest", "poly fit rel. MSE"], rows)
    )


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
                f"{r.budget:,}",
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
