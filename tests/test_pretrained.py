"""Shipped pretrained weights: loaded by name, sha256-checked, and as accurate as their record says."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import relu_opt
from relu_opt.cli import app
from relu_opt.data import load_dataset
from relu_opt.errors import ModelSpecError, WeightsError
from relu_opt.loading import resolve_model
from relu_opt.models import pretrained
from relu_opt.training import evaluate

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_every_record_names_a_file_with_its_sha256():
    records = pretrained.list_pretrained()
    assert {(r.model, r.dataset) for r in records} >= {("resnet20", "fashion-mnist")}
    for r in records:
        assert r.path.is_file() and pretrained._sha256(r.path) == r.sha256
        assert r.command.startswith("relu-opt train " + r.model) and f"--seed {r.seed}" in r.command
        assert 0 < r.val_accuracy <= 100 and 0 < r.test_accuracy <= 100


def test_create_model_pretrained_takes_the_records_head_and_channels():
    m = relu_opt.create_model("resnet20", pretrained=True).eval()
    rec = pretrained.get_pretrained("resnet20", "fashion-mnist")
    assert m(torch.zeros(rec.input_shape)).shape == (1, rec.num_classes)
    fresh = relu_opt.create_model("resnet20", num_classes=10, in_channels=1)
    assert not torch.equal(fresh.state_dict()["fc.weight"], m.state_dict()["fc.weight"])
    with pytest.raises(ModelSpecError, match="num_classes=100 does not match"):
        relu_opt.create_model("resnet20", num_classes=100, pretrained=True)
    with pytest.raises(ModelSpecError, match="no pretrained weights for 'cifar10'"):
        relu_opt.create_model("resnet20", pretrained="cifar10")
    with pytest.raises(ModelSpecError, match="no pretrained weights ship for 'vgg16'"):
        relu_opt.create_model("vgg16", pretrained=True)
    with pytest.raises(ModelSpecError, match="zoo models only"):
        resolve_model("torchvision.models:resnet18", pretrained=True)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_shipped_resnet20_scores_what_its_record_says():
    rec = pretrained.get_pretrained("resnet20", "fashion-mnist")
    ds = load_dataset("fashion-mnist")
    m = relu_opt.create_model("resnet20", pretrained="fashion-mnist").eval()
    _, acc = evaluate(m, ds.test.subset(2000))
    assert rec.test_accuracy >= 93.5
    assert abs(100 * acc - rec.test_accuracy) < 1.5  # a 2,000-image subset of the recorded 10,000


def test_damaged_file_is_refused(tmp_path, monkeypatch):
    shutil.copytree(pretrained.WEIGHTS_DIR, tmp_path / "weights")
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "weights")
    pretrained._records.cache_clear()
    try:
        f = tmp_path / "weights" / "resnet20_fashion-mnist.pt"
        f.write_bytes(f.read_bytes()[:1000])
        with pytest.raises(WeightsError, match="sha256 .* damaged or was replaced"):
            relu_opt.create_model("resnet20", pretrained=True)
        f.unlink()
        with pytest.raises(WeightsError, match="is missing; reinstall"):
            relu_opt.create_model("resnet20", pretrained=True)
    finally:
        pretrained._records.cache_clear()


def test_cli_pretrained(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["count", "resnet20", "--pretrained", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["total_relu"] == 16 * 28 * 28 * 7 + 32 * 14 * 14 * 6 + 64 * 7 * 7 * 6  # 28x28 input, 1 channel
    r = runner.invoke(app, ["count", "resnet20", "--pretrained", "--weights", str(tmp_path / "c.json")])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(app, ["count", "vgg16", "--pretrained"])
    assert r.exit_code == 2 and "no pretrained weights ship for 'vgg16'" in r.output
    r = runner.invoke(app, ["models"])
    assert "fashion-mnist" in r.output
