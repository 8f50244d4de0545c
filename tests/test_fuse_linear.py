"""Linear fusion: where a site became an identity, the linear layers that meet are merged when exact, so the
optimized model and the linear floor pay fewer rounds."""

import pytest
import torch
from torch import nn

from relu_opt.activations import ChannelAffine, MaskedSite
from relu_opt.backends.crypten.cost_model import features
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.base import GraphPass, run_passes
from relu_opt.passes.fuse_linear import fuse_linear
from relu_opt.passes.pi import linear_floor, prepare_for_pi


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn.eval()


def _affine(c: int) -> ChannelAffine:
    return ChannelAffine(torch.rand(c) + 0.5, torch.randn(c))


def _linear_ops(gm) -> int:
    f = features(gm)
    return f.ops.get("linear", 0) + f.ops.get("affine", 0)


def _fused(model: nn.Module, x: torch.Tensor):
    gm = propagate_shapes(trace(model.eval()), x)
    out = run_passes(gm, [GraphPass(fuse_linear, needs_shapes=True)], x)
    with torch.no_grad():
        err = (out(x) - model(x)).abs().max().item()
    return gm, out, err


CASES = {
    # name: (model, input, linear + affine ops the fused graph keeps)
    "conv, identity, affine": (
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), _affine(8)),
        (2, 3, 8, 8),
        1,
    ),
    "conv, batchnorm": (
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Identity(), _bn(8)),
        (2, 3, 8, 8),
        1,
    ),
    "conv, 1x1, 1x1": (
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.Conv2d(8, 8, 1), nn.Identity(), nn.Conv2d(8, 4, 1)),
        (2, 3, 8, 8),
        1,
    ),
    "depthwise, pointwise": (
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Identity(), nn.Conv2d(8, 4, 1)),
        (2, 8, 6, 6),
        1,
    ),
    "linear, linear (tokens)": (nn.Sequential(nn.Linear(6, 5), nn.Identity(), nn.Linear(5, 3)), (2, 7, 6), 1),
    "affine, conv without padding": (nn.Sequential(_affine(3), nn.Identity(), nn.Conv2d(3, 4, 3)), (2, 3, 8, 8), 1),
    "affine, affine, linear": (
        nn.Sequential(nn.Flatten(), _affine(12), _affine(12), nn.Linear(12, 3)),
        (2, 3, 2, 2),
        1,
    ),
    # not exact or not cheaper: left alone
    "affine, padded conv": (nn.Sequential(_affine(3), nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 8, 8), 2),
    "conv, padded conv": (
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Conv2d(4, 4, 3, padding=1)),
        (2, 3, 8, 8),
        2,
    ),
    "linear into a wider linear": (nn.Sequential(nn.Linear(16, 2), nn.Linear(2, 64)), (2, 16), 2),
    "tokens, affine over dim 1": (
        nn.Sequential(nn.Linear(6, 5), ChannelAffine(torch.rand(4), torch.randn(4))),
        (2, 4, 6),
        2,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fusion_is_exact_and_drops_layers(name):
    model, shape, left = CASES[name]
    x = torch.randn(shape)
    before, after, err = _fused(model, x)
    assert err < 1e-5
    assert _linear_ops(after) == left
    assert _linear_ops(after) <= _linear_ops(before)


def test_a_layer_with_two_readers_is_not_fused():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.aff = _affine(4)

        def forward(self, x):
            y = self.conv(x)
            return self.aff(y) + y

    x = torch.randn(1, 3, 6, 6)
    _, after, err = _fused(Fork(), x)
    assert err < 1e-6 and _linear_ops(after) == 2


class Block(nn.Module):
    """conv-bn-relu, 1x1 conv-bn-relu, 1x1 conv: the 1x1 layers meet the 3x3 when the ReLUs are dropped."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 16, 3, padding=1), _bn(16), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(16, 16, 1), _bn(16), nn.ReLU()
        self.c3 = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        return self.c3(self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x)))))))


def test_floor_and_dropped_sites_pay_fewer_rounds():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    pi = prepare_for_pi(model, x)
    assert _linear_ops(pi) == 3  # the ReLUs keep every layer apart
    floor = linear_floor(pi, x)
    assert _linear_ops(floor) == 1
    unfused = run_passes(pi, [GraphPass(p.fn, p.needs_shapes) for p in _floor_without_fusion()], x)
    with torch.no_grad():
        assert (floor(x) - unfused(x)).abs().max().item() < 1e-4
    assert _linear_ops(unfused) == 3

    # one ReLU dropped by the optimizer (an all-zero mask, identity replacement): its layers fuse
    gm = propagate_shapes(trace(model), x)
    gm.r2 = MaskedSite(torch.zeros(1))
    gm.recompile()
    dropped = prepare_for_pi(gm, x)
    with torch.no_grad():
        assert (dropped(x) - gm(x)).abs().max().item() < 1e-4
    assert _linear_ops(dropped) == 2


def _floor_without_fusion():
    from relu_opt.passes.pi import FLOOR_PASSES

    return [p for p in FLOOR_PASSES if p.fn is not fuse_linear]
