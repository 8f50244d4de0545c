import torch
from torch import nn

import relu_opt
from relu_opt.activations import MaskedReLU, PartialReLU, Poly, Square
from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.passes.fold_bn import fold_batchnorm
from relu_opt.passes.replace import linearize, materialize_partial, maxpool_to_avgpool, relu_nodes, replace_sites

X = torch.randn(3, 3, 16, 16)


def _random_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_fold_batchnorm_keeps_outputs():
    for name in ("resnet20", "wide_resnet22_8", "vgg16"):
        model = _random_bn(create_model(name))
        gm = fold_batchnorm(trace(model))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
        with torch.no_grad():
            ref, got = model(X), gm(X)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # input untouched


def _masked(gm, mask_fn, rep=None):
    new = {}
    for n in relu_nodes(gm):
        shape = tuple(n.meta["tensor_meta"].shape[1:])
        new[n.name] = MaskedReLU(mask_fn(shape), rep(shape[0]) if rep else None)
    return replace_sites(gm, new)


def test_full_mask_is_relu_and_partial_form_is_exact():
    model = _random_bn(create_model("resnet20"))
    gm = propagate_shapes(trace(model), X[:1])
    full = _masked(gm, lambda s: torch.ones(s[0], 1, 1))
    with torch.no_grad():
        assert torch.equal(full(X), model(X))
    assert relu_opt.count(full, X[:1]).total_relu == relu_opt.count(model, X[:1]).total_relu
    gen = torch.Generator().manual_seed(0)
    pixel = _masked(gm, lambda s: (torch.rand(s, generator=gen) < 0.3).float(), lambda c: Poly(torch.randn(3, c) * 0.1))
    part = materialize_partial(propagate_shapes(pixel, X[:1]))
    assert any(isinstance(m, PartialReLU) for m in part.modules())
    with torch.no_grad():
        assert torch.allclose(part(X), pixel(X), atol=1e-5)
    kept = sum(int(m.mask.sum()) for m in pixel.modules() if isinstance(m, MaskedReLU))
    assert relu_opt.count(part, X[:1]).total_relu == kept


def test_materialize_all_or_nothing_masks():
    gm = propagate_shapes(trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())), X[:1])
    keep_first = replace_sites(
        gm, {"_1": MaskedReLU(torch.ones(4, 1, 1)), "_3": MaskedReLU(torch.zeros(4, 1, 1), Square())}
    )
    out = materialize_partial(propagate_shapes(keep_first, X[:1]))
    assert isinstance(out.get_submodule("1"), nn.ReLU) and isinstance(out.get_submodule("3"), Square)
    with torch.no_grad():
        assert torch.equal(out(X), keep_first(X))


def test_replace_keeps_names_and_linearize_and_pool():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    gm = linearize(trace(model))
    assert [n.name for n in gm.graph.nodes] == [n.name for n in trace(model).graph.nodes]
    assert isinstance(gm.get_submodule("1"), nn.Identity)
    avg = maxpool_to_avgpool(gm)
    assert isinstance(avg.get_submodule("2"), nn.AvgPool2d)
    with torch.no_grad():
        assert torch.allclose(avg(X), nn.functional.avg_pool2d(model[0](X), 2))
    assert relu_opt.count(avg, X[:1]).totals_by_kind == {}
