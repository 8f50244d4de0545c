import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu_opt
from relu_opt.backends.crypten.convert import check_supported, crypten_onnx
from relu_opt.backends.crypten.convert import prepare as prepare_for_crypten
from relu_opt.backends.crypten.lower import LOWERINGS, inv_sqrt
from relu_opt.errors import BackendError
from relu_opt.onnx_export import to_onnx_bytes

X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 2


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "module",
    [
        nn.Hardswish(),
        nn.Hardsigmoid(),
        nn.LeakyReLU(0.1),
        nn.PReLU(4, 0.3),
        nn.Tanh(),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.ELU(0.7),
        nn.LayerNorm(6),
    ],
)
def test_lowered_kinds_compute_the_same_function(module):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), module).eval()
    lowered = prepare_for_crypten(model, X[:1])
    assert not any(type(m) is type(module) for m in lowered.modules())
    with torch.no_grad():
        # LayerNorm uses CrypTen's inverse-square-root iteration: close, not exact, on rows of small variance
        tol = 2e-2 if isinstance(module, nn.LayerNorm) else 1e-5
        tol = 0.025 if isinstance(module, nn.GELU) else tol  # x * sigmoid(1.702 x)
        assert torch.allclose(lowered(X), model(X), rtol=tol, atol=tol)
    kinds = {n.op_type for n in onnx.load_from_string(crypten_onnx(lowered, X[:1])).graph.node}
    assert not kinds & {"HardSwish", "HardSigmoid", "LeakyRelu", "PRelu", "Tanh", "Elu", "LayerNormalization", "Erf"}


def test_inv_sqrt_is_cryptens_iteration():
    v = torch.linspace(0.05, 50, 200)
    assert torch.allclose(inv_sqrt(v), torch.rsqrt(v), rtol=2e-3)
    assert set(LOWERINGS) >= {"hardswish", "layernorm", "rsqrt", "tanh", "leaky_relu", "prelu", "elu"}


def _check(fn):
    mp = onnx.load_from_string(crypten_onnx(prepare_for_crypten(Act(fn), X[:1]), X[:1]))
    check_supported(mp)


def test_precheck_names_every_unrunnable_op_with_its_fix():
    with pytest.raises(BackendError, match=r"CrypTen cannot run mish \(node .*relu-opt optimize --kinds mish"):
        _check(F.mish)
    # torch.rsqrt as exported (Div(1, Sqrt(v))): it used to pass the op check and fail inside party 0
    raw_rsqrt = onnx.load_from_string(to_onnx_bytes(Act(lambda x: torch.rsqrt(x**2 + 1)), torch.ones(1, 3)))
    with pytest.raises(BackendError, match=r"cannot divide a public value by an encrypted one.*torch\.rsqrt"):
        check_supported(raw_rsqrt)
    with pytest.raises(BackendError, match=r"'Reciprocal'.*torch\.rsqrt"):
        _check(lambda x: x * (1 / torch.sqrt(x**2 + 1)))
    with pytest.raises(BackendError, match=r"integer powers"):
        _check(lambda x: (x**2 + 1) ** 0.5)
    with pytest.raises(BackendError, match=r"subtract an encrypted value from a public one"):
        check_supported(onnx.load_from_string(to_onnx_bytes(Act(lambda x: 1 - x), X[:1])))
    # a hand-written LayerNorm with torch.rsqrt is lowered to CrypTen's iteration and passes
    _check(lambda x: x * torch.rsqrt((x**2).mean(1, keepdim=True) + 1e-5))


class TinyBlocks(nn.Module):
    """A MobileNet-style and a transformer-style block: Hardswish, ReLU6, LayerNorm, softmax, GELU, SiLU,
    sigmoid and a hand-written rsqrt LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.hs, self.r6 = nn.Hardswish(), nn.ReLU6()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(4 * 64, 3)

    def forward(self, x):
        h = self.r6(self.hs(self.conv(x)))  # (N, 4, 8, 8)
        t = self.ln(h.reshape(-1, 32, 8))  # 32 tokens of 8 features
        a = torch.softmax(t @ t.transpose(1, 2) * 0.3, -1)
        t = a @ t + F.gelu(self.fc(t)) + F.silu(t) + torch.sigmoid(t)
        mu = t.mean(-1, keepdim=True)
        t = (t - mu) * torch.rsqrt(((t - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        return self.head(t.flatten(1))


@pytest.mark.slow
@pytest.mark.parties
def test_every_table_kind_runs_under_two_party_crypten():
    from relu_opt.backends.crypten.calibration import calibrate
    from tests.crypten_helpers import measure_models as measure

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = TinyBlocks().eval()
    assert {"hardswish", "relu6", "layernorm", "softmax", "gelu", "silu", "sigmoid", "rsqrt"} <= set(
        relu_opt.count(model, x[:1]).totals_by_kind
    )
    (m,) = measure([("tiny", model)], x, runs=1, warmup=0, timeout=240)
    prepared = prepare_for_crypten(model, x[:1])
    with torch.no_grad():
        ref = prepared(x).numpy()
    # CrypTen's exp, erf, sigmoid and reciprocal are fixed-point approximations: close, not exact
    assert np.abs(m.logits - ref).max() < 0.1 * np.abs(ref).max()
    cost = calibrate(2, timeout=240).cost(prepared, batch=len(x))  # per-kind costs from the suite (cached)
    assert cost.rounds == pytest.approx(m.rounds, rel=0.1)  # measured: within 5-6%
    assert cost.bytes == pytest.approx(m.bytes_per_party[0], rel=0.1)


def test_kept_elements_of_a_partial_site_are_lowered_too():
    from relu_opt.activations import PartialSite

    x = torch.randn(2, 4, 3, 3)
    keep = torch.zeros(4, 3, 3, dtype=torch.bool)
    keep[::2] = True
    site = PartialSite(keep, (4, 3, 3), None, nn.Hardswish(), "hardswish")
    model = nn.Sequential(nn.Conv2d(4, 4, 1), site).eval()
    lowered = prepare_for_crypten(model, x[:1])
    with torch.no_grad():
        assert torch.allclose(lowered(x), model(x), atol=1e-6)
    mp = onnx.load_from_string(crypten_onnx(lowered, x[:1]))
    check_supported(mp)
    assert "HardSwish" not in {n.op_type for n in mp.graph.node}
    assert relu_opt.count(lowered, x[:1]).totals_by_kind == {"relu6": 18}  # x * clip(x + 3, 0, 6) / 6
