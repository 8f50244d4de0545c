"""How results look in a terminal: rich tables and lines built from the API's result dataclasses.

The command line prints what these return; nothing here computes a result.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from relu_opt.passes.census import Census
from relu_opt.reports import (
    CHOICE_COLUMNS,
    after,
    bench_title,
    choice_rows,
    insecure_label,
    ratio_line,
    structure_line,
)


def census_table(c: Census) -> Table:
    t = Table(title=f"{c.model}  input {tuple(c.input_shape)}", title_justify="left")
    for col, just in [("#", "right"), ("site", "left"), ("kind", "left"), ("shape", "left")]:
        t.add_column(col, justify=just)
    for col in ("elements", "share", "MACs in"):
        t.add_column(col, justify="right")
    for i, s in enumerate(c.sites):
        t.add_row(
            str(i),
            s.name,
            s.kind,
            "x".join(map(str, s.shape)),
            f"{s.elements:,}",
            f"{s.share:.1%}",
            f"{s.macs:,}",
        )
    t.add_section()
    for kind, total in sorted(c.totals_by_kind.items()):
        t.add_row("", "total", kind, "", f"{total:,}", "100.0%", "")
    return t


def compact_table(title: str, columns: tuple[str, ...]) -> Table:
    """Return a borderless table that fits 80 columns: first column left-aligned, the rest right."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for col in columns:
        t.add_column(col, justify="left" if col == columns[0] else "right")
    return t


def bench_table(r) -> Table:
    cols = {
        "ReLUs": lambda m: f"{m.relu_elements:,}",
        "cmp": lambda m: f"{m.comparisons:,}",
        "rounds": lambda m: str(m.rounds),
        "MB/party": lambda m: f"{max(m.bytes_per_party) / 1e6:.1f}",
        "msgs/party": lambda m: "/".join(f"{n:,}" for n in m.sends_per_party) if m.sends_per_party else None,
        "linear %": lambda m: None if m.linear_share is None else f"{100 * m.linear_share:.0f}",
        "off MB": lambda m: f"{m.offline_bytes / 1e6:.1f}",
        "wall": lambda m: f"{m.wall_s_median:.2f}",
        "link": lambda m: f"{m.predicted_s:.2f}",
        "LAN": lambda m: f"{m.lan_s:.2f}",
        "WAN": lambda m: f"{m.wan_s:.2f}",
        "+off": lambda m: f"{m.wan_total_s:.2f}",
    }
    # a column nobody can fill (no --link) is left out; secure comparisons beyond ReLU (ReLU6, max-pool,
    # ...) get a column only when they differ from the ReLUs
    cols = {k: f for k, f in cols.items() if not all(_is_none(m, k) for m in r.models)}
    if all(m.comparisons == m.relu_elements for m in r.models):
        del cols["cmp"]
    if not any(m.offline_bytes for m in r.models):  # no dealer traffic crosses a link
        del cols["off MB"], cols["+off"]
    n = r.samples or r.batch
    shown = f"batch {r.batch}" + (f" of {n} samples" if n != r.batch else "")
    dealer = "no dealer" if r.dealer == "none" else f"dealer {r.dealer}"
    title = f"{r.title}, {r.parties} parties, {dealer}, {shown}, seconds" + _insecure(r)
    t = compact_table(title, ("model", *cols))
    captions = [f"party {r.hosts['rank']} over {r.hosts['interface']}"] if r.hosts else []
    nets = ", ".join(f"{k.upper()} {v['rtt_ms']:g} ms {v['bandwidth_MBps']:g} MB/s" for k, v in r.networks.items())
    if r.link:
        nets += f", link {r.link['rtt_ms']:.3g} ms {r.link['bandwidth_MBps']:.3g} MB/s"
    captions.append(f"wall: measured here; {nets}: modeled (measured compute + round trips x RTT + bytes/bandwidth)")
    if "+off" in cols and r.dealer == "none":
        captions.append(
            "off MB: the setup (OT, keys; once per session) the first forward pays; +off: that first query on WAN"
        )
    elif "+off" in cols:
        captions.append("off MB: to and from the dealer; +off: WAN with it on the same link")
    if "msgs/party" in cols:
        captions.append("rounds: the quieter party's messages (the round trips a forward waits for, estimated)")
    if r.insecure:
        captions.append(f"[bold red]{r.insecure}[/] (--dealer {r.dealer})")
    if captions:
        t.caption, t.caption_justify = "\n".join(captions), "left"
    for m in r.models:
        t.add_row(m.name, *("-" if _is_none(m, k) else f(m) for k, f in cols.items()))
    return t


def _insecure(r) -> str:
    """Return the INSECURE mark a table title of bench result `r` carries ("" for an honest dealer)."""
    return f" [bold red]({r.insecure})[/]" if r.insecure else ""


def agreement_table(r) -> Table | None:
    """Return the encrypted outputs against plaintext and labels, or None where nobody can tell (the
    weights and the samples are on separate hosts, and there are no labels)."""
    cols = {
        "max abs err": lambda m: f"{m.max_abs_err:.2g}",
        "top-1 = plain": lambda m: f"{m.top1_agreement:.2f}",
        "accuracy": lambda m: f"{m.accuracy:.0%}",
        "plain acc": lambda m: f"{m.plain_accuracy:.0%}",
    }
    cols = {k: f for k, f in cols.items() if not all(_is_none(m, k) for m in r.models)}
    if not cols:
        return None
    t = compact_table("encrypted outputs" + _insecure(r), ("model", *cols))
    for m in r.models:
        t.add_row(m.name, *("-" if _is_none(m, k) else f(m) for k, f in cols.items()))
    return t


def _is_none(m, column: str) -> bool:
    attr = {
        "link": "predicted_s",
        "max abs err": "max_abs_err",
        "top-1 = plain": "top1_agreement",
        "accuracy": "accuracy",
        "plain acc": "plain_accuracy",
        "msgs/party": "sends_per_party",
        "linear %": "linear_share",
    }.get(column)
    return attr is not None and getattr(m, attr) in (None, [])


def prediction_table(r) -> Table | None:
    """Return the cost model's rounds and MB next to the measured ones, or None without predictions."""
    models = [m for m in r.models if m.predicted_rounds is not None]
    if not models:
        return None
    offline = any(m.offline_bytes or m.predicted_offline_bytes for m in models)
    share = any(m.predicted_linear_share is not None and m.linear_share is not None for m in models)
    cols = ("model", "rounds", "predicted", "MB/party", "predicted") + (("off MB", "predicted") if offline else ())
    cols += ("linear %", "predicted") if share else ()
    t = compact_table("cost model vs measured" + _insecure(r), cols)
    for m in models:
        row = [m.name, str(m.rounds), f"{m.predicted_rounds:.0f}"]
        row += [f"{max(m.bytes_per_party) / 1e6:.2f}", f"{m.predicted_bytes / 1e6:.2f}"]
        if offline:
            row += [f"{m.offline_bytes / 1e6:.2f}", f"{(m.predicted_offline_bytes or 0) / 1e6:.2f}"]
        if share:
            row += [f"{100 * (m.linear_share or 0):.0f}", f"{100 * (m.predicted_linear_share or 0):.0f}"]
        t.add_row(*row)
    return t


def choices_table(sel: dict) -> Table | None:
    """Return what the selector chose per site, what it costs and why (None: nothing chosen)."""
    if not sel or not sel.get("choices"):
        return None
    priced = sel.get("rounds") is not None
    title = f"selector {sel['selector']} under {sel['constraints']}"
    if priced:
        lat = ", ".join(f"{k.upper()} {v:.3g} s" for k, v in sel.get("latency_s", {}).items())
        title += f": {sel['rounds']:.0f} rounds, {sel['bytes'] / 1e6:.1f} MB/party, {lat} (modeled, batch 1)"
    t = Table(*CHOICE_COLUMNS, title=title)
    for row in choice_rows(sel):
        t.add_row(*row)
    return t


def run_summary(r) -> list:
    """Return the run's summary: the table of original, optimized and floor, the ratios, the report path."""

    base, opt, b = r.baseline, r.optimized[-1], r.bench
    models = {m["name"]: m for m in b["models"]}
    cols = ("model", "ReLUs", "test acc", "rounds", "MB/party", "off MB", "wall s", "WAN s", "+off")
    t = compact_table(f"relu-opt run: {r.config['model']} on {r.config['data']}; {bench_title(b)}", cols)
    agree = ", ".join(f"{m['name']} {m['top1_agreement']:.2f}" for m in b["models"])
    wan = b.get("networks", {}).get("wan", {})
    t.caption = (
        f"wall s: measured here; WAN s: modeled on {wan.get('rtt_ms', '?'):g} ms, {wan.get('bandwidth_MBps', '?'):g} "
        "MB/s (measured compute + round trips x RTT + bytes/bandwidth), online; off MB: "
        + (
            "the setup (once per session); +off: a session's first query, with it"
            if b.get("dealer") == "none"
            else "to and from the dealer; +off: WAN with it on the same link"
        )
        + f"; top-1 agreement with plaintext: {agree}"
    )
    t.caption_justify = "left"
    accs = {"original": base["test_accuracy"], "optimized": opt["accuracy_after"], "floor": None}
    for name in ("original", "optimized", "floor"):
        m = models.get(name)
        if m is None:
            continue
        acc = accs[name]
        t.add_row(
            name,
            f"{m['relu_elements']:,}",
            "-" if acc is None else f"{acc:.2f}%",
            str(m["rounds"]),
            f"{max(m['bytes_per_party']) / 1e6:.2f}",
            f"{m['offline_bytes'] / 1e6:.2f}",
            f"{m['wall_s_median']:.3f}",
            f"{m['wan_s']:.3f}",
            f"{m['wan_total_s']:.3f}",
        )
    lines: list = [t]
    ratio = b["ratios"].get("optimized", {})
    if ratio:
        lines.append(
            f"optimized vs original: {base['relu'] / max(after(opt), 1):.1f}x fewer ReLUs, "
            f"{opt['accuracy_after'] - base['test_accuracy']:+.2f} points test accuracy, "
            f"rounds x{ratio['rounds']:.2f}, bytes x{ratio['bytes_per_party']:.2f}, WAN latency x{ratio['wan_s']:.2f} "
            f"online, x{ratio['wan_total_s']:.2f} with offline"
        )
    if insecure_label(b):
        lines.append(f"[bold red]{insecure_label(b)}[/]: not private inference (--dealer {b['dealer']})")
    lines.append(f"report: {r.rundir}/report.md")
    return lines


def count_lines(c: Census) -> list:
    """Return the census table and its totals."""
    lines: list = [census_table(c)]
    lines.append(f"ReLU elements per sample: [bold]{c.total_relu:,}[/]   MACs: {c.total_macs:,}   params: {c.params:,}")
    others = ", ".join(f"{k} {v:,}" for k, v in sorted(c.totals_by_kind.items()) if k != "relu")
    if others:
        lines.append(f"other non-linear elements per sample: {others}")
    lines.append(f"secure comparisons per sample (ReLU, ReLU6, max-pool, ...): [bold]{c.total_comparisons:,}[/]")
    return lines


def export_lines(r) -> list:
    """Return what an ExportResult verified: parity with PyTorch and the elements on the ONNX graph."""
    lines = [
        f"wrote {r.path} (opset {r.opset})",
        f"parity vs PyTorch: max abs error {r.max_abs_err:.3g} (output scale {r.output_scale:.3g}, "
        f"relative {r.rel_err:.2g})",
        f"ONNX ReLU elements per sample: [bold]{r.onnx_relu:,}[/] (census {r.census_totals.get('relu', 0):,})",
    ]
    others = {k: v for k, v in r.onnx_totals.items() if k != "relu"}
    if others:
        lines.append("other non-linear ONNX elements: " + ", ".join(f"{k} {v:,}" for k, v in others.items()))
    return lines


def models_table(infos) -> Table:
    """Return the built-in architectures and their shipped weights."""
    t = Table("name", "default input", "pretrained (test acc)", "description")
    for m in infos:
        shipped = ", ".join(f"{d} ({acc:.2f}%)" for d, acc in m.pretrained) or "-"
        t.add_row(m.name, ",".join(map(str, m.default_input_shape)), shipped, m.description)
    return t


def bench_lines(r) -> list:
    """Return a bench's tables (cost, agreement, cost model vs measured) and ratios."""
    tables = [bench_table(r), agreement_table(r), prediction_table(r)]
    return [t for t in tables if t is not None] + [ratio_line(name, ratio) for name, ratio in r.ratios.items()]


def optimize_lines(results: list, auto: bool) -> list:
    """Return the optimize results table, elements by kind, and each selector's choices."""
    r0 = results[0]
    t = Table(
        "budget",
        "kept (ONNX)",
        "fewer",
        "test acc before",
        "test acc after",
        "folder",
        title=f"{r0.strategy} / {r0.replace} / {r0.granularity}",
    )
    for r in results:
        t.add_row(
            "-" if r.budget is None else f"{r.budget:,}",
            f"{r.elements_after:,}",
            "all" if r.elements_after == 0 else f"{r.elements_before / r.elements_after:.1f}x",
            f"{r.accuracy_before:.2f}%",
            f"{r.accuracy_after:.2f}%",
            r.outdir,
        )
    lines: list = [t]
    for r in results:
        if set(r.kinds) != {"relu"}:
            per = ", ".join(f"{k} {v['before']:,} -> {v['after']:,}" for k, v in r.kinds.items())
            lines.append(f"{r.outdir}: elements per sample by kind (ONNX after): {per}")
    lines += [t for t in (choices_table(r.selection) for r in results) if t is not None]
    lines += [f"{r.outdir}: structure: {structure_line(r.pruning)}" for r in results if r.pruning]
    return lines


def rank_table(crit) -> Table:
    """Return a Criticality's per-site table."""
    t = Table("site", "units", "elements/unit", "score", "mean unit score", title=f"{crit.strategy} criticality")
    for row in crit.to_dict()["sites"]:
        t.add_row(
            row["site"],
            f"{row['units']:,}",
            f"{row['unit_elements']:,}",
            f"{row['score']:.4g}",
            f"{row['mean_unit_score']:.4g}",
        )
    return t


def link_lines(m, rank: int) -> list:
    """Return a link measurement's table and the --link value it gives."""
    t = compact_table(f"link from party {rank} over {m.interface}", ("direction", "alone MB/s", "both at once MB/s"))
    for d, v in m.one_way_MBps.items():
        t.add_row(d, f"{v:.2f}", f"{m.duplex_MBps[d]:.2f}")
    return [
        t,
        f"RTT {m.rtt_ms:.3f} ms (median {m.rtt_median_ms:.3f}), bandwidth {m.bandwidth_MBps:.2f} MB/s per direction; "
        f"predict with: relu-opt bench ... --link {m.rtt_ms:.3f},{m.bandwidth_MBps:.2f}",
    ]


def usage_line(e) -> str:
    """Return a usage error (click's: a bad or missing option) as one line naming where help is."""
    ctx = getattr(e, "ctx", None)
    return f"error: {e.format_message()}" + (f" (see {ctx.command_path} --help)" if ctx is not None else "")


def train_line(r) -> str:
    """Return the line `relu-opt train` ends with: accuracies, the file written, and where it resumed."""
    resumed = f" (resumed from epoch {r.result.resumed_from + 1})" if r.result.resumed_from else ""
    return f"val accuracy {r.val_accuracy:.2f}%, test accuracy {r.test_accuracy:.2f}%; wrote {r.path}{resumed}"
