"""A MobileNetV2-style network for 28x28 and 32x32 inputs: inverted residual blocks with ReLU6."""

from __future__ import annotations

from torch import Tensor, nn

from relu_opt.models.registry import register_model


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection; a residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type = nn.ReLU6) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=act)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act), _conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residual stages (expansion t, channels c, blocks n, stride s), 1x1 head conv."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, act: type = nn.ReLU6, last: int = 128) -> None:
        super().__init__()
        layers, cin = [_conv_bn(in_channels, 16, 3, act=act)], 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act))
                cin = c
        layers.append(_conv_bn(cin, last, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2-style net for small images: inverted residuals, depthwise convs, ReLU6."""
    return MobileNetV2(num_classes, in_channels)


@register_model
def mobilenet_v2_hardswish(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """The same MobileNetV2-style net with Hardswish instead of ReLU6 (as MobileNetV3 uses)."""
    return MobileNetV2(num_classes, in_channels, act=nn.Hardswish)
