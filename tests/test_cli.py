import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from typer.testing import CliRunner

from relu_opt.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_everywhere():
    for cmd in ([], ["count"], ["export"], ["models"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0, r.output
        assert "Usage" in r.output


def test_models_lists_zoo():
    r = invoke("models")
    assert r.exit_code == 0
    for name in ("resnet18", "resnet20", "resnet32", "resnet56", "wide_resnet22_8", "vgg16", "small_cnn"):
        assert name in r.output


@pytest.mark.parametrize("name,total", [("resnet18", 557_056), ("resnet20", 188_416), ("wide_resnet22_8", 1_392_640)])
def test_count_json(name, total, tmp_path):
    path = tmp_path / "r.json"
    r = invoke("count", name, "--json", path)
    assert r.exit_code == 0, r.output
    data = json.loads(path.read_text())
    assert data["total_relu"] == total
    assert data["model"] == name and data["input_shape"] == [1, 3, 32, 32]
    assert {"total_macs", "params", "sites", "totals_by_kind"} <= set(data)
    assert set(data["sites"][0]) >= {"name", "kind", "shape", "elements", "macs"}
    assert sum(s["elements"] for s in data["sites"] if s["kind"] == "relu") == total
    assert f"{total:,}" in r.output


def test_count_fashion_mnist_shape(tmp_path):
    path = tmp_path / "r.json"
    assert invoke("count", "resnet20", "--input-shape", "1,1,28,28", "--json", path).exit_code == 0
    assert json.loads(path.read_text())["total_relu"] == 144_256


def test_export_prints_parity_and_count(tmp_path):
    weights = tmp_path / "w.pt"
    from relu_opt.models import create_model

    torch.save(create_model("small_cnn").state_dict(), weights)
    out = tmp_path / "m.onnx"
    r = invoke("export", "small_cnn", "-o", out, "--weights", weights, "--opset", "13")
    assert r.exit_code == 0, r.output
    assert "max abs error" in r.output and "ONNX ReLU elements per sample: 28,672" in r.output
    assert onnx.load(out).opset_import[0].version == 13


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "relu_opt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.slow
def test_errors_are_one_line_with_exit_2(tmp_path):
    (tmp_path / "gated.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Gated(nn.Module):
                default_input_shape = (1, 4)

                def forward(self, x):
                    if x.sum() > 0:
                        return x.relu()
                    return x
            """
        )
    )
    r = _cli("count", f"{tmp_path}/gated.py:Gated")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "gated.py:8" in r.stderr and "--leaf Gated" in r.stderr
    r = _cli("--debug", "count", f"{tmp_path}/gated.py:Gated")
    assert r.returncode != 0 and "Traceback" in r.stderr

    r = _cli("count", "resnet20", "--input-shape", "1,three,32")
    assert r.returncode == 2 and "--input-shape '1,three,32'" in r.stderr
    r = _cli("count", "resnet20", "--weights", tmp_path / "missing.pt")
    assert r.returncode == 2 and "missing.pt' does not exist" in r.stderr
    r = _cli("count", "nosuchmodel")
    assert r.returncode == 2 and "unknown model 'nosuchmodel'" in r.stderr
