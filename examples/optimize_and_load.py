"""Train a small CNN, optimize it to a ReLU budget, and load the result back from its folder."""

import sys
from pathlib import Path

import torch

import relu_opt
from relu_opt.data import load_dataset
from relu_opt.optimizer import OptimizeConfig, optimize
from relu_opt.train import TrainConfig, evaluate, fit

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "optimized_digits")
    data = load_dataset("digits")  # sklearn's bundled 8x8 digits: runs in seconds
    model = relu_opt.create_model("small_cnn", in_channels=1)
    fit(model, data, TrainConfig(epochs=4, lr=0.05), progress=False)
    total = relu_opt.count(model, data.train.x[:1]).total_relu
    result = optimize(
        model,
        data,
        OptimizeConfig(budget=total // 8, strategy="taylor", epochs=2),
        out,
        base_spec="small_cnn",
        progress=False,
    )
    print(f"ReLUs {result.relu_before:,} -> {result.relu_after:,} (ONNX-verified)")
    print(f"test accuracy {result.accuracy_before:.1f}% -> {result.accuracy_after:.1f}%")
    loaded = relu_opt.load(out)
    _, acc = evaluate(loaded, data.test)
    assert abs(100 * acc - result.accuracy_after) < 1e-6, "load() must reproduce the saved model"
    with torch.no_grad():
        print("loaded model logits for one test image:", loaded(data.test.x[:1]).squeeze().numpy().round(2))
