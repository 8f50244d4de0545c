"""Run a model and its linear floor with two real parties and a dealer that is neither, and compare their
online and offline costs."""

import torch

import relu_opt

if __name__ == "__main__":
    model = relu_opt.create_model("small_cnn", in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = relu_opt.bench(model, x, runs=2, warmup=1)  # CrypTen, 2 parties, third-party dealer by default
    for m in result.models:
        print(
            f"{m.name:9s} ReLUs {m.relu_elements:>6,d}  rounds {m.rounds:3d}  "
            f"MB/party {max(m.bytes_per_party) / 1e6:6.2f}  offline MB {m.offline_bytes / 1e6:6.2f}  "
            f"wall {m.wall_s_median:.3f}s  WAN {m.wan_s:.3f}s (+offline {m.wan_total_s:.3f}s)  "
            f"top-1 agreement {m.top1_agreement:.2f}"
        )
    print("floor/original rounds:", round(result.ratios["floor"]["rounds"], 3))
