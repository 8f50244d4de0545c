import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relu_opt
from relu_opt.models import create_model, list_models


class Spellings(nn.Module):
    """Every ReLU spelling exactly once, on tensors of distinct sizes so each is identifiable."""

    def __init__(self):
        super().__init__()
        self.r = nn.ReLU()
        self.ri = nn.ReLU(inplace=True)

    def forward(self, x):  # x: (N, 64)
        outs = [
            self.r(x[:, :1]),
            self.ri(x[:, :2].clone()),
            F.relu(x[:, :3]),
            F.relu(x[:, :4].clone(), inplace=True),
            F.relu_(x[:, :5].clone()),
            torch.relu(x[:, :6]),
            torch.relu_(x[:, :7].clone()),
            x[:, :8].relu(),
            x[:, :9].clone().relu_(),
            torch.clamp(x[:, :10], min=0),
            x[:, :11].clamp(min=0),
            torch.clamp_min(x[:, :12], 0),
            x[:, :13].clamp_min(0),
        ]
        return torch.cat(outs, 1)


def test_each_relu_spelling_is_counted_once():
    c = relu_opt.count(Spellings(), torch.randn(1, 64))
    relu = c.of_kind("relu")
    assert sorted(s.elements for s in relu) == list(range(1, 14))
    assert c.total_relu == sum(range(1, 14))
    assert set(c.totals_by_kind) == {"relu"}


def test_relu_like_and_other_kinds():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.acts = nn.ModuleList(
                [
                    nn.ReLU6(),
                    nn.Hardtanh(),
                    nn.LeakyReLU(),
                    nn.PReLU(),
                    nn.Hardswish(),
                    nn.GELU(),
                    nn.SiLU(),
                    nn.Mish(),
                    nn.Sigmoid(),
                    nn.Tanh(),
                ]
            )
            self.ln = nn.LayerNorm(8)

        def forward(self, x):  # (N, 4, 8)
            y = [a(x) for a in self.acts]
            y += [F.gelu(x), F.silu(x), torch.softmax(x, -1), x.clamp(0, 6), self.ln(x)]
            return torch.stack(y)

    c = relu_opt.count(M(), torch.randn(1, 4, 8))
    t = c.totals_by_kind
    assert "relu" not in t
    assert t["relu6"] == 2 * 32  # ReLU6 and clamp(0, 6)
    assert t["hardtanh"] == 32
    assert t["gelu"] == 2 * 32 and t["silu"] == 2 * 32
    for kind in ("leaky_relu", "prelu", "hardswish", "mish", "sigmoid", "tanh", "softmax"):
        assert t[kind] == 32, kind
    assert t["layernorm"] == 32  # one unit everywhere: the normalised elements, as ONNX counts them
    # two comparisons per ReLU6/Hardtanh/Hardswish element, one per leaky/PReLU element
    assert c.total_comparisons == 2 * (2 * 32 + 32 + 32) + 32 + 32
    assert c.to_dict()["total_comparisons"] == c.total_comparisons


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2), (3, 1)])
def test_maxpool_counts_kernel_minus_one_comparisons_per_output(k, stride):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.MaxPool2d(k, stride))
    c = relu_opt.count(model, torch.randn(1, 3, 12, 12))
    out = (12 - k) // stride + 1
    assert c.totals_by_kind == {"maxpool": 5 * out * out * (k * k - 1)}
    fn = relu_opt.count(nn.Sequential(nn.Identity()), torch.randn(1, 1))
    assert fn.sites == ()


def test_functional_maxpool_and_feeding_macs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x):
            y = F.max_pool2d(self.bn(self.conv(x)), 2)
            return F.relu(self.fc(y.flatten(1)))

    c = relu_opt.count(M(), torch.randn(1, 2, 8, 8))
    (pool,) = c.of_kind("maxpool")
    assert pool.elements == 4 * 4 * 4 * 3
    assert pool.macs == 4 * 8 * 8 * (2 * 9)  # the conv before it, through BatchNorm
    (relu,) = c.of_kind("relu")
    assert relu.macs == 10 * 64  # the linear layer only, not the conv behind the pool
    assert c.total_macs == 4 * 8 * 8 * 18 + 640
    assert c.params == sum(p.numel() for p in M().parameters())


def _resnet_cifar_relus(blocks, widths, hw):
    total, size = widths[0] * hw * hw, hw  # stem
    for i, (n, w) in enumerate(zip(blocks, widths)):
        if i:
            size = (size + 1) // 2
        total += n * 2 * w * size * size  # two ReLUs per BasicBlock
    return total


def _wrn_relus(depth, k, hw):
    n, total, cin, size = (depth - 4) // 6, 0, 16, hw
    for i, w in enumerate((16 * k, 32 * k, 64 * k)):
        for j in range(n):
            total += cin * size * size  # pre-activation of the block's input
            if i and not j:
                size //= 2
            total += w * size * size
            cin = w
    return total + cin * size * size  # final BN-ReLU


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnet18", _resnet_cifar_relus((2, 2, 2, 2), (64, 128, 256, 512), 32)),
        ("resnet20", _resnet_cifar_relus((3, 3, 3), (16, 32, 64), 32)),
        ("resnet56", _resnet_cifar_relus((9, 9, 9), (16, 32, 64), 32)),
        ("wide_resnet22_8", _wrn_relus(22, 8, 32)),
    ],
)
def test_zoo_relu_counts_from_architecture(name, expected):
    c = relu_opt.count(create_model(name), torch.randn(1, 3, 32, 32))
    assert c.total_relu == expected
    assert sum(s.elements for s in c.of_kind("relu")) == expected
    assert abs(sum(s.share for s in c.of_kind("relu")) - 1) < 1e-9


def test_published_figures():
    # The figures the issue quotes, also derived above from the architecture.
    assert _resnet_cifar_relus((2, 2, 2, 2), (64, 128, 256, 512), 32) == 557_056
    assert _resnet_cifar_relus((3, 3, 3), (16, 32, 64), 32) == 188_416
    assert _wrn_relus(22, 8, 32) == 1_392_640
    assert _resnet_cifar_relus((3, 3, 3), (16, 32, 64), 28) == 144_256


@pytest.mark.parametrize("name", list_models())
def test_zoo_takes_fashion_mnist_input(name):
    model = create_model(name, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    c = relu_opt.count(model, torch.randn(1, 1, 28, 28))
    assert c.total_relu > 0 or c.total_comparisons > 0 or c.totals_by_kind.get("softmax", 0) > 0


def test_vgg16_maxpool_comparisons():
    c = relu_opt.count(create_model("vgg16"), torch.randn(1, 3, 32, 32))
    outputs = [64 * 16 * 16, 128 * 8 * 8, 256 * 4 * 4, 512 * 2 * 2, 512 * 1 * 1]
    assert c.totals_by_kind["maxpool"] == 3 * sum(outputs)
    assert c.total_relu == sum(
        w * s * s for w, s in [(64, 32)] * 2 + [(128, 16)] * 2 + [(256, 8)] * 3 + [(512, 4)] * 3 + [(512, 2)] * 3
    )


def test_census_does_not_touch_batchnorm_statistics():
    model = create_model("small_cnn").train()
    before = model.features[1].running_mean.clone()
    relu_opt.count(model, torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, model.features[1].running_mean)
    assert model.training
