"""Reports readable without the tool: Markdown tables and matplotlib figures from result JSON."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from relu_opt import atomic
from relu_opt.optimizer.result import elements_of


def method_of(run_config: dict) -> dict:
    """Return a run config's model, data and optimize options in one dict (older runs kept them flat)."""
    return {**run_config.get("optimize", {}), **{k: v for k, v in run_config.items() if k != "optimize"}}


def after(o: dict) -> int:
    """Return the elements an OptimizeResult dict kept (older reports: relu_after)."""
    return elements_of(o, "elements_after")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _costs(modeled: dict | None) -> dict[str, dict]:
    """Return the per-model entries of a modeled_cost.json dict (without what priced them)."""
    return {k: v for k, v in (modeled or {}).items() if isinstance(v, dict)}


def modeled_markdown(modeled: dict | None) -> str:
    """Return the report section of modeled costs (`modeled_cost.json`'s dict), or how to get them."""
    costs = _costs(modeled)
    if not costs:
        return (
            "\n## Modeled encrypted cost\n\nNo cost model is cached yet: `relu-opt bench` (or `relu-opt run`) "
            "measures it once with real parties, then every report shows rounds, bytes and latency.\n"
        )
    rows = [
        [
            name,
            f"{m['rounds']:.0f}",
            f"{m['bytes_per_party'] / 1e6:.2f}",
            f"{m.get('offline_bytes', 0) / 1e6:.2f}",
            f"{m['lan_s']:.3f}",
            f"{m['wan_s']:.3f}",
            f"{m.get('wan_total_s', m['wan_s']):.3f}",
        ]
        for name, m in costs.items()
    ]
    priced = (modeled or {}).get("priced_by")
    text = (
        f"\n## Modeled encrypted cost\n\nPredicted by the fitted cost model ({priced or '2 parties'}, batch "
        f"{next(iter(costs.values())).get('batch', 1)}), before any bench. LAN/WAN seconds are communication "
        "only: online = round trips of the link x RTT (a round may wait for several) + the bytes each party sends "
        "one way / bandwidth (LAN 0.5 ms, 1000 MB/s; "
        "WAN 40 ms, 100 MB/s); +offline adds the dealer's bytes and the round trips waited for it on the same "
        "link (for a protocol without a dealer, its one-time setup: Cheetah's OT and keys). `relu-opt bench` "
        "measures compute too.\n\n"
        + _md_table(["model", "rounds", "MB per party", "offline MB", "LAN s", "WAN s", "WAN s +offline"], rows)
    )
    if "original" in costs and "optimized" in costs:
        o, b = costs["optimized"], costs["original"]
        text += (
            f"\noptimized / original: rounds x{o['rounds'] / max(b['rounds'], 1):.2f}, "
            f"bytes x{o['bytes_per_party'] / max(b['bytes_per_party'], 1):.2f}, "
            f"LAN x{o['lan_s'] / b['lan_s']:.2f}, WAN x{o['wan_s'] / b['wan_s']:.2f}.\n"
        )
    return text


def _start_words(finetune: dict) -> str:
    start = finetune.get("start", "original")
    return "" if start == "original" else f" Fine-tuning started from the weights of {start}."


def optimize_markdown(r, modeled: dict | None = None) -> str:
    """Return report.md for one OptimizeResult (with its modeled costs, when known)."""
    fold = r.elements_before / max(r.elements_after, 1)
    head = (
        f"# relu-opt: {_budget(r)}\n\n"
        f"Strategy `{r.strategy}`, replacement `{r.replace}`, granularity `{r.granularity}`."
        + _start_words(getattr(r, "finetune", None) or {})
        + "\n\n"
        + _md_table(
            ["", "ReLUs per sample", "test accuracy", "validation accuracy"],
            [
                ["before", f"{r.elements_before:,}", f"{r.accuracy_before:.2f}%", f"{r.val_accuracy_before:.2f}%"],
                [
                    "after",
                    f"{r.elements_after:,} ({fold:.1f}x fewer)",
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
        + modeled_markdown(modeled)
        + selection_markdown(getattr(r, "selection", None) or {})
        + (f"\n## Structure\n\n{structure_line(r.pruning)}\n" if getattr(r, "pruning", None) else "")
    )


def structure_line(pruning: dict) -> str:
    """Return what structure a result removed and why that mode, as one line."""
    mode, why = pruning.get("mode", "none"), pruning.get("why", "")
    return f"{pruning.get('removed', 'nothing pruned')} (--prune {mode}: {why})"


def result_key(o: dict) -> str:
    """Return the key a run report files one optimize result under: its ReLU budget, else its folder name."""
    return str(o["budget"]) if o.get("budget") is not None else Path(o["outdir"]).name


def result_label(o: dict) -> str:
    """Return what one optimize result (its to_dict()) was optimized to, e.g. "budget 12,900" or
    "budget 2.8311 s on wan"."""
    if o.get("budget") is not None:
        return f"budget {o['budget']:,}"
    constraints = (o.get("selection") or {}).get("constraints", "")
    return f"budget {constraints}" if constraints else "no ReLU budget"


def _budget(r) -> str:
    return result_label({"budget": r.budget, "selection": getattr(r, "selection", None)})


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
    return md + _md_table(CHOICE_COLUMNS, choice_rows(sel))


CHOICE_COLUMNS = ("site", "kind", "choice", "kept", "rounds", "MB/party", "why")


def choice_rows(sel: dict) -> list[list[str]]:
    """Return one row of CHOICE_COLUMNS per site of a Selection's to_dict()."""
    return [
        [
            c["site"],
            c["kind"],
            c["action"],
            f"{c['kept']:,}/{c['elements']:,}",
            "-" if c.get("rounds") is None else f"{c['rounds']:g}",
            "-" if c.get("bytes") is None else f"{c['bytes'] / 1e6:.3f}",
            c.get("why", ""),
        ]
        for c in sel["choices"]
    ]


def _modeled_costs(outdir: Path, pricing, cost) -> dict | None:
    """Write and return an optimize folder's modeled costs, with `cost` or `pricing`'s cached cost model
    (None when there is none: nothing is measured here)."""
    from relu_opt.errors import ReluOptError
    from relu_opt.modeled_cost import write_folder_costs

    try:
        return write_folder_costs(outdir, cost if cost is not None else pricing.cost_model(measure=False), pricing)
    except ReluOptError:  # a base model given as an object: its structure is not on file to rebuild
        return None


def write_optimize_report(r, outdir: Path, pricing, cost=None) -> None:
    """Write report.md (and modeled_cost.json, when `pricing` has a cost model, or `cost` is given) for
    one OptimizeResult."""
    modeled = _modeled_costs(Path(outdir), pricing, cost)
    atomic.write_text(Path(outdir) / "report.md", optimize_markdown(r, modeled))


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic.write_bytes(path, buf.getvalue())


def pareto_plot(
    points: dict[str, list[tuple[int, float]]],
    baseline: tuple[int, float],
    path: Path,
    title: str,
    latency: dict[str, tuple[dict[str, list[tuple[float, float]]], tuple[float, float]]] | None = None,
) -> None:
    """Plot accuracy against ReLUs (log x) for each series, with the baseline, to a PNG; with `latency`
    ({"WAN": (points, baseline), "LAN": ...}, x in modeled seconds), one more panel per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, "ReLU elements per sample (ONNX)", "log", points, baseline)]
    panels += [
        (f"accuracy vs modeled {net} latency", f"modeled {net} latency (s, communication only)", "linear", pts, base)
        for net, (pts, base) in (latency or {}).items()
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, xlabel, scale, pts_by_label, base) in zip(axes[0], panels):
        for label, pts in sorted(pts_by_label.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.scatter([base[0]], [base[1]], marker="*", s=150, color="black", label="baseline", zorder=5)
        ax.set_xscale(scale)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


def _latency_panels(label: str, modeled: list[dict | None], accuracies: list[float], baseline: tuple) -> dict | None:
    """Return pareto_plot's `latency` argument from each point's modeled costs, or None if any lacks them."""
    if not modeled or any(m is None or "optimized" not in m for m in modeled) or baseline[0] is None:
        return None
    return {
        net.upper(): (
            {label: [(m["optimized"][f"{net}_s"], a) for m, a in zip(modeled, accuracies)]},
            (baseline[0][f"{net}_s"], baseline[1]),
        )
        for net in ("wan", "lan")
    }


def _modeled_fields(m: dict | None) -> dict:
    """Return the pareto row fields of one modeled cost (empty without one)."""
    if not m:
        return {}
    return {
        "modeled_rounds": m["rounds"],
        "modeled_mb_per_party": m["bytes_per_party"] / 1e6,
        "modeled_lan_s": m["lan_s"],
        "modeled_wan_s": m["wan_s"],
    }


def write_pareto(results, outdir: Path) -> None:
    """Write pareto.json, pareto.md and pareto.png for the budgets of one optimize run; with modeled costs
    in the budget folders (modeled_cost.json), the frontier in modeled LAN/WAN latency too."""
    from relu_opt.modeled_cost import read_folder_costs

    outdir = Path(outdir)
    if not results:
        return
    base = results[0]
    modeled = [read_folder_costs(r.outdir) for r in results]
    original = next((m["original"] for m in modeled if m and "original" in m), None)
    rows = [
        {
            "budget": r.budget,
            "relu": r.elements_after,
            "test_accuracy": r.accuracy_after,
            "wall_s": r.wall_s,
            "outdir": r.outdir,
            **_modeled_fields((m or {}).get("optimized")),
        }
        for r, m in zip(results, modeled)
    ]
    atomic.write_json(
        outdir / "pareto.json",
        {
            "baseline": {
                "relu": base.elements_before,
                "test_accuracy": base.accuracy_before,
                **_modeled_fields(original),
            },
            "strategy": base.strategy,
            "replace": base.replace,
            "granularity": base.granularity,
            "rows": rows,
        },
    )
    have = all("modeled_wan_s" in row for row in rows) and original is not None
    md = f"# Pareto frontier\n\nBaseline: {base.elements_before:,} ReLUs, {base.accuracy_before:.2f}% test accuracy"
    md += (
        f"; modeled {original['rounds']:.0f} rounds, {original['bytes_per_party'] / 1e6:.1f} MB per party, "
        f"LAN {original['lan_s']:.3f} s, WAN {original['wan_s']:.3f} s.\n\n"
        if have
        else ".\n\n"
    )
    extra = ["rounds", "MB/party", "LAN s", "WAN s"] if have else []
    md += _md_table(
        ["budget", "ReLUs (ONNX)", "fewer", "test accuracy", "change", "wall s", *extra],
        [
            [
                "-" if r.budget is None else f"{r.budget:,}",
                f"{r.elements_after:,}",
                f"{r.elements_before / max(r.elements_after, 1):.1f}x",
                f"{r.accuracy_after:.2f}%",
                f"{r.accuracy_after - r.accuracy_before:+.2f}",
                f"{r.wall_s:.0f}",
                *(
                    [
                        f"{row['modeled_rounds']:.0f}",
                        f"{row['modeled_mb_per_party']:.1f}",
                        f"{row['modeled_lan_s']:.3f}",
                        f"{row['modeled_wan_s']:.3f}",
                    ]
                    if have
                    else []
                ),
            ]
            for r, row in zip(results, rows)
        ],
    )
    if have:
        md += (
            "\nrounds, MB/party and LAN/WAN seconds are the cost model's predictions at batch 1 (communication "
            "only: round trips x RTT + bytes one way / bandwidth; LAN 0.5 ms, 1000 MB/s; WAN 40 ms, 100 MB/s).\n"
        )
    atomic.write_text(outdir / "pareto.md", md)
    label = f"{base.strategy}/{base.replace}/{base.granularity}"
    accuracies = [r.accuracy_after for r in results]
    pareto_plot(
        {label: [(max(r.elements_after, 1), r.accuracy_after) for r in results]},
        (base.elements_before, base.accuracy_before),
        outdir / "pareto.png",
        "accuracy vs ReLUs",
        latency=_latency_panels(label, modeled, accuracies, (original, base.accuracy_before)) if have else None,
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
    base, cfg = r["baseline"], method_of(r["config"])
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
            f"| {result_label(o)} | {after(o):,} | {elements_of(o, 'elements_before') / max(after(o), 1):.1f}x"
            f" | {o['accuracy_after']:.2f}% |"
        )
    lines += ["", "ReLUs of optimized models are counted on their exported ONNX graphs.", ""]
    lines += _run_modeled_lines(r)
    lines += ["![census](census.png)", "", "![accuracy vs ReLUs and modeled latency](pareto.png)", ""]
    b = r["bench"]
    nets = b.get("networks", {})
    lan, wan = nets.get("lan", {}), nets.get("wan", {})
    lines += [
        f"## Encrypted inference ({bench_title(b)}, {_batch_words(b)})",
        "",
        *(
            [f"**{insecure_label(b)}** (dealer {b.get('dealer', 'party0')}): not private inference.", ""]
            if insecure_label(b)
            else []
        ),
        f"LAN = {lan.get('rtt_ms', '?')} ms RTT, {lan.get('bandwidth_MBps', '?')} MB/s; "
        f"WAN = {wan.get('rtt_ms', '?')} ms RTT, {wan.get('bandwidth_MBps', '?')} MB/s. The wall time is measured "
        "(the parties on this machine); LAN and WAN seconds are modeled on those profiles: online latency = "
        "measured compute + the round trips of the link the parties wait for x RTT (a round may wait for "
        "several) + the bytes each party sends one way / bandwidth per direction (a "
        "full-duplex link); +offline adds the dealer's traffic on the same link (its bytes, and the round trips "
        "the parties wait for its answers during the forward).",
        "",
        "| model | ReLUs | rounds | round trips | MB per party | offline MB | dealer requests | wall s (median) | "
        "LAN s | WAN s | WAN s +offline | predicted rounds | predicted MB | predicted offline MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in b["models"]:
        pred = "-" if m.get("predicted_rounds") is None else f"{m['predicted_rounds']:.0f}"
        pred_mb = "-" if m.get("predicted_bytes") is None else f"{m['predicted_bytes'] / 1e6:.2f}"
        pred_off = "-" if m.get("predicted_offline_bytes") is None else f"{m['predicted_offline_bytes'] / 1e6:.2f}"
        lines.append(
            f"| {m['name']} | {m['relu_elements']:,} | {m['rounds']} | {_trips(m)} | "
            f"{max(m['bytes_per_party']) / 1e6:.2f} | "
            f"{m.get('offline_bytes', 0) / 1e6:.2f} | {m.get('offline_requests', 0)} | "
            f"{m['wall_s_median']:.3f} | {m['lan_s']:.3f} | {m['wan_s']:.3f} | "
            f"{m.get('wan_total_s', m['wan_s']):.3f} | {pred} | {pred_mb} | {pred_off} |"
        )
    lines += ["", "Predicted: the cost model, for what was benched (same batch)."]
    lines += cost_split_lines(b["models"])
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
        lines += ["", ratio_line(name, ratio) + "."]
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


def cost_split_lines(models: list[dict]) -> list[str]:
    """Return the bench's split of bytes between linear layers and the rest (engines that profile ops)."""
    if all(m.get("linear_share") is None for m in models):
        return []
    lines = [
        "",
        "### Linear layers vs non-linear sites",
        "",
        "| model | bytes in linear layers | in non-linear sites and the rest | predicted linear | messages per party |",
        "|---|---|---|---|---|",
    ]
    for m in models:
        share, pred = m.get("linear_share"), m.get("predicted_linear_share")
        msgs = "/".join(f"{n:,}" for n in m.get("sends_per_party") or []) or "-"
        pct = ["-" if v is None else f"{100 * v:.0f}%" for v in (share, None if share is None else 1 - share, pred)]
        lines.append(f"| {m['name']} | {' | '.join(pct)} | {msgs} |")
    return lines + [
        "",
        "Measured from the engine's per-op profile of the steady-state forward; predicted by the cost model.",
    ]


def insecure_label(b: dict) -> str | None:
    """Return a bench JSON's INSECURE label: its own, or for a bench from before dealers were chosen
    (party 0 dealt every triple then) the label it would have had."""
    from relu_opt.backends import INSECURE_LABEL

    return b.get("insecure") if "dealer" in b else INSECURE_LABEL


def _trips(m: dict) -> str:
    """Return a bench row's online round trips of the link, or, for a row made before they were counted
    (its latencies priced one round trip per round), say so."""
    return f"{m['round_trips']:g}" if "round_trips" in m else "= rounds (old model)"


def bench_title(b: dict) -> str:
    """Return how a bench's JSON names what ran it, e.g. "CrypTen, 2 parties, dealer third-party"."""
    from relu_opt.backends import Pricing

    engine = b.get("title") or Pricing().engine().title  # a bench from before backends had names ran on it
    dealer = b.get("dealer", "party0")
    title = f"{engine}, {b['parties']} parties, " + ("no dealer" if dealer == "none" else f"dealer {dealer}")
    label = insecure_label(b)
    return title + (f", {label}" if label else "")


def ratio_line(name: str, ratio: dict) -> str:
    """Return one line of a model's cost against the original's (a bench's `ratios` entry)."""
    text = (
        f"{name} / original: rounds x{ratio['rounds']:.2f}, bytes x{ratio['bytes_per_party']:.2f}, "
        f"LAN x{ratio['lan_s']:.2f}, WAN x{ratio['wan_s']:.2f}"
    )
    off = ratio.get("offline_bytes")
    if off is not None and off == off:  # NaN: no offline traffic (a dealer inside party 0), or an old file
        text += f"; offline bytes x{off:.2f}, WAN with offline x{ratio['wan_total_s']:.2f}"
    return text


def _batch_words(b: dict) -> str:
    n = b.get("samples") or b["batch"]
    if b["batch"] == 1:
        return f"one private query at a time: costs and times per query; accuracy over {n} test samples"
    if n == b["batch"]:
        return f"{n} test samples in one batch"
    return f"batches of {b['batch']}: costs and times per batch; accuracy over {n} test samples"


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


def _run_modeled_lines(r: dict) -> list[str]:
    """Return the run report's table of modeled cost per budget (none for runs from before it existed)."""
    modeled = [r.get("modeled", {}).get(result_key(o)) for o in r["optimized"]]
    if not modeled or any(m is None for m in modeled):
        return []
    base = modeled[0]["original"]

    def row(name: str, m: dict, acc: float) -> str:
        total = m.get("wan_total_s", m["wan_s"])
        return (
            f"| {name} | {acc:.2f}% | {m['rounds']:.0f} | {m['bytes_per_party'] / 1e6:.2f} | "
            f"{m.get('offline_bytes', 0) / 1e6:.2f} | {m['lan_s']:.3f} | {m['wan_s']:.3f} | "
            f"x{m['wan_s'] / base['wan_s']:.2f} | {total:.3f} | x{total / base.get('wan_total_s', base['wan_s']):.2f} |"
        )

    priced = modeled[0].get("priced_by")
    lines = [
        "## Accuracy and modeled latency",
        "",
        "The cost model's prediction per sample (batch 1)"
        + (f", priced for {priced}" if priced else "")
        + ", before the bench: LAN/WAN seconds are communication only (online: round trips x RTT + bytes one way / "
        "bandwidth; +offline: the dealer's bytes and the round trips waited for it on the same link, or a dealer-free "
        "protocol's one-time setup).",
        "",
        "| model | test accuracy | rounds | MB per party | offline MB | LAN s | WAN s | WAN vs baseline | "
        "WAN s +offline | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("baseline", base, r["baseline"]["test_accuracy"]),
    ]
    lines += [row(result_label(o), m["optimized"], o["accuracy_after"]) for o, m in zip(r["optimized"], modeled)]
    return lines + [""]


def _render_run(rundir: Path, r: dict) -> Path:
    census_plot(r["census_before"], r["census_after"], rundir / "census.png")
    label = method_of(r["config"])["strategy"]
    points = {label: [(max(after(o), 1), o["accuracy_after"]) for o in r["optimized"]]}
    modeled = [r.get("modeled", {}).get(result_key(o)) for o in r["optimized"]]
    accuracies = [o["accuracy_after"] for o in r["optimized"]]
    original = modeled[0]["original"] if modeled and modeled[0] else None
    pareto_plot(
        points,
        (r["baseline"]["relu"], r["baseline"]["test_accuracy"]),
        rundir / "pareto.png",
        "accuracy vs ReLUs",
        latency=_latency_panels(label, modeled, accuracies, (original, r["baseline"]["test_accuracy"])),
    )
    return atomic.write_text(rundir / "report.md", run_markdown(r))
