"""Train a small CNN, rank its ReLUs, optimize it to a ReLU budget, and load the result back from its folder:
the Python API end to end (docs/api.md)."""

import sys
from pathlib import Path

import torch

import relu_opt

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "optimized_digits")
    m = relu_opt.load_model("small_cnn", data="digits")  # sklearn's bundled 8x8 digits: runs in seconds
    trained = relu_opt.train(m.model, m.data, out / "weights.pt", epochs=4)
    print(f"trained: test accuracy {trained.test_accuracy:.1f}%")
    total = relu_opt.count(m.model, torch.zeros(m.input_shape)).total_relu
    crit = relu_opt.rank(m.model, m.data, work=out / "rankings", rank_samples=256)
    print("most critical site:", max(crit.scores, key=crit.site_score))
    result = relu_opt.optimize(
        m.model, m.data, budget=total // 8, outdir=out / "opt", epochs=2, selector="count", base_spec="small_cnn"
    )
    print(f"ReLUs {result.elements_before:,} -> {result.elements_after:,} (ONNX-verified)")
    print(f"test accuracy {result.accuracy_before:.1f}% -> {result.accuracy_after:.1f}%")
    loaded = relu_opt.load(out / "opt")
    with torch.no_grad():
        agree = (loaded(m.data.test.x).argmax(1) == m.data.test.y).float().mean().item()
    assert abs(100 * agree - result.accuracy_after) < 1e-6, "load() must reproduce the saved model"
    print("loaded model logits for one test image:", loaded(m.data.test.x[:1]).detach().squeeze().numpy().round(2))
