"""The SPU backend: SecretFlow SPU 0.9.5 (Cheetah, SEMI2K, ABY3) over its own link (libspu.link).

Protocols (`--protocol`):
- cheetah (default): dealer-free 2PC; linear layers by homomorphic encryption, comparisons by silent OT.
- semi2k: additive 2PC with Beaver triples. SPU 0.9.5 deals them here only from party 0 (its
  TrustedFirstParty; TrustedThirdParty needs an external service), so it runs only with `--dealer party0`
  and every figure carries the INSECURE label.
- aby3: replicated sharing among 3 computing parties (honest majority); no dealer; `--parties 3`.

Models run as our own torch.fx -> JAX lowering (lower.py), compiled by SPU; weights are secret-shared by
party 0 (Cheetah rejects a party's private input), the samples by party 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from relu_opt.backends import register_backend
from relu_opt.backends.base import Backend, Dealer, HostRole, Measurement, PartyRun
from relu_opt.backends.pricing import Pricing
from relu_opt.errors import ConfigError

NO_DEALER = Dealer("none", "no dealer: the protocol needs none")
PARTY0 = Dealer(
    "party0", "party 0 deals every triple (SPU's TrustedFirstParty): insecure, it reads the input", insecure=True
)
PARTIES = {"cheetah": 2, "semi2k": 2, "aby3": 3}


@register_backend
class SpuBackend(Backend):
    name = "spu"
    title = "SPU"
    protocols = ("cheetah", "semi2k", "aby3")
    default_protocol = "cheetah"
    dealers = {"none": NO_DEALER, "party0": PARTY0}
    default_dealer = "none"
    default_samples = 4  # a Cheetah forward of ResNet-20 takes about 13 s here: `relu-opt run` benches 4 x 3 models

    def dealer(self, name: str | None = None, protocol: str | None = None) -> Dealer:
        protocol = protocol or self.default_protocol
        if protocol == "semi2k":
            if name != "party0":
                raise ConfigError(
                    "--protocol semi2k: SPU 0.9.5 deals its Beaver triples only from party 0 (TrustedFirstParty), "
                    "which reads the input; pass --dealer party0 to run it labelled INSECURE, or use --protocol cheetah"
                )
            return PARTY0
        if name not in (None, "none"):
            raise ConfigError(f"--protocol {protocol} needs no dealer; leave --dealer out (or --dealer none)")
        return NO_DEALER

    def validate(self, pricing: Pricing) -> None:
        need = PARTIES[pricing.protocol_name]
        if pricing.parties != need:
            raise ConfigError(f"--protocol {pricing.protocol_name} runs {need} parties; pass --parties {need}")
        from relu_opt.backends.spu.compat import require_spu

        require_spu()

    def describe(self, pricing: Pricing) -> str:
        return f"SPU {pricing.protocol_name.upper()}"

    def prepare(
        self, model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), public_coeffs: bool = False
    ) -> fx.GraphModule:
        from relu_opt.passes.pi import prepare_for_pi

        return prepare_for_pi(model, example, leaf, public_coeffs)

    def check(self, prepared: fx.GraphModule, example: torch.Tensor) -> None:
        from relu_opt.backends.spu.lower import lower

        lower(prepared, example[:1]).trace()

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
        from relu_opt.backends.spu.measure import measure

        return measure(models, x, pricing.protocol_name, pricing.dealer_name, pricing.parties, timeout, batch)

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
        from relu_opt.backends.spu.measure import run_host

        if host.is_dealer:
            raise ConfigError("the SPU backend has no dealer process; start only the parties (--rank)")
        return run_host(models, x, host, pricing.protocol_name, pricing.dealer_name, self.versions(), timeout, batch)

    def load_cost_model(self, pricing: Pricing, note=None):
        from relu_opt.backends.spu.calibration import load_cached

        return load_cached(pricing.protocol_name, pricing.parties, pricing.dealer_name, pricing.cache, note)

    def calibrate(self, pricing: Pricing, timeout: float = 300, refresh: bool = False):
        from relu_opt.backends.spu.calibration import calibrate

        return calibrate(
            pricing.protocol_name, pricing.parties, pricing.dealer_name, max(timeout, 600), refresh, pricing.cache
        )

    def versions(self) -> dict[str, str]:
        import relu_opt
        from relu_opt.backends.spu.calibration import spu_version

        return {"relu-opt": relu_opt.__version__, "spu": spu_version(), "torch": torch.__version__}
