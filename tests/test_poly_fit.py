import torch

from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.poly_fit import _accumulate, collect_stats, fit_error, fit_poly

# Stated bound: on a Gaussian pre-activation with mean >= 0 the best quadratic leaves a relative MSE
# E[(p - relu)^2] / E[relu^2] of at most about 0.023 (at mean 0); the fit must stay under 0.025 there.
# For a negative mean the relative error grows (relu is mostly 0), and only optimality is checked.
GAUSSIAN_BOUND = 0.025


def test_fit_matches_least_squares_and_bound():
    gen = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([1.0, 3.0, 0.2, 0.2]), torch.tensor([0.0, 1.0, 0.05, -0.1])
    x = torch.randn(200_000, 4, generator=gen) * scale + shift
    st = _accumulate(None, x, 2)
    c = fit_poly(st)
    for ch in range(4):
        v = x[:, ch].double()
        a = torch.stack([torch.ones_like(v), v, v * v], 1)
        ref = torch.linalg.lstsq(a, v.clamp_min(0).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(c[:, ch].double(), ref, rtol=1e-3, atol=1e-4)
    err = fit_error(st, c)
    assert (err[:3] < GAUSSIAN_BOUND).all()
    assert torch.allclose(c[:, 0], torch.tensor([0.1995, 0.5, 0.1995]), atol=5e-3)  # the known N(0,1) fit
    fixed = torch.tensor([[0.2] * 4, [0.5] * 4, [0.2] * 4])
    assert (err <= fit_error(st, fixed) + 1e-6).all()  # least squares beats a fixed polynomial everywhere


def test_stats_are_measured_on_the_model():
    model = create_model("small_cnn", in_channels=1).eval()
    gm = propagate_shapes(trace(model), torch.randn(1, 1, 16, 16))
    gen = torch.Generator().manual_seed(0)
    stats = collect_stats(gm, [torch.randn(64, 1, 16, 16, generator=gen) for _ in range(2)], degree=2)
    assert set(stats) == {"features_2", "features_6", "features_10"}
    s = stats["features_2"]
    assert s.count.shape == (16,) and float(s.count[0]) == 2 * 64 * 16 * 16
    err = fit_error(s, fit_poly(s))
    assert (err < 0.05).all()
    layer = s.merged()
    assert float(fit_error(layer, fit_poly(layer))[0]) >= float(err.min()) - 1e-6


def test_in_place_relu_sites_are_fitted_on_their_inputs():
    """ReLU(inplace=True) overwrites its input; the stats must still see the pre-activation values."""

    class Net(torch.nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.relu = torch.nn.ReLU(inplace=inplace)

        def forward(self, x):
            return self.relu(self.conv(x)) * 2

    torch.manual_seed(0)
    plain = Net(inplace=False)
    inplace = Net(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    xs = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    stats = {}
    for name, net in (("plain", plain), ("inplace", inplace)):
        gm = propagate_shapes(trace(net), xs[0][:1])
        (stats[name],) = collect_stats(gm, iter(xs)).values()
    assert torch.allclose(stats["plain"].x_pow, stats["inplace"].x_pow)  # the inputs, not relu(inputs)
    assert torch.allclose(fit_poly(stats["plain"]), fit_poly(stats["inplace"]))
    assert float(fit_poly(stats["inplace"])[2].min()) > 0  # a ReLU fit curves up (it was ~0 when fitted to x)
