import subprocess
import sys

import pytest
import torch
import torch.fx as fx
from torch import nn

import relu_opt
from relu_opt.graph import trace
from relu_opt.passes.base import GraphPass, graph_pass, run_passes
from relu_opt.passes.pi import linear_floor, prepare_for_pi

X = torch.randn(2, 3, 8, 8)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        h = self.pool(self.act(self.bn(self.conv(x))))
        h = self.ln(h.flatten(2))
        return torch.softmax(nn.functional.gelu(h), -1).flatten(1)


def test_run_passes_copies_and_propagates_shapes_only_where_needed():
    seen = []

    @graph_pass(needs_shapes=True)
    def reads_shapes(gm: fx.GraphModule) -> fx.GraphModule:
        seen.append(all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output"))
        return gm

    def drop_relu6(gm: fx.GraphModule) -> fx.GraphModule:
        from relu_opt.passes.replace import replace_sites

        return replace_sites(gm, {"act": nn.Identity()})

    gm = trace(Mixed().eval())
    out = run_passes(gm, [GraphPass(drop_relu6), reads_shapes], X[:1])
    assert seen == [True]
    assert isinstance(gm.get_submodule("act"), nn.ReLU6)  # the input is untouched
    assert isinstance(out.get_submodule("act"), nn.Identity)
    assert out.graph.nodes and all("tensor_meta" in n.meta for n in out.graph.nodes if n.op != "output")


def test_prepare_and_floor_linearize_every_kind():
    model = Mixed().eval()
    model.bn.running_mean.uniform_(-1, 1)
    prepared = prepare_for_pi(model, X[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    with torch.no_grad():
        assert torch.allclose(prepared(X), model(X), atol=1e-5)
    before = relu_opt.count(prepared, X[:1]).totals_by_kind
    assert set(before) == {"relu6", "maxpool", "layernorm", "gelu", "softmax"}
    floor = linear_floor(prepared, X[:1])
    assert relu_opt.count(floor, X[:1]).totals_by_kind == {}
    assert floor(X).shape == model(X).shape


@pytest.mark.slow
def test_optimizer_does_not_import_the_crypten_backend():
    code = "import sys, relu_opt.optimizer; print(any(m.startswith('relu_opt.backends.crypten') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_frozen_norm_folds_into_the_linears_that_read_it():
    from relu_opt.passes.fold_norm import Centre, fold_frozen_norm
    from relu_opt.replacements import FrozenNorm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.n1 = FrozenNorm(1, torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen))
            self.n2 = FrozenNorm(1, torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen))
            self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 3)

        def forward(self, x):
            h = self.n1(x)
            h = self.q(h) * self.k(h)
            return self.out(self.n2(h).mean(1))  # n2 feeds a mean, not a linear: left as is

    x = torch.randn(4, 5, 8)
    model = Net().eval()
    folded = fold_frozen_norm(trace(model))
    assert isinstance(folded.get_submodule("n1"), Centre) and isinstance(folded.get_submodule("n2"), FrozenNorm)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(model.n1, FrozenNorm)  # the input is untouched
