"""`relu-opt run` end to end on a tiny configuration (digits, 2 CrypTen parties)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relu_opt import pipeline
from relu_opt.backends import Pricing
from relu_opt.cli import app
from relu_opt.optimizer import OptimizeConfig
from relu_opt.pipeline import RunConfig

TINY = ["small_cnn", "--data", "digits", "--baseline-epochs", "2", "--epochs", "1", "--samples", "4"]


@pytest.mark.slow
@pytest.mark.parties
def test_run_end_to_end_then_cached_rerun(tmp_path):
    # no budget: the lowest modeled latency within --max-drop (wide here: a 2-epoch digits baseline)
    runner = CliRunner()
    args = [*TINY, "--max-drop", "50", "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    r = runner.invoke(app, ["run", *args])
    assert r.exit_code == 0, r.output
    assert "optimized vs original" in r.output
    (rundir,) = (tmp_path / "runs").iterdir()
    for name in ("report.md", "report.json", "census.png", "pareto.png"):
        assert (rundir / name).is_file(), name
    report = json.loads((rundir / "report.json").read_text())
    assert report["baseline"]["cached"] is False
    models = {m["name"]: m for m in report["bench"]["models"]}
    assert set(models) == {"original", "optimized", "floor"}
    assert models["optimized"]["relu_elements"] < models["original"]["relu_elements"] == report["baseline"]["relu"]
    assert models["floor"]["relu_elements"] == 0
    # Bytes fall with the ReLUs removed; rounds only when whole sites lose every ReLU (a partly kept site
    # pays the comparison's rounds plus the polynomial's), so they are only bounded by the floor here.
    assert models["floor"]["rounds"] < models["optimized"]["rounds"]
    size = {n: max(m["bytes_per_party"]) for n, m in models.items()}
    assert size["floor"] < size["optimized"] < size["original"]
    opt = report["optimized"][0]
    folder = Path(opt["outdir"]).name
    assert opt["budget"] is None and folder.startswith("latency_")  # the first level, 0.35x, met the limit
    assert (rundir / folder / "model.onnx").is_file()
    # one private query at a time: costs per query, accuracy over all 4 samples
    assert report["bench"]["batch"] == 1 and report["bench"]["samples"] == 4
    assert len(models["optimized"]["wall_s_runs"]) == 2
    md = (rundir / "report.md").read_text()
    assert "crypten" in md and "top-1 agreement" in md and "relu-opt" in md and "one private query" in md
    # the cost model's price of each result, and its prediction next to every benched model
    modeled = report["modeled"][folder]
    assert modeled["optimized"]["rounds"] < modeled["original"]["rounds"]
    assert modeled["optimized"]["bytes_per_party"] < modeled["original"]["bytes_per_party"]
    assert "## Accuracy and modeled latency" in md and f"| {modeled['optimized']['wan_s']:.3f} |" in md
    assert all(m["predicted_rounds"] > 0 and m["predicted_bytes"] > 0 for m in models.values())
    assert (rundir / folder / "modeled_cost.json").is_file()

    (rundir / "report.md").unlink()
    assert runner.invoke(app, ["report", str(rundir)]).exit_code == 0
    assert (rundir / "report.md").read_text() == md

    again = runner.invoke(app, ["run", *args])
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output
    newest = max((tmp_path / "runs").iterdir())
    assert json.loads((newest / "report.json").read_text())["baseline"]["cached"] is True


@pytest.mark.slow
@pytest.mark.parties
def test_interrupted_run_resumes(tmp_path, monkeypatch):
    # the count selector's default: one budget, 1/10 of the ReLUs
    opt = OptimizeConfig(epochs=1, selector="count", pricing=Pricing(cache=str(tmp_path / "cache")))
    cfg = RunConfig(model="small_cnn", data="digits", baseline_epochs=2, samples=4, optimize=opt)
    real = pipeline.optimize

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "optimize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-written
    monkeypatch.setattr(pipeline, "optimize", real)
    logs = []
    r = pipeline.run(cfg, runs_dir=tmp_path / "runs", log=logs.append)
    assert r.baseline["cached"] is True and any("reusing" in m for m in logs)
    assert r.optimized[0]["budget"] == r.baseline["relu"] // 10


def test_report_needs_a_run_folder(tmp_path):
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no report.json" in r.output
