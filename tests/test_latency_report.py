"""Reports price what private inference pays: each optimize folder and frontier shows the cost model's
rounds, MB per party and LAN/WAN latency next to accuracy, and a bench shows predicted next to measured."""

import json

import pytest
import torch

import relu_opt
from relu_opt import atomic
from relu_opt.backends import LAN, WAN
from relu_opt.backends.crypten import calibration as cost_calibration
from relu_opt.backends.crypten.cost_model import CrypTenCostModel as CostModel
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.optimizer import OptimizeConfig

# A stand-in for the fitted model (the real one needs a CrypTen calibration run): CrypTen-like prices,
# two round trips of the link per round, no dealer traffic.
ROUNDS = {"linear": 1.0, "relu": 9.0, "poly": 3.0, "square": 1.0, "avgpool": 0.0, "mul": 1.0}
COST = CostModel(
    2,
    ROUNDS,
    {"linear": 16.0, "relu": 464.0, "poly": 48.0, "square": 16.0, "poly_coeffs": 16.0, "mul": 32.0},
    round_trips_per_op={k: 2 * v for k, v in ROUNDS.items()},
)


@pytest.fixture
def frontier(tmp_path, monkeypatch):
    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "cache"))
    atomic.write_json(cost_calibration._cache_path(2, "third-party", None), COST.to_dict())
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    cfg = OptimizeConfig(budget=0, epochs=0, strategy="random", rank_samples=64, fit_samples=64)
    data = load_dataset("synthetic", n=300)
    results = relu_opt.optimize(
        model, data, budgets=[3000, 100], outdir=tmp_path / "o", config=cfg, base_spec="small_cnn"
    )
    return tmp_path / "o", results


def _latency(m: dict, net) -> float:
    return 2 * m["rounds"] * net.rtt_s + m["bytes_per_party"] / 2 / net.bandwidth_Bps


def test_each_budget_reports_its_modeled_cost(frontier):
    out, results = frontier
    for r in results:
        costs = json.loads((out / f"budget_{r.budget}" / "modeled_cost.json").read_text())
        assert costs.pop("priced_by") == "CrypTen, 2 parties, dealer third-party"
        assert set(costs) == {"original", "optimized", "floor"}
        for m in costs.values():  # communication only, the full-duplex model: half the bytes each way
            assert m["lan_s"] == pytest.approx(_latency(m, LAN)) and m["wan_s"] == pytest.approx(_latency(m, WAN))
            # the stand-in prices no dealer traffic: with the offline part the latency is the same
            assert m["offline_bytes"] == 0 and m["wan_total_s"] == pytest.approx(m["wan_s"])
        orig, opt, floor = costs["original"], costs["optimized"], costs["floor"]
        assert floor["bytes_per_party"] < opt["bytes_per_party"] < orig["bytes_per_party"]
        assert floor["rounds"] < orig["rounds"]
        md = (out / f"budget_{r.budget}" / "report.md").read_text()
        assert "## Modeled encrypted cost" in md
        assert f"| optimized | {opt['rounds']:.0f} | {opt['bytes_per_party'] / 1e6:.2f} |" in md
    a, b = (json.loads((out / f"budget_{n}" / "modeled_cost.json").read_text()) for n in (3000, 100))
    assert a["original"] == b["original"]  # one base model
    assert b["optimized"]["bytes_per_party"] < a["optimized"]["bytes_per_party"]  # fewer ReLUs, fewer bytes


def test_frontier_has_latency_columns_and_panels(frontier):
    out, _ = frontier
    pareto = json.loads((out / "pareto.json").read_text())
    assert {"relu", "test_accuracy"} <= set(pareto["baseline"])  # today's fields stay
    assert pareto["baseline"]["modeled_wan_s"] > 0
    for row in pareto["rows"]:
        costs = json.loads((out / f"budget_{row['budget']}" / "modeled_cost.json").read_text())
        assert row["modeled_wan_s"] == costs["optimized"]["wan_s"]
        assert row["modeled_rounds"] == costs["optimized"]["rounds"]
        assert {"budget", "relu", "test_accuracy", "wall_s", "outdir"} <= set(row)
    md = (out / "pareto.md").read_text()
    assert "| rounds | MB/party | LAN s | WAN s |" in md
    png = (out / "pareto.png").read_bytes()
    width = int.from_bytes(png[16:20], "big")  # three panels: ReLUs, WAN and LAN latency
    assert width > 1500


def test_no_cost_model_means_no_modeled_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "empty"))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    # The count selector needs no prices; the latency selector would measure the cost model once.
    cfg = OptimizeConfig(budget=100, epochs=0, strategy="random", rank_samples=64, fit_samples=64, selector="count")
    relu_opt.optimize(model, load_dataset("synthetic", n=300), budgets=[100], outdir=tmp_path / "o", config=cfg)
    assert not (tmp_path / "o" / "budget_100" / "modeled_cost.json").exists()
    assert "No cost model is cached yet" in (tmp_path / "o" / "budget_100" / "report.md").read_text()
    assert "WAN s" not in (tmp_path / "o" / "pareto.md").read_text()
    assert not list((tmp_path / "empty").glob("cost_model_*"))  # nothing was measured


def test_bench_prints_predicted_next_to_measured():
    from rich.console import Console

    from relu_opt.encrypted import BenchResult, ModelReport
    from relu_opt.render import prediction_table

    def report(name, rounds, mb, pred_rounds, pred_mb):
        return ModelReport(
            name, 0, rounds, [int(mb * 1e6)] * 2, 1.0, [1.0], 0.0, 0.0, None, None, None, None, 0.0, 0.0,
            predicted_rounds=pred_rounds, predicted_bytes=None if pred_mb is None else pred_mb * 1e6,
        )  # fmt: skip

    r = BenchResult(2, 1, (report("original", 174, 716.9, 176.0, 713.2), report("floor", 21, 200.0, 21.0, 199.5)))
    console = Console(width=80, record=True)
    console.print(prediction_table(r))
    text = console.export_text()
    rows = [line.split() for line in text.splitlines()]
    assert ["model", "rounds", "predicted", "MB/party", "predicted"] in rows
    assert ["original", "174", "176", "716.90", "713.20"] in rows and ["floor", "21", "21", "200.00", "199.50"] in rows
    assert prediction_table(BenchResult(2, 1, (report("x", 1, 1.0, None, None),))) is None


def test_selection_and_reports_are_priced_by_the_pricing_they_are_given(tmp_path, monkeypatch):
    """`run --parties 3 --cache-dir X`: the optimizer selects with the 3-party cost model in X (not a
    2-party one, not the default cache), and its report says what priced it."""
    from relu_opt.backends import Pricing
    from relu_opt.pipeline import RunConfig
    from relu_opt.plan import load

    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "default"))  # empty: nothing to fall back on
    x = tmp_path / "x"
    three = CostModel(
        3,
        {**COST.rounds_per_op, "relu": 20.0},
        {**COST.bytes_per_element, "relu": 900.0},
        round_trips_per_op={**COST.round_trips_per_op, "relu": 60.0},
    )
    atomic.write_json(cost_calibration._cache_path(2, "third-party", x), COST.to_dict())
    atomic.write_json(cost_calibration._cache_path(3, "third-party", x), three.to_dict())
    pricing = RunConfig(optimize=OptimizeConfig(pricing=Pricing(parties=3))).pricing(x)
    assert pricing == Pricing(parties=3, cache=str(x))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    cfg = OptimizeConfig(budget=3000, epochs=0, strategy="random", rank_samples=64, fit_samples=64, pricing=pricing)
    r = relu_opt.optimize(
        model, load_dataset("synthetic", n=300), outdir=tmp_path / "o", config=cfg, base_spec="small_cnn"
    )
    prepared = pricing.engine().prepare(load(r.outdir), torch.zeros(1, 1, 28, 28))
    assert r.selection["rounds"] == pytest.approx(three.cost(prepared).rounds)
    assert three.cost(prepared).rounds != pytest.approx(COST.cost(prepared).rounds)
    costs = json.loads((tmp_path / "o" / "modeled_cost.json").read_text())
    assert costs["priced_by"] == "CrypTen, 3 parties, dealer third-party"
    assert costs["optimized"]["rounds"] == pytest.approx(three.cost(prepared).rounds)
    assert not (tmp_path / "default").exists()  # nothing was read from, or measured into, the default cache
