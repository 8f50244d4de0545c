"""Structure removal: channels through residual adds and concatenations, residual branches, replayed from
plan.json, priced like any smaller model, and never chosen where the non-linear choices alone suffice."""

import copy
import json

import pytest
import torch
from torch import nn

from relu_opt import pruning as P
from relu_opt.backends.crypten.calibration import calibrate
from relu_opt.backends.crypten.cost_model import features
from relu_opt.data import load_dataset
from relu_opt.graph import propagate_shapes, trace
from relu_opt.onnx_export import export
from relu_opt.passes.census import census
from relu_opt.passes.pi import prepare_for_pi


class CatRes(nn.Module):
    """A stem, a residual block (optional), a concatenation of the stream with a side branch, a head."""

    def __init__(self, stem: int = 8, inner: int = 8, side: int = 4, head: int = 16, block: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, padding=1), nn.BatchNorm2d(stem), nn.ReLU())
        self.block = block
        if block:
            self.a = nn.Sequential(nn.Conv2d(stem, inner, 3, padding=1), nn.BatchNorm2d(inner), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(inner, stem, 3, padding=1), nn.BatchNorm2d(stem))
        self.side = nn.Sequential(nn.Conv2d(stem, side, 1), nn.BatchNorm2d(side), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(stem + side, head, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(head, 4)

    def forward(self, x):
        x = self.stem(x)
        # without its block (the branch dropped) the closing ReLU stays
        x = torch.relu(self.b(self.a(x)) + x) if self.block else torch.relu(x)
        x = torch.cat([x, self.side(x)], 1)
        return self.fc(self.head(x).mean((2, 3)))


def _trained_catres():
    torch.manual_seed(0)
    model = CatRes().eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def _independent_count(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Return (ReLU elements per sample, MACs) counted while the model runs: hooks on its linear layers,
    and torch.relu (which nn.ReLU calls too) wrapped."""
    relus, macs = [0], [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    relu = torch.relu
    try:

        def counting_relu(t, *a, **k):
            relus[0] += t[0].numel()
            return relu(t, *a, **k)

        torch.relu = counting_relu
        with torch.no_grad():
            model(x)
    finally:
        torch.relu = relu
        for h in hooks:
            h.remove()
    return relus[0], macs[0]


def test_pruned_residual_and_concat_model_matches_an_independent_count(tmp_path):
    """Channels removed through a residual add and a concatenation, then the block's branch dropped: the
    pruned model runs, exports to verified ONNX, and its census, MACs and modeled cost equal those of the
    same narrow architecture built directly (never pruned) with the pruned weights, counted by hooks."""
    model = _trained_catres()
    data = load_dataset("synthetic", shape=(1, 12, 12))
    x = data.train.x[:1]
    gm = propagate_shapes(trace(copy.deepcopy(model)), x)
    assert set(P.residual_branches(gm)) == {"add"}  # the block's add; the concatenation is no branch
    scores = P.structure_scores(gm, data, samples=64)
    assert scores.branches["add"] > 0 and all(v.shape[0] in (8, 4, 16) for v in scores.channels.values())
    for branches, (stem, inner, side, head) in ((0, (4, 4, 2, 8)), (1, (4, 4, 2, 8))):
        cand = P.candidate(gm, x, scores, 0.5, branches)
        assert cand.loss > 0 and P.Pruning.from_dict(json.loads(json.dumps(cand.to_dict()))) == cand
        pruned = P.apply_pruning(gm, cand, x)
        narrow = CatRes(stem, inner, side, head, block=not branches).eval()
        narrow.load_state_dict(pruned.state_dict())  # same names, the narrow shapes: else this raises
        assert torch.allclose(pruned(data.val.x[:8]), narrow(data.val.x[:8]), atol=1e-5)
        relus, macs = _independent_count(narrow, x)
        c = census(pruned)
        assert c.totals_by_kind["relu"] == relus
        assert c.total_macs == macs
        prepared = prepare_for_pi(pruned, x)
        r = export(
            prepared,
            x,
            tmp_path / f"pruned{branches}.onnx",
            census_totals=c.totals_by_kind,
            parity_inputs=data.val.x[:8],
        )
        assert r.onnx_totals["relu"] == relus
        cost = calibrate()
        mine = cost.bytes(features(prepared)), cost.rounds(features(prepared))
        theirs = prepare_for_pi(narrow, x)
        assert mine == pytest.approx((cost.bytes(features(theirs)), cost.rounds(features(theirs))))
        full = prepare_for_pi(gm, x)
        assert mine[0] < cost.bytes(features(full))


def test_a_replayed_pruning_that_does_not_fit_is_refused():
    gm = propagate_shapes(trace(_trained_catres()), torch.zeros(1, 1, 12, 12))
    with pytest.raises(ValueError, match="does not fit"):
        P.apply_pruning(gm, P.Pruning(0.5, (), (("stem.0", (0, 99)),)), torch.zeros(1, 1, 12, 12))
    with pytest.raises(ValueError, match="not a residual add"):
        P.apply_pruning(gm, P.Pruning(1.0, ("cat",)), torch.zeros(1, 1, 12, 12))


def test_structure_is_paid_only_where_the_non_linear_choices_cannot_meet_the_goal(tmp_path):
    """With --prune channels and a latency goal the ReLU choices alone meet, the result is the ReLU-only one
    (nothing pruned: never worse); below their floor, structure goes, and the folder loads as the smaller
    model with the outputs it saved."""
    from relu_opt.backends import Pricing
    from relu_opt.cache import state_digest
    from relu_opt.models import create_model
    from relu_opt.optimizer import OptimizeConfig, modeled_latency, optimize
    from relu_opt.plan import load
    from relu_opt.training import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    fit(model, data, TrainConfig(epochs=1, lr=0.05), progress=False)
    # a slow link, where bytes decide: on a WAN, rounds do, and fewer channels save no rounds
    slow = Pricing(network="1,1")
    base = OptimizeConfig(epochs=0, strategy="taylor", rank_samples=64, fit_samples=64, pricing=slow)
    original = modeled_latency(model, data.train.x[:1], base)
    every = OptimizeConfig(**{**base.__dict__, "budget": 0, "prune": "none"})  # every ReLU replaced
    optimize(model, data, every, tmp_path / "every", progress=False)
    floor = modeled_latency(load(tmp_path / "every", model=model), data.train.x[:1], base)
    deep_goal = round(0.85 * floor, 6)  # below what any ReLU choice reaches
    runs = {}
    for name, goal, prune in (
        ("relu", 0.5 * original, "none"),
        ("both", 0.5 * original, "channels"),
        ("deep", deep_goal, "channels"),
    ):
        cfg = OptimizeConfig(**{**base.__dict__, "latency_budget": round(goal, 6), "prune": prune})
        runs[name] = optimize(model, data, cfg, tmp_path / name, base_spec="small_cnn", progress=False)
    relu_only, both, deep = runs["relu"], runs["both"], runs["deep"]
    assert both.pruning["removed"] == "nothing pruned" and both.pruning["why"] == "--prune channels"
    assert [s.kept for s in both.sites] == [s.kept for s in relu_only.sites]
    assert both.accuracy_after == relu_only.accuracy_after
    with pytest.raises(Exception, match="even with every site replaced"):
        cfg = OptimizeConfig(**{**base.__dict__, "latency_budget": deep_goal, "prune": "none"})
        optimize(model, data, cfg, tmp_path / "none", progress=False)
    assert deep.pruning["channels"]
    trials = deep.pruning["trials"]  # one candidate per channel fraction, compared after a short distillation
    assert len({t["keep"] for t in trials}) == len(trials) >= 1
    if len(trials) > 1:
        best = max(trials, key=lambda t: t["trial_val_accuracy"])
        assert best["keep"] == deep.pruning["keep"] and best["removed"] == deep.pruning["removed"]
    assert modeled_latency(load(tmp_path / "deep", model=model), data.train.x[:1], base) <= deep_goal * 1.01
    loaded = load(tmp_path / "deep", model=model)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    assert 100 * evaluate(loaded, data.test)[1] == pytest.approx(deep.accuracy_after, abs=1e-6)
    plan = json.loads((tmp_path / "deep" / "plan.json").read_text())
    assert plan["pruning"]["channels"] == deep.pruning["channels"]
    assert plan["meta"]["base_weights"] == state_digest(model)  # the original's, so bench checks its MODEL


def test_prune_mode_is_checked_and_defaults_by_the_linear_share():
    from relu_opt.errors import ConfigError
    from relu_opt.models import create_model
    from relu_opt.optimizer import OptimizeConfig
    from relu_opt.optimizer.structure import linear_share, prune_mode

    with pytest.raises(ConfigError, match="--prune 'layers' is not known; choose one of none, channels"):
        OptimizeConfig(prune="layers")
    with pytest.raises(ConfigError, match="--prune channels spends structure toward a latency goal"):
        OptimizeConfig(prune="channels", budget=100)  # refused, not ignored
    assert OptimizeConfig(prune="channels").searches and OptimizeConfig(prune="none", budget=100).prune == "none"
    model = create_model("small_cnn", num_classes=4, in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    gm = propagate_shapes(trace(model), x)
    calibrate()
    share = linear_share(gm, x, OptimizeConfig())
    assert 0 < share < 1
    mode, why = prune_mode(gm, x, OptimizeConfig())
    assert mode == ("channels" if share > 0.25 else "none") and f"{share:.0%}" in why
    assert prune_mode(gm, x, OptimizeConfig(prune="channels")) == ("channels", "--prune channels")
