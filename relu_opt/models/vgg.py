"""VGG-16, CIFAR variant: 13 conv+BN+ReLU layers, 5 max-pools, one linear head."""

from __future__ import annotations

from torch import Tensor, nn

from relu_opt.models.registry import register_model

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                # ceil_mode keeps 28x28 inputs valid (28->14->7->4->2->1) and changes nothing at 32x32.
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm, CIFAR variant (5 max-pools, 512-d linear head)."""
    return VGG(_VGG16, num_classes, in_channels)
