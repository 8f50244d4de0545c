"""The SPU backend: our torch.fx -> JAX lowering against torch, the protocol and dealer rules, the missing-SPU
error, and (with parties) Cheetah and SEMI2K runs as real processes, their statistics and the cost model."""

import builtins
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from relu_opt import encrypted
from relu_opt.activations import MaskedReLU, PartialSite, Poly, Square
from relu_opt.backends import Pricing
from relu_opt.errors import BackendError, ConfigError
from relu_opt.models import create_model
from relu_opt.passes.pi import linear_floor, prepare_for_pi
from relu_opt.replacements import TwoQuad

HAVE_SPU = importlib.util.find_spec("spu") is not None
needs_spu = pytest.mark.skipif(not HAVE_SPU, reason="SecretFlow SPU is not installed (Python 3.10-3.11 only)")


class Mixed(nn.Module):
    """Every kind of op the lowering has to cover in one model: conv, partial polynomial site, max-pool,
    LayerNorm, sigmoid, 2quad, residual add, linear, mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        keep = torch.rand(4 * 8 * 8) > 0.5
        self.site = PartialSite(keep, (4, 8, 8), Poly(torch.tensor([0.1, 0.5, 0.2])))
        self.pool = nn.MaxPool2d(2)
        self.norm = nn.LayerNorm(16)
        self.quad = TwoQuad(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.pool(self.site(self.conv(x))).flatten(2)
        y = torch.sigmoid(self.norm(y)) + self.quad(y)
        return self.head(y).mean(1)


def _jax_logits(gm, x):
    import jax

    from relu_opt.backends.spu.lower import lower

    low = lower(gm, x)
    return np.asarray(jax.jit(low.fn)(x.numpy(), *low.weights)), low


@needs_spu
@pytest.mark.parametrize(
    "which",
    [
        pytest.param("resnet20", marks=pytest.mark.slow),
        pytest.param("floor", marks=pytest.mark.slow),
        "mixed",
        "masked",
    ],
)
def test_lowering_computes_what_torch_computes(which):
    torch.manual_seed(0)
    if which == "mixed":
        model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    elif which == "masked":
        c = (torch.arange(8) % 2 == 0).float().view(8, 1, 1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MaskedReLU(c, Square()), nn.AvgPool2d(2), nn.Flatten())
        model, x = model.eval(), torch.randn(2, 3, 8, 8)
    else:
        model, x = create_model("resnet20", num_classes=10, in_channels=1).eval(), torch.randn(2, 1, 28, 28)
    gm = prepare_for_pi(model, x)
    if which == "floor":
        gm = linear_floor(gm, x)
    got, low = _jax_logits(gm, x)
    ref = gm(x).detach().numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert all(w.dtype == np.float32 for w in low.weights) and len(low.weights) > 0
    if which == "mixed":
        assert {"index_select", "cat", "max_pool2d_with_indices", "native_layer_norm", "sigmoid"} <= set(low.ops)


@needs_spu
def test_an_op_without_lowering_is_named_with_the_fix_before_any_party_starts():
    class Erf(nn.Module):
        def forward(self, x):
            return torch.erf(x)

    engine = Pricing(backend="spu").engine()
    x = torch.randn(1, 3, 8, 8)
    gm = engine.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), Erf()), x)
    with pytest.raises(BackendError, match=r"cannot run aten\.erf .*--replace.*--backend crypten"):
        engine.check(gm, x)
    transposed = engine.prepare(nn.Sequential(nn.ConvTranspose2d(3, 4, 2)), x)
    with pytest.raises(BackendError, match="transposed"):
        engine.check(transposed, x)


@needs_spu
def test_protocols_and_dealers_follow_the_threat_model():
    assert Pricing(backend="spu").describe() == "SPU CHEETAH, 2 parties, no dealer"
    assert Pricing(backend="spu").insecure is None
    with pytest.raises(ConfigError, match="only from party 0.*--dealer party0.*--protocol cheetah"):
        Pricing(backend="spu", protocol="semi2k")
    semi = Pricing(backend="spu", protocol="semi2k", dealer="party0")
    assert semi.insecure and "INSECURE" in semi.describe()
    with pytest.raises(ConfigError, match="aby3 runs 3 parties; pass --parties 3"):
        Pricing(backend="spu", protocol="aby3")
    assert Pricing(backend="spu", protocol="aby3", parties=3).dealer_name == "none"
    with pytest.raises(ConfigError, match="needs no dealer"):
        Pricing(backend="spu", dealer="third-party")
    with pytest.raises(ConfigError, match="--protocol is not for --backend crypten"):
        Pricing(protocol="cheetah")
    with pytest.raises(ConfigError, match="not a protocol of --backend spu; choose cheetah, semi2k, aby3"):
        Pricing(backend="spu", protocol="spdz")
    # the cost-model and ranking caches tell protocols apart, and CrypTen's keys stay as they were
    assert Pricing(backend="spu").key() != Pricing(backend="spu", protocol="semi2k", dealer="party0").key()
    assert Pricing().key() == {"backend": "crypten", "dealer": "third-party", "parties": 2}


def test_without_spu_the_backend_is_one_line_naming_the_fix(monkeypatch):
    from relu_opt.backends.spu import compat

    real_import = builtins.__import__

    def no_spu(name, *args, **kwargs):
        if name == "spu" or name.startswith("spu."):
            raise ImportError("No module named 'spu'")
        return real_import(name, *args, **kwargs)

    compat.require_spu.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_spu)
    monkeypatch.setattr(sys, "version_info", (3, 13, 0, "final", 0))
    try:
        with pytest.raises(ConfigError) as e:
            Pricing(backend="spu")
    finally:
        compat.require_spu.cache_clear()
    msg = str(e.value)
    assert "Python 3.10-3.11 only (this is 3.13)" in msg and "--backend crypten" in msg and "\n" not in msg
    assert Pricing().describe().startswith("CrypTen")  # everything else still works


@pytest.mark.slow
def test_cli_refuses_a_protocol_for_crypten_in_one_line(tmp_path):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "relu_opt.cli", "bench", "small_cnn", "--input-shape", "1,1,28,28", "--protocol", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --protocol is not for --backend crypten (it has one protocol); leave it out"
    )


def test_profile_log_is_parsed_into_totals_and_the_linear_part():
    from relu_opt.backends.spu.party import stats_of

    log = """[info] [api.cc:223] - pphlo.convolution, executed 2 times, duration 0.9s, send bytes 1000 recv bytes 800, \
send actions 9, recv actions 9
[info] [api.cc:223] - pphlo.maximum, executed 1 times, duration 0.1s, send bytes 300 recv bytes 200, send actions 40, \
recv actions 40
[info] [api.cc:233] Link details: total send bytes 1300, recv bytes 1000, send actions 49, recv actions 49"""
    s = stats_of(log)
    assert (s["sent"], s["received"], s["sends"]) == (1300, 1000, 49)
    assert s["linear"]["sent"] == 1000 and s["linear"]["s"] == pytest.approx(0.9)
    with pytest.raises(BackendError, match="no profile"):
        stats_of("nothing here")


@needs_spu
@pytest.mark.parties
def test_cheetah_runs_two_real_parties_and_counts_what_they_send():
    """small_cnn under CHEETAH: the logits agree with plaintext, steady-state bytes and messages per party
    come from SPU's profile, the first forward's setup (OT) is apart, and most bytes are the convolutions'."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    r = encrypted.bench(model, x, pricing=Pricing(backend="spu"), batch=1, timeout=300)
    orig, floor = r.models[0], r.models[-1]
    assert r.title == "SPU CHEETAH" and r.dealer == "none" and r.insecure is None
    assert orig.top1_agreement == 1.0 and orig.max_abs_err < 0.05
    assert orig.sent_per_party[0] > 0 and orig.sent_per_party[0] == orig.received_per_party[1]
    assert orig.bytes_per_party[0] == orig.bytes_per_party[1]  # two parties: one's sends are the other's receipts
    assert len(orig.sends_per_party) == 2 and min(orig.sends_per_party) == orig.rounds
    assert orig.offline_bytes > 5e6  # Cheetah's OT setup, measured on the first forward only
    assert floor.bytes_per_party[0] < orig.bytes_per_party[0] and floor.relu_elements == 0
    assert floor.linear_share > 0.95 and 0.3 < orig.linear_share < floor.linear_share


@needs_spu
@pytest.mark.parties
def test_semi2k_with_party0_dealing_runs_and_is_labelled_insecure():
    model = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    pricing = Pricing(backend="spu", protocol="semi2k", dealer="party0")
    r = encrypted.bench(model, x, pricing=pricing, batch=2, timeout=300)
    assert r.insecure and any("INSECURE" in w for w in r.warnings)
    assert r.models[0].top1_agreement == 1.0
    assert r.models[0].offline_bytes == 0  # party 0 deals: nothing crosses a link for it, nothing is counted


@needs_spu
@pytest.mark.parties
def test_cheetah_cost_model_predicts_measured_bytes(tmp_path):
    """A cost model fitted to a few measured layers and sites (the calibration's own fitting, on a reduced
    suite) predicts another model's steady-state Cheetah bytes within 10%; a layer missing from the table is
    measured once and then priced exactly."""
    from relu_opt.backends.spu import calibration as cal
    from relu_opt.backends.spu.cost_model import SpuCostModel, fit_other, linear_layer

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    gm = prepare_for_pi(model, x[:1])
    measure = lambda layers: cal.measure_layers("cheetah", 2, "none", layers, 300)  # noqa: E731
    suite = [("relu_large", (1, 16, 28, 28), nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))]
    suite += [("relu_small", (1, 16, 14, 14), nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))]
    from relu_opt.backends.spu.measure import measure as run

    samples = []
    for name, shape, m in suite:
        sgm = prepare_for_pi(m.eval(), torch.randn(shape))
        conv = [lay for n in sgm.graph.nodes if (lay := linear_layer(sgm, n))]
        table = measure(conv)
        r = run([(name, sgm)], torch.randn((3,) + shape[1:]), "cheetah", batch=1, timeout=300)[0]
        rest = [max(r.bytes_per_party) - table[conv[0][0]][0], r.round_trips - table[conv[0][0]][1], 0.0]
        samples.append(({"relu": 1}, {"relu": int(np.prod(shape[1:]))}, rest))
    terms, (b, t, s), _ = fit_other(samples)
    cm = SpuCostModel("cheetah", 2, terms, b, t, s, measure=measure)
    assert 60 < cm.element_bytes("relu") < 200  # about 100 B per ReLU element under Cheetah
    predicted = cm.cost(gm).bytes  # measures small_cnn's layers once, into the table
    assert not cm.estimated and len(cm.linear) == len(cm.missing(gm)) + len(cm.linear) > 0
    measured = encrypted.bench(model, x, pricing=Pricing(backend="spu"), batch=1, timeout=300).models[0]
    assert predicted == pytest.approx(max(measured.bytes_per_party), rel=0.10)
    json.dumps(cm.to_dict())  # what the cache holds
