"""Selectors: the ReLU-count objective against the latency-priced one, constraints, and prices that add up."""

import json

import pytest
import torch

from relu_opt.activations import MaskedSite, Poly
from relu_opt.backends import WAN
from relu_opt.backends.crypten.calibration import calibrate
from relu_opt.backends.crypten.cost_model import features
from relu_opt.data import load_dataset
from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.passes.replace import replace_sites, site_op
from relu_opt.poly_fit import refit_in_order
from relu_opt.ranking import Criticality
from relu_opt.selection import Constraints, Prices, SitePrice, get_selector
from relu_opt.sites import SiteInfo


def _toy(n_sites: int = 4, channels: int = 8, per_channel: int = 10):
    """Sites of equal shape with random channel scores; a ReLU site costs 9 rounds, a replaced one 1."""
    gen = torch.Generator().manual_seed(0)
    sites = {f"s{i}": SiteInfo(f"s{i}", "relu", (channels, per_channel), "channel") for i in range(n_sites)}
    crit = Criticality(
        "random",
        "channel",
        {s: torch.rand(channels, 1, generator=gen) for s in sites},
        {s: per_channel for s in sites},
    )
    e = channels * per_channel
    price = SitePrice("relu", e, 9, e * 464, 1, e * 16, 11, 464, 48)
    prices = Prices({s: price for s in sites}, other_rounds=5, other_bytes=1e5, network=WAN)
    return sites, crit, prices


def _open_sites(sel) -> int:
    return sum(c.action != "replace" for c in sel.choices)


def test_latency_selector_packs_the_budget_into_few_sites():
    sites, crit, prices = _toy()
    c = Constraints(elements=100)
    count = get_selector("count").select(crit, sites, c, prices)
    latency = get_selector("latency").select(crit, sites, c, prices)
    for sel in (count, latency):
        assert sum(ch.kept for ch in sel.choices) <= 100
    # The count selector spreads the best channels over every site; the latency one fills few sites,
    # so it pays fewer 9-round comparisons.
    assert _open_sites(count) >= 3
    assert _open_sites(latency) <= 2
    assert latency.rounds < count.rounds
    assert latency.rounds == prices.total({ch.site: ch.kept for ch in latency.choices})[0]


def test_rounds_and_latency_budgets_bind():
    sites, crit, prices = _toy()
    none = prices.total({})[0]  # 5 + 4 x 1
    sel = get_selector("latency").select(crit, sites, Constraints(rounds=none + 10), prices)
    assert sel.rounds <= none + 10 and _open_sites(sel) == 1  # one site fits, kept whole (9 rounds, not 11)
    assert [ch.action for ch in sel.choices].count("keep") == 1
    wan = prices.latency(*prices.total({}))
    sel = get_selector("latency").select(crit, sites, Constraints(latency_s=wan + 0.5), prices)
    assert sel.latency_s["wan"] <= wan + 0.5
    with pytest.raises(ValueError, match="even with every site replaced"):
        get_selector("latency").select(crit, sites, Constraints(rounds=none - 1), prices)


def test_refit_in_order_keeps_a_deep_polynomial_stack_bounded():
    """Fitted on the original model's inputs only, 19 stacked polynomials grow; refitted in order, each
    sees its real input and the output stays near the ReLU network's."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(64, 1, 28, 28)
    gm = propagate_shapes(trace(model), x[:1])
    from relu_opt.poly_fit import collect_stats, fit_poly

    stats = collect_stats(gm, [x])
    nodes = {n.name: n for n in gm.graph.nodes}
    new = {s: MaskedSite(torch.zeros(1), Poly(fit_poly(st)), site_op(gm, nodes[s]), "relu") for s, st in stats.items()}
    student = replace_sites(gm, new)
    with torch.no_grad():
        ref = model(x).abs().mean()
        before = student(x).abs().mean()
        errors = refit_in_order(student, [x])
        after = student(x).abs().mean()
    assert len(errors) == 19
    assert not torch.isfinite(before) or before > 10 * ref  # the stack fitted on the ReLU net's inputs blows up
    assert abs(after / ref - 1) < 0.5


@pytest.mark.slow
@pytest.mark.parties
def test_optimize_reports_modeled_costs_that_match_the_exported_model(tmp_path):
    """The selection's modeled rounds are those of the cost model on the model optimize saved."""
    from relu_opt.plan import load
    from relu_opt.training import TrainConfig, fit

    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    fit(model, data, TrainConfig(epochs=2, lr=0.05), progress=False)
    cost = calibrate()  # the count selector prices with a cached cost model only
    results = {}
    for selector in ("count", "latency"):
        cfg = OptimizeConfig(budget=300, epochs=0, strategy="random", rank_samples=64, selector=selector)
        results[selector] = optimize(model, data, cfg, tmp_path / selector, base_spec="small_cnn", progress=False)
    lat, count = results["latency"], results["count"]
    assert lat.elements_after <= 300 and count.elements_after <= 300
    for name, r in results.items():
        prepared = prepare_for_pi(load(tmp_path / name), data.val.x[:1])
        assert r.selection["rounds"] == pytest.approx(cost.rounds(features(prepared)), abs=0.5), name
        assert r.selection["bytes"] == pytest.approx(cost.bytes(features(prepared)), rel=0.02), name
    assert lat.selection["rounds"] < count.selection["rounds"]


@pytest.mark.slow
@pytest.mark.parties
def test_no_budget_finds_the_lowest_latency_within_the_accuracy_limit(tmp_path):
    """Latency targets cheapest first: one no model fits is skipped (and remembered), one whose accuracy
    falls too far fails, the first that holds is the result; a rerun reads the ledger instead of redoing."""
    from relu_opt.optimizer import modeled_latency, optimize_lowest_latency
    from relu_opt.training import TrainConfig, fit

    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    fit(model, data, TrainConfig(epochs=2, lr=0.05), progress=False)
    cfg = OptimizeConfig(budget=None, epochs=0, strategy="random", rank_samples=64, max_drop=100.0)
    original = modeled_latency(model, data.train.x[:1], cfg)
    fractions = (0.01, 0.5, 0.9)
    r = optimize_lowest_latency(model, data, cfg, tmp_path, base_spec="small_cnn", progress=False, fractions=fractions)
    assert r.selection["latency_s"]["wan"] <= 0.5 * original + 1e-6
    assert r.outdir.endswith(f"latency_{round(0.5 * original, 4):g}s")
    ledger = json.loads((tmp_path / ".work" / "auto.json").read_text())
    assert len(ledger) == 1 and "even with every site replaced" in next(iter(ledger.values()))
    strict = OptimizeConfig(**{**cfg.__dict__, "max_drop": -1.0})  # nothing can hold: every level fails
    with pytest.raises(Exception, match="no latency target met the accuracy limit"):
        optimize_lowest_latency(model, data, strict, tmp_path / "s", progress=False, fractions=fractions)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--selector", "nope"], "--selector 'nope' is not known; choose one of count, latency"),
        (["--network", "40"], "--network '40' must be RTT_MS,MB_PER_S"),
        (["--rounds-budget", "-1"], "--rounds-budget"),
        (["--latency-budget", "nan"], "--latency-budget nan is not a finite number"),
        (["--selector", "count", "--rounds-budget", "60"], "need --selector latency"),
        (["--selector", "count"], "--selector count needs --budget"),
    ],
)
def test_bad_selection_options_are_one_line(tmp_path, extra, message):
    from typer.testing import CliRunner

    from relu_opt.cli import app

    args = ["optimize", "small_cnn", "--data", "synthetic", "--input-shape", "1,1,12,12", "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args + extra)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_refit_in_order_moves_the_training_clamp_to_the_new_inputs():
    """The clamp follows each polynomial's refitted inputs: train_range x their largest magnitude."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1).eval()
    x = torch.randn(32, 1, 12, 12)
    gm = propagate_shapes(trace(model), x[:1])
    from relu_opt.poly_fit import collect_stats, fit_poly

    nodes = {n.name: n for n in gm.graph.nodes}
    stats = collect_stats(gm, [x])
    new = {
        s: MaskedSite(torch.zeros(1), Poly(fit_poly(st), input_range=torch.ones(1)), site_op(gm, nodes[s]), "relu")
        for s, st in stats.items()
    }
    student = replace_sites(gm, new).eval()
    refit_in_order(student, [x], train_range=2.0)
    seen = {}

    def hook(name):
        return lambda mod, inp, out: seen.__setitem__(name, inp[0].abs().transpose(0, 1).flatten(1).amax(1))

    sites = {n: m for n, m in student.named_modules() if isinstance(m, MaskedSite)}
    handles = [m.register_forward_hook(hook(n)) for n, m in sites.items()]
    with torch.no_grad():
        student(x)
    for h in handles:
        h.remove()
    for name, m in sites.items():
        assert torch.allclose(m.replacement.input_range, 2.0 * seen[name], rtol=1e-5), name


def test_latency_selector_is_never_slower_than_the_original_on_lan_or_wan():
    """Cheetah-like prices: a replacement saves many round trips (WAN) but costs more bytes (LAN). A selection
    made for WAN that would be slower on a LAN keeps sites whole, most saving first, until it is not."""
    from relu_opt.backends import LAN

    sites, crit, _ = _toy(channels=8, per_channel=125_000)
    e = 8 * 125_000
    costly = SitePrice("relu", e, 40, e * 98, 1, e * 200, 41, 98, 200)  # its replacement is slower on a LAN
    cheap = SitePrice("relu", e, 40, e * 98, 1, e * 96, 41, 98, 96)
    table = {"s0": costly, "s1": costly, "s2": cheap, "s3": cheap}
    prices = Prices(table, other_rounds=5, other_bytes=1e5, network=WAN)
    everything = {s: e for s in sites}
    original = {n.name: prices.latency(*prices.total(everything), n) for n in (LAN, WAN)}
    none = {s: 0 for s in sites}
    assert prices.latency(*prices.total(none), LAN) > original["lan"]  # replacing all is slower on a LAN
    with pytest.raises(ValueError, match="as fast as the original on both LAN and WAN"):
        get_selector("latency").select(crit, sites, Constraints(latency_s=0.4 * original["wan"]), prices)
    sel = get_selector("latency").select(crit, sites, Constraints(latency_s=0.6 * original["wan"]), prices)
    kept = {c.site: c.kept for c in sel.choices}
    assert prices.latency(*prices.total(kept), LAN) <= original["lan"] * (1 + 1e-9)
    assert prices.latency(*prices.total(kept), WAN) <= 0.6 * original["wan"]
    actions = {c.site: c.action for c in sel.choices}
    assert "keep" in (actions["s0"], actions["s1"]) and "replace" in actions.values()


def test_a_site_whose_replacement_costs_more_is_kept_and_the_choice_says_why():
    sites, crit, _ = _toy(channels=8, per_channel=125_000)
    e = 8 * 125_000
    dearer = SitePrice("relu", e, 5, e * 98, 1, e * 400, 6, 98, 400)  # a square's bytes outweigh its round trips
    prices = Prices({s: dearer for s in sites}, other_rounds=5, other_bytes=1e5, network=WAN)
    sel = get_selector("latency").select(crit, sites, Constraints(), prices)
    assert all(c.action == "keep" for c in sel.choices)
    assert all("keeping it costs less than its replacement on wan (5 vs 1 round trips" in c.why for c in sel.choices)


def test_a_goal_that_only_keeping_sites_meets_is_met_by_keeping_them():
    """Under Cheetah a square costs more bytes than the ReLU it replaces: on a link where bytes decide, a goal
    between the original's cost and the all-replaced cost is met only by keeping sites, which the selector
    now does (it used to refuse: 'even with every site replaced ...')."""
    from relu_opt.backends import Network

    sites, crit, _ = _toy()
    e = 80
    price = SitePrice("relu", e, 2, e * 98, 2, e * 309, 4, 98, 309)
    slow = Network("slow", 1e-4, 1e4)
    prices = Prices({s: price for s in sites}, other_rounds=5, other_bytes=1e5, network=slow)
    kept_all = prices.latency(*prices.total({s: e for s in sites}), slow)
    replaced = prices.latency(*prices.total({s: 0 for s in sites}), slow)
    assert kept_all < replaced
    sel = get_selector("latency").select(crit, sites, Constraints(latency_s=kept_all * 1.01, network=slow), prices)
    assert all(c.action == "keep" for c in sel.choices)
    assert all("keeping it costs less than its replacement on slow" in c.why for c in sel.choices)
    with pytest.raises(ValueError, match="even with every site replaced"):
        get_selector("latency").select(crit, sites, Constraints(latency_s=kept_all * 0.99, network=slow), prices)
