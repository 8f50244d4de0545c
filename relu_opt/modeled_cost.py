"""What a backend's cost model predicts a model costs under private inference, with no party started:
online rounds and bytes per party, the offline part (the dealer's bytes and the requests made to it), and
the communication part of LAN/WAN latency, online and with the offline part, for reports and frontiers.

Latency here is communication only: round trips x RTT + the bytes each party sends one way / the
bandwidth per direction (the full-duplex model of `Network.latency` with zero compute); the offline part
adds the round trips waited for the dealer and its bytes on the same link. Compute is left out because
the cost model does not predict it; a bench measures it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx

from relu_opt.backends import LAN, WAN, CostModel, Network, Pricing


@dataclass(frozen=True)
class ModeledCost:
    """One forward as the cost model predicts it; `lan_s`/`wan_s` are communication seconds, online, and
    `lan_total_s`/`wan_total_s` with the offline part on the same link."""

    rounds: float
    bytes_per_party: float  # the backend's count: both directions added
    lan_s: float
    wan_s: float
    batch: int = 1
    offline_bytes: float = 0.0
    offline_requests: float = 0.0
    lan_total_s: float = 0.0
    wan_total_s: float = 0.0
    round_trips: float = 0.0
    offline_round_trips: float = 0.0

    @property
    def mb_per_party(self) -> float:
        return self.bytes_per_party / 1e6

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


def modeled_cost(
    prepared: fx.GraphModule, cost: CostModel, batch: int = 1, networks: tuple[Network, Network] = (LAN, WAN)
) -> ModeledCost:
    """Return the ModeledCost of a shape-propagated graph prepared by the cost model's backend, at `batch`."""
    c = cost.cost(prepared, batch)
    online = [n.communication_s(c.round_trips, c.bytes) for n in networks]
    total = [n.with_offline_s(s, c.offline_bytes, c.offline_round_trips) for n, s in zip(networks, online)]
    return ModeledCost(
        round(c.rounds, 2),
        round(c.bytes),
        *online,
        batch,
        round(c.offline_bytes),
        round(c.requests, 2),
        *total,
        round(c.round_trips, 2),
        round(c.offline_round_trips, 2),
    )


def folder_costs(
    outdir: str | os.PathLike, cost: CostModel, pricing: Pricing, batch: int = 1
) -> dict[str, ModeledCost]:
    """Return the ModeledCost of an `relu-opt optimize` folder's model ("optimized"), of its base model
    ("original") and of the linear floor, prepared as `pricing`'s backend prepares them (ReluOptError
    when the base model's spec cannot be rebuilt)."""
    from relu_opt.loading import resolve_model
    from relu_opt.plan import load, read_plan

    engine = pricing.engine()
    plan = read_plan(outdir)
    example = torch.zeros(plan.input_shape)
    optimized = engine.prepare(load(outdir), example, public_coeffs=plan.public_coeffs)
    base = resolve_model(plan.base_model, plan.num_classes, plan.input_shape[1]).model.eval()
    original = engine.prepare(base, example, plan.leaf, public_coeffs=plan.public_coeffs)
    return {
        "original": modeled_cost(original, cost, batch),
        "optimized": modeled_cost(optimized, cost, batch),
        "floor": modeled_cost(engine.floor(original, example), cost, batch),
    }


def write_folder_costs(outdir: str | os.PathLike, cost: CostModel | None, pricing: Pricing) -> dict | None:
    """Write OUTDIR/modeled_cost.json (original, optimized, floor, and what priced them) and return its
    dict; None without a cost model."""
    from relu_opt import atomic

    if cost is None:
        return None
    costs = {k: v.to_dict() for k, v in folder_costs(outdir, cost, pricing).items()}
    atomic.write_json(Path(outdir) / "modeled_cost.json", {**costs, "priced_by": pricing.describe()})
    return costs | {"priced_by": pricing.describe()}


def read_folder_costs(outdir: str | os.PathLike) -> dict[str, dict] | None:
    """Return the modeled costs an optimize folder holds (modeled_cost.json), or None."""
    path = Path(outdir) / "modeled_cost.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
