"""One-round polynomials: a degree-2 Poly site between two linear layers costs the square's round and bytes
once its coefficients are folded into them (fold_poly), with the same outputs."""

import onnx
import onnx.numpy_helper
import pytest
import torch
from torch import nn

from relu_opt.activations import ChannelAffine, Poly, Square
from relu_opt.backends.crypten.cost_model import features
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.fold_poly import OffsetSquare, fold_poly
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.passes.public_poly import PublicPoly, publicize_polys


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


@pytest.mark.slow
@pytest.mark.parties
def test_folded_poly_costs_the_square_under_crypten():
    from tests.crypten_helpers import measure_models as measure

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    poly_model, square_model = _conv_poly_conv(_poly(8)), _conv_poly_conv(Square())
    poly, square = measure([("poly", poly_model), ("square", square_model)], x, runs=1, warmup=0, timeout=300)
    assert poly.rounds == square.rounds
    assert poly.bytes_per_party == square.bytes_per_party
    with torch.no_grad():
        plain = poly_model(x).numpy()
    assert abs(poly.logits - plain).max() < 0.05 * max(1.0, abs(plain).max())


class _ReadTwice(nn.Module):
    """A site fold_poly cannot fold: its output is read twice (no single next layer to take `a`)."""

    def __init__(self, rep: nn.Module):
        super().__init__()
        self.conv, self.rep, self.out = nn.Conv2d(3, 8, 3, padding=1), rep, nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.rep(self.conv(x))
        return self.out(y) + y


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_public_coefficients_keep_the_outputs(degree):
    torch.manual_seed(0)
    coeffs = torch.randn(degree + 1, 8) * 0.3
    model = _ReadTwice(Poly(coeffs)).eval()
    x = torch.randn(2, 3, 6, 6)
    prepared = prepare_for_pi(model, x, public_coeffs=True)
    assert sum(isinstance(m, PublicPoly) for m in prepared.modules()) == 1
    with torch.no_grad():
        assert (prepared(x) - model(x)).abs().max().item() < 1e-4
    # the cost features count the powers only: degree 2 is one square, 3 adds x^2 * x, 4 adds (x^2)^2
    want = {2: {"square": 1}, 3: {"square": 1, "mul": 1}, 4: {"square": 2, "mul": 1}}[degree]
    ops = features(prepared).ops
    assert "poly" not in ops and {k: ops.get(k, 0) for k in ("square", "mul")} == {"mul": 0, **want}
    assert _kinds(prepare_for_pi(model, x)).get("poly") == 1  # without the opt-in the site stays secret


def test_public_coefficients_are_onnx_constants_and_cost_like_a_square():
    from relu_opt.backends.crypten.convert import crypten_onnx

    x = torch.randn(1, 3, 6, 6)
    public = prepare_for_pi(_ReadTwice(_poly(8)).eval(), x, public_coeffs=True)
    square = prepare_for_pi(_ReadTwice(Square()).eval(), x)
    assert features(public) == features(square)
    mp = onnx.load_from_string(crypten_onnx(public, x))
    # CrypTen encrypts initialisers (the weights) and keeps Constant nodes public: the coefficients must be
    # Constants, and the only initialisers the two convolutions' weights and biases
    assert sorted(len(t.dims) for t in mp.graph.initializer) == [1, 1, 4, 4]
    consts = [n for n in mp.graph.node if n.op_type == "Constant"]
    values = sorted(float(v) for n in consts for v in onnx.numpy_helper.to_array(n.attribute[0].t).reshape(-1))
    coeffs = next(m for m in public.modules() if isinstance(m, PublicPoly)).coeffs
    assert all(any(abs(v - c) < 1e-6 for v in values) for c in coeffs.reshape(-1).tolist())


def test_public_poly_in_a_partial_site_counts_its_rest_as_squares():
    from relu_opt.activations import MaskedSite

    x = torch.randn(1, 3, 4, 4)
    mask = (torch.arange(8) < 3).float().view(8, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MaskedSite(mask, _poly(8)), nn.Conv2d(8, 8, 3)).eval()
    # made public after the site is split (the PI passes) or before (a model publicized by hand)
    for prepared in (prepare_for_pi(model, x, public_coeffs=True), prepare_for_pi(publicize_polys(trace(model)), x)):
        f = features(prepared)
        assert f.elements.get("relu") == 3 * 16 and f.elements.get("square") == 5 * 16 and "poly" not in f.ops
        with torch.no_grad():
            assert (prepared(x) - model(x)).abs().max().item() < 1e-4


def test_export_with_public_coeffs_writes_them_as_constants(tmp_path):
    from relu_opt import api

    model = _ReadTwice(_poly(8)).eval()
    x = torch.randn(1, 3, 6, 6)
    secret = api.export(model, x, tmp_path / "secret.onnx")
    public = api.export(model, x, tmp_path / "public.onnx", public_coeffs=True)
    assert public.rel_err < 1e-4 and public.onnx_totals == secret.onnx_totals
    n_secret, n_public = (len(onnx.load(str(tmp_path / f)).graph.initializer) for f in ("secret.onnx", "public.onnx"))
    assert n_public == 4 < n_secret  # two convolutions' weights and biases; no coefficient among them


@pytest.mark.slow
@pytest.mark.parties
def test_public_poly_costs_the_square_under_crypten():
    from tests.crypten_helpers import measure_models as measure

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    secret_model = _ReadTwice(_poly(8)).eval()
    public_model = publicize_polys(trace(secret_model))
    square_model = _ReadTwice(Square()).eval()
    secret, public, square = measure(
        [("secret", secret_model), ("public", public_model), ("square", square_model)],
        x,
        runs=1,
        warmup=0,
        timeout=300,
    )
    assert public.rounds == square.rounds < secret.rounds
    assert public.bytes_per_party == square.bytes_per_party
    assert max(public.bytes_per_party) < max(secret.bytes_per_party)
    with torch.no_grad():
        plain = secret_model(x).numpy()
    assert abs(public.logits - plain).max() < 0.05 * max(1.0, abs(plain).max())


@pytest.mark.slow
def test_public_coeffs_is_recorded_in_the_plan_and_bench_follows_it(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from relu_opt import encrypted as bench
    from relu_opt.cli import app
    from relu_opt.errors import ReluOptError

    runner = CliRunner()
    out = tmp_path / "o"
    args = ["optimize", "small_cnn", "--data", "synthetic", "--input-shape", "1,3,16,16", "--budget", "200"]
    args += ["--epochs", "0", "--strategy", "random", "--rank-samples", "64", "--public-coeffs", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    folder = out / "budget_200"
    assert json.loads((folder / "plan.json").read_text())["public_coeffs"] is True
    mp = onnx.load(str(folder / "model.onnx"))
    # channel-granular sites keep some ReLUs: their polynomials cannot be folded, so their coefficients are
    # Constant nodes here; without the opt-in they are initialisers of their own (onnx::Mul_93, ...)
    assert any(n.op_type == "Pow" for n in mp.graph.node)
    names = [t.name for t in mp.graph.initializer]
    assert names and all(n.endswith((".weight", ".bias", "_idx", ".inverse")) for n in names), names

    seen = {}

    def fake_bench(*a, **k):
        seen.update(k)
        raise ReluOptError("stop")

    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr("relu_opt.backends.pricing.Pricing.cost_model", lambda *a, **k: None)
    r = runner.invoke(app, ["bench", "small_cnn", "--input-shape", "1,3,16,16", "--optimized", str(folder)])
    assert r.exit_code == 2 and seen["public_coeffs"] is True  # from plan.json, without the flag
