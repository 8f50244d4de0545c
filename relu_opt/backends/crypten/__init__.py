"""The CrypTen backend: Beaver-triple MPC (crypten 0.4.1) over torch.distributed Gloo.

Dealers:
- third-party (default): CrypTen's TTP provider. A dealer process of its own (rank = world size, on a
  host of its own in a separate-hosts run) seeds each party's share of every triple and sends party 0
  its share of each product, on demand, inside the forward. Its traffic is the offline cost.
- party0 (insecure, for comparison): CrypTen's default TFP provider. Party 0 draws every triple in the
  clear, so it reads every value the parties open, the client's input included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from relu_opt.backends import register_backend
from relu_opt.backends.base import Backend, Dealer, HostRole, Measurement, PartyRun, package_version
from relu_opt.backends.pricing import Pricing


@register_backend
class CrypTenBackend(Backend):
    name = "crypten"
    title = "CrypTen"
    dealers = {
        "third-party": Dealer(
            "third-party",
            "a dealer process that is neither party (CrypTen's TTP)",
            extra_process=True,
        ),
        "party0": Dealer(
            "party0",
            "party 0 deals every triple (CrypTen's default TFP): insecure, it reads the input",
            insecure=True,
        ),
    }
    default_dealer = "third-party"

    def prepare(
        self, model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), public_coeffs: bool = False
    ) -> fx.GraphModule:
        from relu_opt.backends.crypten.convert import prepare

        return prepare(model, example, leaf, public_coeffs)

    def check(self, prepared: fx.GraphModule, example: torch.Tensor) -> None:
        from relu_opt.backends.crypten.convert import crypten_onnx

        crypten_onnx(prepared, example[:1])

    def warnings(self, prepared: fx.GraphModule, x: torch.Tensor) -> list[str]:
        from relu_opt.backends.crypten.measure import fixed_point_warnings

        return fixed_point_warnings(prepared, x)

    def measure(
        self,
        models: Sequence[tuple[str, fx.GraphModule]],
        x: torch.Tensor,
        pricing: Pricing,
        runs: int = 3,
        warmup: int = 1,
        timeout: float = 300,
        batch: int | None = None,
    ) -> list[Measurement]:
        from relu_opt.backends.crypten.measure import measure

        return measure(models, x, pricing.parties, pricing.dealer_name, runs, warmup, timeout, batch=batch)

    def run_host(
        self,
        models: Sequence[tuple[str, fx.GraphModule]],
        x: torch.Tensor,
        pricing: Pricing,
        host: HostRole,
        runs: int = 3,
        warmup: int = 1,
        timeout: float = 300,
        batch: int | None = None,
    ) -> PartyRun:
        from relu_opt.backends.crypten.measure import run_host

        dealer = pricing.dealer_info()
        if host.is_dealer and not dealer.extra_process:
            from relu_opt.errors import ConfigError

            raise ConfigError(f"--dealer {dealer.name} has no dealer process; start only the parties (--rank)")
        return run_host(
            models, x, host, dealer.name, dealer.extra_process, self.versions(), runs, warmup, timeout, batch
        )

    def load_cost_model(self, pricing: Pricing, note=None):
        from relu_opt.backends.crypten.calibration import load_cached

        return load_cached(pricing.parties, pricing.dealer_name, pricing.cache, note)

    def calibrate(self, pricing: Pricing, timeout: float = 300, refresh: bool = False):
        from relu_opt.backends.crypten.calibration import calibrate

        return calibrate(pricing.parties, pricing.dealer_name, timeout, refresh, pricing.cache)

    def versions(self) -> dict[str, str]:
        import relu_opt

        return {"relu-opt": relu_opt.__version__, "crypten": package_version("crypten"), "torch": torch.__version__}
