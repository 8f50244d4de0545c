"""Polynomials after residual additions fold into one square, exactly, with their scale pushed upstream."""

import pytest
import torch
from torch import nn

from relu_opt.activations import MaskedSite, Poly, Square
from relu_opt.backends.crypten.cost_model import features
from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.passes.fold_poly import OffsetSquare
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.passes.replace import replace_sites, site_op
from relu_opt.poly_fit import collect_stats, fit_poly, refit_in_order


def _bowl(c: int, a_min: float = 0.1) -> Poly:
    coeffs = torch.randn(3, c) * 0.3
    coeffs[2] = torch.rand(c) * 0.3 + a_min  # relu-like: a > 0
    return Poly(coeffs)


class Blocks(nn.Module):
    """stem -> act -> two residual blocks (conv-act-conv + identity) each ending in `post` -> pool -> fc."""

    def __init__(self, act, post, c: int = 6):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, c, 3, padding=1), act
        self.c1, self.m1, self.c2, self.p1 = (
            nn.Conv2d(c, c, 3, padding=1),
            _bowl(c),
            nn.Conv2d(c, c, 3, padding=1),
            post[0],
        )
        self.c3, self.m2, self.c4, self.p2 = (
            nn.Conv2d(c, c, 3, padding=1),
            _bowl(c),
            nn.Conv2d(c, c, 3, padding=1),
            post[1],
        )
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.p1(self.c2(self.m1(self.c1(x))) + x)
        x = self.p2(self.c4(self.m2(self.c3(x))) + x)
        return self.fc(x.mean((2, 3)))


def _kinds(gm) -> dict[str, int]:
    return {
        "square": sum(isinstance(m, OffsetSquare) for m in gm.modules()),
        "poly": sum(type(m) is Poly for m in gm.modules()),
    }


@pytest.mark.parametrize("act", [nn.ReLU(), "poly"], ids=["relu stem", "poly stem"])
def test_post_add_polys_fold_with_the_same_outputs(act):
    torch.manual_seed(0)
    model = Blocks(_bowl(6) if act == "poly" else act, (_bowl(6), _bowl(6))).eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_for_pi(model, x[:1])
    with torch.no_grad():
        ref, out = model(x), prepared(x)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # both post-add sites and both in-block ones fold; a poly stem is read twice, so it keeps its form
    assert _kinds(prepared) == {"square": 4, "poly": 1 if act == "poly" else 0}


def test_a_negative_quadratic_term_keeps_the_two_round_form():
    torch.manual_seed(0)
    bad = _bowl(6)
    with torch.no_grad():
        bad.coeffs[2, 0] = -0.2  # a < 0 in one channel: no (s x + t)^2 + k with a real s
    model = Blocks(nn.ReLU(), (bad, _bowl(6))).eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_for_pi(model, x[:1])
    with torch.no_grad():
        assert (prepared(x) - model(x)).abs().max() < 1e-4 * model(x).abs().max()
    assert _kinds(prepared) == {"square": 3, "poly": 1}


def test_resnet20_with_every_site_replaced_is_all_squares_but_the_stem():
    """The stem's output is read by a conv and a shortcut: the one site neither fold reaches."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(64, 1, 28, 28)
    gm = propagate_shapes(trace(model), x[:1])
    nodes = {n.name: n for n in gm.graph.nodes}
    new = {
        s: MaskedSite(torch.zeros(1), Poly(fit_poly(st)), site_op(gm, nodes[s]), "relu")
        for s, st in collect_stats(gm, [x]).items()
    }
    student = replace_sites(gm, new)
    refit_in_order(student, [x])
    prepared = prepare_for_pi(student.eval(), x[:1])
    with torch.no_grad():
        ref, out = student(x), prepared(x)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    f = features(prepared)
    assert f.ops.get("square") == 18 and f.ops.get("poly") == 1


@pytest.mark.slow
@pytest.mark.parties
def test_post_add_poly_costs_the_square_under_crypten():
    """Measured: the folded post-add site's rounds and bytes are those of the same block with a square."""
    from tests.crypten_helpers import measure_models as measure

    class Block(nn.Module):
        def __init__(self, post):
            super().__init__()
            self.c0, self.act, self.c1, self.post, self.c2 = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1),
                post,
                nn.Conv2d(8, 8, 1),
            )

        def forward(self, x):
            v = self.act(self.c0(x))
            return self.c2(self.post(self.c1(v) + v))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    poly_model, square_model = Block(_bowl(8)).eval(), Block(Square()).eval()
    poly, square = measure([("poly", poly_model), ("square", square_model)], x, runs=1, warmup=0, timeout=300)
    assert poly.rounds == square.rounds
    assert poly.bytes_per_party == square.bytes_per_party
    with torch.no_grad():
        plain = poly_model(x).numpy()
    assert abs(poly.logits - plain).max() < 0.05 * max(1.0, abs(plain).max())
