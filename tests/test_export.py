import sys

import onnx
import pytest
import torch
from torch import nn

import relu_opt
from relu_opt.errors import ExportError
from relu_opt.models import create_model, list_models
from relu_opt.onnx_export import export, onnx_census, to_onnx_bytes


@pytest.mark.parametrize("name", list_models())
def test_zoo_onnx_parity_and_relu_count(name, tmp_path):
    model = create_model(name)
    x = torch.randn(1, 3, 32, 32)
    c = relu_opt.count(model, x)
    r = relu_opt.export(model, x, tmp_path / f"{name}.onnx")
    assert r.onnx_relu == c.total_relu
    assert r.onnx_totals.get("maxpool", 0) == c.totals_by_kind.get("maxpool", 0)
    assert r.rel_err < 1e-4
    mp = onnx.load(tmp_path / f"{name}.onnx")
    onnx.checker.check_model(mp)
    assert mp.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("opset", [11, 13, 20])
def test_opsets(opset, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    r = relu_opt.export(model, torch.randn(1, 1, 12, 12), tmp_path / "m.onnx", opset=opset)
    assert r.opset == opset and r.onnx_relu == 4 * 8 * 8
    assert r.onnx_totals["maxpool"] == 4 * 4 * 4 * 3


def test_clamp_min_zero_counts_as_relu_in_onnx():
    class M(nn.Module):
        def forward(self, x):
            return torch.clamp(x, min=0) + x.relu()

    mp = onnx.load_from_string(to_onnx_bytes(M(), torch.randn(1, 6)))
    assert onnx_census(mp, (1, 6)).total_relu == 12


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    model = create_model("small_cnn")
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="census has 1"):
        export(model, torch.randn(1, 3, 32, 32), target, census_totals={"relu": 1})
    assert not target.exists() and not list(tmp_path.iterdir())

    # the module is reached through sys.modules (relu_opt.export is the API function)
    monkeypatch.setattr(sys.modules["relu_opt.onnx_export"], "check_parity", lambda *a, **k: (1.0, 1.0))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export(model, torch.randn(1, 3, 32, 32), target)
    assert not target.exists()


def test_export_keeps_model_mode(tmp_path):
    model = create_model("small_cnn").train()
    relu_opt.export(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert model.training


def test_non_finite_model_output_is_named(tmp_path):
    class Overflow(nn.Module):
        def forward(self, x):
            return torch.exp(x * 1e4)

    with pytest.raises(ExportError, match="model's own output is NaN or infinite"):
        export(Overflow(), torch.ones(1, 4), tmp_path / "o.onnx")
