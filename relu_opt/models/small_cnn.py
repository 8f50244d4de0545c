"""A three-conv network that trains in seconds: for tests, demos and the default job."""

from __future__ import annotations

from torch import Tensor, nn

from relu_opt.models.registry import register_model


class SmallCNN(nn.Module):
    """conv-BN-ReLU-avgpool twice, conv-BN-ReLU, global average pool, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model
def small_cnn(num_classes: int = 10, in_channels: int = 3) -> SmallCNN:
    """Small CNN (16/32/64 channels, average pooling) that trains in seconds."""
    return SmallCNN(num_classes, in_channels)
