"""Fine-tuning stays stable when most sites become polynomials: training inputs of each polynomial are
clamped to the range it was fitted on, and BatchNorm statistics are recomputed on the final weights."""

import pytest
import torch
from torch import nn

from relu_opt.activations import Poly
from relu_opt.data import load_dataset
from relu_opt.graph import trace
from relu_opt.poly_fit import collect_stats
from relu_opt.replacements import SiteContext, replacement_for
from relu_opt.training import TrainConfig, TrainingDiverged, evaluate, fit, refresh_bn_stats

RELU_FIT = [0.12, 0.5, 0.35]  # about the least-squares quadratic to ReLU on N(0, 1)


def _chain(depth: int, bound: float | None) -> nn.Sequential:
    return nn.Sequential(
        *(
            Poly(torch.tensor(RELU_FIT), input_range=None if bound is None else torch.tensor([bound]))
            for _ in range(depth)
        )
    )


def test_training_clamp_bounds_a_deep_composition_and_eval_is_the_bare_polynomial():
    chain = _chain(8, bound=3.0)
    x = torch.tensor([6.0, -6.0, 1.5, -0.5])  # two inputs at twice the fitted range, two inside it;
    # 1.5 is above p's upper fixed point (1.12), so the chain carries it out of range, -0.5 stays near 0.3
    with torch.no_grad():
        bare = x.clone()
        for _ in range(8):
            bare = RELU_FIT[0] + RELU_FIT[1] * bare + RELU_FIT[2] * bare**2
        trained = chain.train()(x)
        exported = chain.eval()(x)
    p_bound = RELU_FIT[0] + RELU_FIT[1] * 3.0 + RELU_FIT[2] * 9.0  # the largest value p takes on [-3, 3]
    assert bare[0] > 1e30  # unclamped, eight squarings of an out-of-range input explode
    assert trained.abs().max() <= p_bound + 1e-5  # clamped, no stage can leave p([-3, 3])
    assert torch.allclose(exported, bare)  # eval (export, MPC) computes the bare polynomial
    assert bare[2] > 1e3 and trained[2] <= p_bound + 1e-5
    assert trained[3] == pytest.approx(float(bare[3]))  # an input that stays in range: both forms agree
    assert set(chain.state_dict()) == {f"{i}.coeffs" for i in range(8)}  # the range is not saved


def test_per_channel_ranges_come_from_the_fitted_statistics():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 4.0, 0.25]).view(3, 1, 1, 1))  # three channel scales
    gm = trace(model)
    site = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = collect_stats(gm, [x], sites=[site])[site]
    ctx = SiteContext(site, "relu", (3, 8, 8), nn.ReLU(), stats, train_range=1.5)
    poly = replacement_for("relu", "poly")(ctx)
    widest = model[0](x).detach().abs().amax((0, 2, 3))  # the ReLU's inputs are the conv's outputs
    assert torch.allclose(poly.input_range, 1.5 * widest, rtol=1e-5)
    assert replacement_for("relu", "poly")(SiteContext(site, "relu", (3, 8, 8), None, stats)).input_range is None


def test_recalibrate_bn_replaces_poisoned_statistics():
    data = load_dataset("synthetic", shape=(1, 12, 12), n=600)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 144, 4)
    )
    fit(model, data, TrainConfig(epochs=4, lr=0.05), progress=False)
    before = evaluate(model, data.val)[1]
    bn = model[1]
    with torch.no_grad():
        bn.running_var.fill_(3.3e11)  # what one exploding batch left in a ResNet-20 fine-tune (step 210)
    poisoned = evaluate(model, data.val)[1]
    model.eval()
    assert refresh_bn_stats(model, data.train, num_batches=2, batch_size=200) == 1
    with torch.no_grad():
        h = model[0](data.train.x[:400])
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    # The cumulative average of the two batches' unbiased variances, which the exact one is close to.
    assert torch.allclose(bn.running_var, h.var((0, 2, 3)), rtol=0.05)
    assert bn.momentum == 0.1 and not model.training  # settings and mode are restored
    after = evaluate(model, data.val)[1]
    assert before > 0.45 and poisoned < before - 0.15
    assert after == pytest.approx(before, abs=0.02)


def _poly_net(bound: float | None, depth: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        r = None if bound is None else torch.tensor([bound])
        layers += [
            nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            Poly(torch.tensor(RELU_FIT), input_range=r),
        ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 144, 4))


@pytest.mark.parametrize("bound", [None, 6.0])
def test_one_outlier_example_cannot_blow_up_a_clamped_polynomial_net(bound):
    data = load_dataset("synthetic", shape=(1, 12, 12), n=600)
    data.train.x[7] *= 100  # one example far outside the range every polynomial was fitted on
    model = _poly_net(bound)
    cfg = TrainConfig(epochs=1, lr=0.01, freeze_bn=True)  # fixed statistics: nothing renormalises a blow-up
    if bound is None:
        with pytest.raises(TrainingDiverged, match="loss became"):
            fit(model, data, cfg, progress=False)
    else:
        result = fit(model, data, cfg, progress=False)
        assert result.history[-1].train_loss < 1.5  # as on clean data (1.39 measured); unclamped: NaN at step 2
