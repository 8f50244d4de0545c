"""Count the ReLUs of your own model and export it to a verified ONNX graph."""

import sys
from pathlib import Path

import torch
from torch import nn

import relu_opt


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(nn.functional.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    model, example = MyNet().eval(), torch.randn(1, 3, 32, 32)
    census = relu_opt.count(model, example)
    for site in census.sites:
        print(f"{site.name:10s} {site.kind:8s} {site.elements:>7,d} elements  {site.share:6.1%}  MACs in {site.macs:,}")
    print("ReLU elements per sample:", census.total_relu, "max-pool comparisons:", census.totals_by_kind["maxpool"])
    result = relu_opt.export(model, example, out / "mynet.onnx")
    print(f"ONNX ReLUs {result.onnx_relu}, max abs error vs PyTorch {result.max_abs_err:.2g}")
