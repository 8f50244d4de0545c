"""The range penalty: polynomial inputs past their fitted range get a gradient that pulls them back, so a
fine-tuned network does not depend on the training-only clamp (a few inputs overflowed in evaluation)."""

import torch
from torch import nn

from relu_opt.activations import MaskedSite, Poly
from relu_opt.range_penalty import penalized, range_penalty

RELU_FIT = [0.12, 0.5, 0.35]


def _site(mask: list[float], clamp: list[float]) -> MaskedSite:
    coeffs = torch.tensor(RELU_FIT)[:, None].expand(3, len(mask))
    poly = Poly(coeffs, input_range=torch.tensor(clamp))
    return MaskedSite(torch.tensor(mask).view(-1, 1, 1), poly)


def test_only_replaced_elements_past_their_fitted_range_count():
    site = _site([1.0, 0.0, 0.0], clamp=[2.0, 2.0, 4.0]).train()  # fitted ranges 1, 1, 2 at train_range 2
    x = torch.zeros(1, 3, 1, 2)
    x[0, 0] = torch.tensor([9.0, -9.0])  # a kept channel: its ReLU takes any value
    x[0, 1] = torch.tensor([3.0, 0.5])  # replaced, fitted range 1: one element 3x past
    x[0, 2] = torch.tensor([-1.5, 2.0])  # replaced, fitted range 2: both inside
    with range_penalty(site, train_range=2.0) as excess:
        site(x)
        got = excess()
        assert float(excess()) == 0.0  # taken once, then reset
        site.eval()(x)
        assert float(excess()) == 0.0  # evaluation is not penalised
    assert abs(float(got) - (3.0 / 1.0 - 1) ** 2) < 1e-6  # the image's worst replaced element
    assert not site._forward_pre_hooks  # the hooks go with the context
    dead = _site([0.0, 0.0], clamp=[0.0, 2.0]).train()  # channel 0 was all zeros in calibration
    with range_penalty(dead, train_range=2.0) as excess:
        dead(torch.tensor([5.0, 2.0]).view(1, 2, 1, 1))
        assert float(excess()) == 1.0  # channel 1 is 2x its range; channel 0 is not penalised (nor NaN)


def test_an_input_past_the_clamp_still_gets_a_gradient_back_into_range():
    site = _site([0.0], clamp=[2.0]).train()
    scale = nn.Parameter(torch.tensor(5.0))  # the layer before: puts the input at 5, past the clamp at 2
    with range_penalty(site, train_range=2.0) as excess:
        out = site(scale * torch.ones(1, 1, 1, 1))
        loss = penalized(lambda logits, x, y: logits.sum(), excess, weight=1.0)(out, None, None)
        loss.backward()
    # The clamped polynomial gives no gradient at all; the penalty's is 2 (5/1 - 1) / 1 = 8, pulling x down.
    assert float(scale.grad) > 7.9


def test_the_option_leaves_cached_work_keys_alone_until_it_is_set():
    from relu_opt.optimizer import OptimizeConfig

    base = OptimizeConfig(budget=100)
    assert base.range_weight == 0.0
    assert base.key() == "91e7115732"  # the key before the option existed: finished rows are not redone
    assert OptimizeConfig(budget=100, range_weight=1.0).key() != base.key()


def test_a_negative_range_weight_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from relu_opt.cli import app

    args = ["optimize", "resnet20", "-o", str(tmp_path / "o"), "--budget", "100", "--data", "synthetic"]
    r = CliRunner().invoke(app, [*args, "--input-shape", "1,1,12,12", "--range-weight", "-1"])
    assert r.exit_code != 0
    assert "--range-weight -1 must be at least 0" in r.output
    assert not (tmp_path / "o").exists()
