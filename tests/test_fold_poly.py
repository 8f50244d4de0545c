"""One-round polynomials: a degree-2 Poly site between two linear layers costs the square's round and bytes
once its coefficients are folded into them (fold_poly), with the same outputs."""

import pytest
import torch
from torch import nn

from relu_opt.activations import ChannelAffine, Poly, Square
from relu_opt.crypto_backend.cost_model import features
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.fold_poly import OffsetSquare, fold_poly
from relu_opt.passes.pi import prepare_for_pi


def _poly(c: int) -> Poly:
    coeffs = torch.randn(3, c) * 0.3
    coeffs[2] = torch.rand(c) * 0.3 + 0.1  # a relu-like bowl: a > 0
    return Poly(coeffs)


def _conv_poly_conv(rep: nn.Module, groups: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), rep, nn.Conv2d(8, 8, 3, padding=1, groups=groups)).eval()


def _folded(model: nn.Module, x: torch.Tensor):
    gm = propagate_shapes(trace(model), x)
    out = run_passes(gm, [GraphPass(fold_poly, needs_shapes=True)], x)
    with torch.no_grad():
        err = (out(x) - model(x)).abs().max().item()
    return out, err


def _kinds(gm) -> dict[str, int]:
    return features(gm).ops


@pytest.mark.parametrize(
    "model, shape",
    [
        (_conv_poly_conv(_poly(8)), (2, 3, 8, 8)),
        (_conv_poly_conv(_poly(8), groups=8), (2, 3, 8, 8)),  # depthwise after the poly
        (_conv_poly_conv(_poly(1)), (2, 3, 8, 8)),  # one coefficient set for the layer
        (nn.Sequential(nn.Linear(6, 5), _poly(5), nn.Linear(5, 3)), (4, 6)),
        (
            nn.Sequential(
                nn.Flatten(), ChannelAffine(torch.rand(12) + 0.5, torch.randn(12)), _poly(12), nn.Linear(12, 2)
            ),
            (2, 3, 2, 2),
        ),
    ],
)
def test_folded_poly_is_one_square_with_the_same_outputs(model, shape):
    x = torch.randn(shape)
    out, err = _folded(model.eval(), x)
    assert err < 1e-4
    ops = _kinds(out)
    assert ops.get("square") == 1 and "poly" not in ops
    assert sum(isinstance(m, OffsetSquare) for m in out.modules()) == 1


def test_poly_is_kept_where_folding_is_not_exact():
    class Residual(nn.Module):  # the poly's output is read twice: no single next layer to take `a`
        def __init__(self):
            super().__init__()
            self.conv, self.poly, self.out = nn.Conv2d(3, 3, 3, padding=1), _poly(3), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.poly(self.conv(x))
            return self.out(y) + y

    tokens = nn.Sequential(nn.Linear(6, 5), _poly(4), nn.Linear(5, 3))  # coefficients along the tokens
    for model, shape in [(Residual(), (1, 3, 6, 6)), (tokens, (2, 4, 6))]:
        out, err = _folded(model.eval(), torch.randn(shape))
        assert err < 1e-6 and _kinds(out).get("poly") == 1


def test_pi_preparation_folds_polys():
    x = torch.randn(2, 3, 8, 8)
    model = _conv_poly_conv(_poly(8))
    prepared = prepare_for_pi(model, x)
    with torch.no_grad():
        assert (prepared(x) - model(x)).abs().max().item() < 1e-4
    assert _kinds(prepared).get("square") == 1


def test_folded_poly_costs_the_square_under_crypten():
    from relu_opt.crypto_backend.bench import measure

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    poly_model, square_model = _conv_poly_conv(_poly(8)), _conv_poly_conv(Square())
    poly, square = measure([("poly", poly_model), ("square", square_model)], x, runs=1, warmup=0, timeout=300)
    assert poly.rounds == square.rounds
    assert poly.bytes_per_party == square.bytes_per_party
    with torch.no_grad():
        plain = poly_model(x).numpy()
    assert abs(poly.logits - plain).max() < 0.05 * max(1.0, abs(plain).max())
