"""Pre-activation WideResNet (Zagoruyko & Komodakis) for 32x32 inputs."""

from __future__ import annotations

from torch import Tensor, nn

from relu_opt.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the projection shortcut shares the first activation."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k: three groups of (depth-4)/6 pre-activation blocks, widths 16k/32k/64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, cin = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(PreActBlock(cin, w, stride=2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@register_model
def wide_resnet22_8(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WideResNet-22-8, pre-activation (16/128/256/512 channels)."""
    return WideResNet(22, 8, num_classes, in_channels)
