import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu_opt
from relu_opt import ops
from relu_opt.backends.crypten.cost_model import features
from relu_opt.graph import propagate_shapes, trace
from relu_opt.onnx_export import onnx_census, to_onnx_bytes
from relu_opt.passes.census import annotate, census


class Mixed(nn.Module):
    """GELU, SiLU, sigmoid, softmax and a hand-written rsqrt LayerNorm on (N, 6, 16) tokens."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        h = self.ln(x)
        h = F.gelu(self.fc(h)) + nn.functional.silu(h) + torch.sigmoid(h)
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        h = (h - mu) * torch.rsqrt(var + 1e-5)
        return torch.softmax(h, -1)


def test_fx_and_onnx_census_agree_on_every_kind():
    x = torch.randn(1, 6, 16)
    c = relu_opt.count(Mixed(), x)
    assert c.totals_by_kind == {"layernorm": 96, "gelu": 96, "silu": 96, "sigmoid": 96, "rsqrt": 6, "softmax": 96}
    mp = onnx.load_from_string(to_onnx_bytes(Mixed(), x))
    # SiLU exports as Sigmoid * x and rsqrt as Div(1, Sqrt): both are counted as the fx op they came from
    assert onnx_census(mp, tuple(x.shape)).totals_by_kind == c.totals_by_kind
    assert c.total_comparisons == 0


def test_kind_is_recorded_on_the_node():
    gm = annotate(
        propagate_shapes(trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.MaxPool1d(2))), torch.randn(1, 2, 4))
    )
    by_name = {n.name: n.meta.get(ops.KIND_META) for n in gm.graph.nodes}
    assert by_name["_0"] == ()
    assert by_name["_1"] == (("relu6", 8),)
    assert by_name["_2"] == (("maxpool", 4),)  # 2x2 outputs, one comparison each


def test_comparisons_total_counts_relu6_twice_and_maxpool():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2), nn.ReLU())
    c = relu_opt.count(model, torch.randn(1, 1, 4, 4))
    assert c.totals_by_kind == {"relu6": 32, "maxpool": 8 * 3, "relu": 8}
    assert c.total_comparisons == 2 * 32 + 24 + 8


def test_mobilenetv2_relu6_count():
    pytest.importorskip("pytorchcv")
    from pytorchcv.models.mobilenetv2 import mobilenetv2_w1

    c = relu_opt.count(mobilenetv2_w1(), torch.randn(1, 3, 224, 224))
    assert c.totals_by_kind == {"relu6": 6_507_200}
    assert c.total_relu == 0
    assert c.total_comparisons == 2 * 6_507_200


@pytest.fixture
def own_softplus():
    """Swap the built-in softplus entry for a user's own, as a user adding a kind would write it."""
    builtin = ops.get_kind("softplus")
    ops.unregister_kind("softplus")
    kind = ops.register_kind(
        ops.OpKind(
            "my_softplus",
            ops.TRANSCENDENTAL,
            F.softplus,
            modules=(nn.Softplus,),
            functions=(F.softplus,),
            onnx_ops=("Softplus",),
            exact_onnx=True,
        )
    )
    yield kind
    ops.unregister_kind("my_softplus")
    ops.register_kind(builtin)


def test_a_registered_kind_flows_through_census_onnx_and_cost_model(own_softplus, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Softplus(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(1, 1, 4, 4)
    c = relu_opt.count(model, x)
    assert c.totals_by_kind == {"my_softplus": 12}
    r = relu_opt.export(model, x, tmp_path / "m.onnx")
    assert r.onnx_totals == {"my_softplus": 12}
    f = features(census_graph(model, x), batch=2)
    assert f.ops["transcendental"] == 1 and f.elements["transcendental"] == 24


def census_graph(model, x):
    gm = propagate_shapes(trace(model), x)
    census(gm)
    return gm
