"""Sites of any kind: optimize ViT / MobileNet-style models, per-kind budgets, and a user's own kind and
replacement flowing through census, optimize, export and the cost model."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu_opt
from relu_opt import ops
from relu_opt.activations import Poly
from relu_opt.backends.crypten.convert import check_supported, crypten_onnx
from relu_opt.backends.crypten.convert import prepare as prepare_for_crypten
from relu_opt.backends.crypten.cost_model import features
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.onnx_export import onnx_census
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.plan import Plan, apply_plan
from relu_opt.replacements import REPLACEMENTS, register_replacement
from relu_opt.training import TrainConfig, fit

SHAPE = (1, 1, 28, 28)
NON_POLYNOMIAL_ONNX = {"Erf", "Softmax", "LogSoftmax", "LayerNormalization", "HardSwish", "Clip", "Relu", "Sigmoid"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", shape=SHAPE[1:], n=360)


def _trained(name, data):
    model = create_model(name, num_classes=4, in_channels=1)
    fit(model, data, TrainConfig(epochs=1, lr=0.05), progress=False)
    return model.eval()


def _cfg(budget, **kw):
    return OptimizeConfig(budget=budget, epochs=1, rank_samples=60, fit_samples=60, **kw)


def _onnx_matches_loaded(outdir, x):
    sess = ort.InferenceSession(str(outdir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = relu_opt.load(outdir)(x).numpy()
    return np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-6)


@pytest.mark.slow
def test_vit_every_non_polynomial_op_replaced(data, tmp_path):
    model = _trained("vit_tiny", data)
    r = optimize(model, data, _cfg(0), tmp_path / "vit", base_spec="vit_tiny", progress=False)
    assert r.kinds == {
        "layernorm": {"before": 5 * 49 * 32, "after": 0, "budget": None},
        "softmax": {"before": 4 * 49 * 49, "after": 0, "budget": None},
        "gelu": {"before": 2 * 49 * 64, "after": 0, "budget": None},
    }
    assert {s.replacement for s in r.sites} == {"frozen-norm", "2quad", "poly"}
    mp = onnx.load(tmp_path / "vit" / "model.onnx")
    ops_left = {n.op_type for n in mp.graph.node}
    assert not ops_left & NON_POLYNOMIAL_ONNX, ops_left
    assert onnx_census(mp, SHAPE).totals_by_kind == {}
    assert _onnx_matches_loaded(tmp_path / "vit", data.test.x[:8])
    # what the parties would run passes the CrypTen pre-check
    check_supported(
        onnx.load_from_string(
            crypten_onnx(prepare_for_crypten(relu_opt.load(tmp_path / "vit"), data.test.x[:1]), data.test.x[:1])
        )
    )


@pytest.mark.slow
def test_mobilenet_relu6_budget_is_proved_on_onnx(data, tmp_path):
    model = _trained("mobilenet_v2", data)
    total = relu_opt.count(model, torch.randn(SHAPE)).totals_by_kind["relu6"]
    budget = total // 10
    r = optimize(
        model, data, _cfg(budget, granularity="channel"), tmp_path / "mb", base_spec="mobilenet_v2", progress=False
    )
    assert r.elements_before == total and 0 < r.elements_after <= budget
    mp = onnx.load(tmp_path / "mb" / "model.onnx")
    assert onnx_census(mp, SHAPE).totals_by_kind["relu6"] == r.elements_after  # kept elements gathered, then Clip
    assert _onnx_matches_loaded(tmp_path / "mb", data.test.x[:8])


class TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 4)

    def forward(self, x):
        h = F.relu6(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(h.flatten(1))


def test_per_kind_budgets_and_kinds_option(data, tmp_path):
    model = TwoKinds().eval()
    fit(model, data, TrainConfig(epochs=1, lr=0.02), progress=False)
    per_site = 4 * 28 * 28
    cfg = _cfg(per_site // 2, granularity="channel", kind_budgets=(("relu6", per_site // 4),))
    r = optimize(model, data, cfg, tmp_path / "two", progress=False)
    assert r.kinds["relu6"]["after"] <= per_site // 4 and r.kinds["relu"]["after"] <= per_site // 2
    assert r.kinds["relu6"]["after"] > 0 and r.kinds["relu"]["after"] > 0
    only = optimize(model, data, _cfg(0, kinds=("relu6",)), tmp_path / "only", progress=False)
    assert set(only.kinds) == {"relu6"} and only.elements_before == per_site
    onnx_totals = onnx_census(onnx.load(tmp_path / "only" / "model.onnx"), SHAPE).totals_by_kind
    assert onnx_totals == {"relu": per_site}  # the ReLU site was left alone


@pytest.fixture
def own_kind_and_replacement():
    builtin = ops.get_kind("softplus")
    ops.unregister_kind("softplus")
    ops.register_kind(
        ops.OpKind(
            "my_softplus",
            ops.TRANSCENDENTAL,
            F.softplus,
            modules=(nn.Softplus,),
            functions=(F.softplus,),
            onnx_ops=("Softplus",),
            exact_onnx=True,
            fix="optimize it: --kinds my_softplus",
        )
    )

    @register_replacement("line")
    def line(ctx):
        """The least-squares line through the site's measured (input, output) pairs."""
        if ctx.stats is None:
            return Poly(torch.zeros(2, ctx.shape[0]))
        from relu_opt.poly_fit import fit_poly

        st = ctx.stats
        return Poly(fit_poly(type(st)(st.count, st.x_pow[:3], st.f_x_pow[:2], st.f_sq, st.max_abs)))

    yield
    REPLACEMENTS.pop("line")
    ops.unregister_kind("my_softplus")
    ops.register_kind(builtin)


def test_a_new_kind_and_replacement_flow_through_everything(own_kind_and_replacement, data, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 28 * 28, 4))
    fit(model, data, TrainConfig(epochs=1, lr=0.02), progress=False)
    model.eval()
    c = relu_opt.count(model, torch.randn(SHAPE))
    assert c.totals_by_kind == {"my_softplus": 4 * 28 * 28}
    before = features(prepare_for_crypten(model, data.test.x[:1]))
    assert before.ops.get("transcendental") == 1
    r = optimize(model, data, _cfg(0, replace="line"), tmp_path / "sp", progress=False)
    assert r.kinds == {"my_softplus": {"before": 4 * 28 * 28, "after": 0, "budget": None}}
    assert [s.replacement for s in r.sites] == ["line"] and r.sites[0].kind == "my_softplus"
    plan = Plan.from_dict(json.loads((tmp_path / "sp" / "plan.json").read_text()))
    loaded = apply_plan(model, plan)  # a model outside the zoo: rebuild from the object, not the spec
    loaded.load_state_dict(torch.load(tmp_path / "sp" / "model.pt", weights_only=True))
    (poly,) = [m for m in loaded.modules() if isinstance(m, Poly)]
    assert poly.degree == 1  # the line, fitted per channel to softplus on the measured inputs
    after = features(prepare_for_crypten(loaded, data.test.x[:1]))
    assert "transcendental" not in after.ops and after.ops["poly"] == 1
    assert "Softplus" not in {n.op_type for n in onnx.load(tmp_path / "sp" / "model.onnx").graph.node}


class Mixed(nn.Module):
    """GELU, SiLU, sigmoid and a hand-written rsqrt LayerNorm on (N, 6, 16) token features."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(6 * 16, 4)

    def forward(self, x):
        h = F.gelu(self.fc1(x)) + F.silu(x) + torch.sigmoid(x)
        mu = h.mean(-1, keepdim=True)
        h = (h - mu) * torch.rsqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        return self.head(self.fc2(h).flatten(1))


@pytest.mark.slow
@pytest.mark.parties
def test_gelu_silu_sigmoid_rsqrt_model_through_count_optimize_export_and_bench(tmp_path):
    from relu_opt.encrypted import bench

    tokens = load_dataset("synthetic", shape=(6, 16), n=360)
    model = Mixed()
    fit(model, tokens, TrainConfig(epochs=1, lr=0.02), progress=False)
    model.eval()
    c = relu_opt.count(model, tokens.test.x[:1])
    assert c.totals_by_kind == {"gelu": 96, "silu": 96, "sigmoid": 96, "rsqrt": 6}
    r = optimize(model, tokens, _cfg(0), tmp_path / "mixed", progress=False)
    assert {k: v["after"] for k, v in r.kinds.items()} == {"gelu": 0, "silu": 0, "sigmoid": 0, "rsqrt": 0}
    plan = Plan.from_dict(json.loads((tmp_path / "mixed" / "plan.json").read_text()))
    optimized = apply_plan(Mixed(), plan)
    optimized.load_state_dict(torch.load(tmp_path / "mixed" / "model.pt", weights_only=True))
    x = tokens.test.x[:4]
    b = bench(model, x, optimized=optimized.eval(), runs=1, warmup=0, timeout=240)
    original, opt, floor = b.models
    assert opt.rounds < original.rounds and opt.bytes_per_party[0] < original.bytes_per_party[0]
    assert original.top1_agreement >= 0.75 and opt.top1_agreement == 1.0  # polynomials are exact in MPC


@pytest.mark.slow
def test_cli_kinds_options(tmp_path):
    from typer.testing import CliRunner

    from relu_opt.cli import app

    runner = CliRunner()
    base = ["optimize", "mobilenet_v2", "--data", "digits", "--rank-samples", "50", "--epochs", "0.2"]
    r = runner.invoke(app, [*base, "--budget", "0", "--kinds", "relu7", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown kind(s) relu7" in r.output
    r = runner.invoke(app, [*base, "--budget", "0", "--kind-budget", "relu6:5", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "must be KIND=N" in r.output
    r = runner.invoke(app, [*base, "--budget", "0", "--kinds", "relu6", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "relu6" in r.output and "-> 0" in r.output
    report = json.loads((tmp_path / "o" / "budget_0" / "report.json").read_text())
    assert report["result"]["kinds"]["relu6"]["after"] == 0 and report["config"]["kinds"] == ["relu6"]
