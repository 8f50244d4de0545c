import pytest
import torch

import relu_opt
from relu_opt.models import create_model


@pytest.mark.parametrize("shape,tokens", [((1, 1, 28, 28), 49), ((1, 3, 32, 32), 64)])
def test_vit_counts_follow_the_architecture(shape, tokens, tmp_path):
    model = create_model("vit_tiny", in_channels=shape[1]).eval()
    c = relu_opt.count(model, torch.randn(shape))
    depth, heads, dim, hidden = 2, 2, 32, 64
    assert c.totals_by_kind == {
        "softmax": depth * heads * tokens * tokens,
        "layernorm": (2 * depth + 1) * tokens * dim,
        "gelu": depth * tokens * hidden,
    }
    r = relu_opt.export(model, torch.randn(shape), tmp_path / "vit.onnx")  # exact softmax/LayerNorm counts
    assert r.onnx_totals["softmax"] == c.totals_by_kind["softmax"]
    assert r.onnx_totals["layernorm"] == c.totals_by_kind["layernorm"]


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (1, 3, 32, 32)])
def test_mobilenet_v2_is_relu6_inverted_residuals(shape):
    model = create_model("mobilenet_v2", in_channels=shape[1]).eval()
    c = relu_opt.count(model, torch.randn(shape))
    assert set(c.totals_by_kind) == {"relu6"}
    assert c.total_comparisons == 2 * c.totals_by_kind["relu6"]
    h = shape[2]
    # stem 16 at full size; the first stage has no expansion (one depthwise ReLU6 of 16 channels)
    first = c.sites[:2]
    assert [s.elements for s in first] == [16 * h * h, 16 * h * h]
    with torch.no_grad():
        assert model(torch.randn(2, *shape[1:])).shape == (2, 10)
    hs = relu_opt.count(create_model("mobilenet_v2_hardswish", in_channels=shape[1]), torch.randn(shape))
    assert hs.totals_by_kind == {"hardswish": c.totals_by_kind["relu6"]}
