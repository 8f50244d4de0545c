"""Cost studies need no dataset: `optimize --data synthetic --input-shape N,C,H,W`, and `--epochs 0` trains
nothing at all."""

import json

import torch
from typer.testing import CliRunner

from relu_opt.cli import app
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.optimizer import OptimizeConfig, optimize

runner = CliRunner()


def test_epochs_zero_changes_no_weight(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = OptimizeConfig(budget=100, epochs=0, strategy="random", rank_samples=64, fit_samples=64)
    r = optimize(model, load_dataset("synthetic", n=600), cfg, tmp_path / "o", base_spec="small_cnn", progress=False)
    assert r.elements_after <= 100 < r.elements_before
    assert r.finetune == {"epochs": 0, "steps": 0, "start": "original"}
    saved = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    convs = [k for k in before if k.endswith("weight")]
    assert convs
    for k in convs:  # the linear layers are the model's own: not one optimizer step was taken
        match = [s for s in saved if s.endswith(k)]
        assert match, k
        assert torch.equal(saved[match[0]], before[k]), k


def test_synthetic_data_of_any_shape_from_the_cli(tmp_path):
    out = tmp_path / "o"
    args = ["optimize", "small_cnn", "--data", "synthetic", "--input-shape", "1,3,16,16", "--budget", "200"]
    args += ["--epochs", "0", "--strategy", "random", "--rank-samples", "64", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "budget_200" / "plan.json").read_text())
    assert tuple(plan["input_shape"]) == (1, 3, 16, 16)
    assert plan["num_classes"] == 10
    report = json.loads((out / "budget_200" / "report.json").read_text())["result"]
    assert report["elements_after"] <= 200 < report["elements_before"]
    assert report["finetune"]["steps"] == 0


def test_input_shape_must_match_a_real_dataset(tmp_path):
    args = ["optimize", "small_cnn", "--data", "digits", "--input-shape", "1,3,32,32", "--budget", "10"]
    r = runner.invoke(app, args + ["-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "does not match digits's inputs" in r.output
