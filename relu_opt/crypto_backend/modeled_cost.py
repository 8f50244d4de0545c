"""What the cost model predicts a model costs under private inference, with no party started: rounds,
bytes per party and the communication part of LAN/WAN latency, for reports and frontiers.

Latency here is communication only: rounds x RTT + the bytes each party sends one way / the bandwidth per
direction (the full-duplex model of `Network.latency` with zero compute). With two parties each exchange
moves the same bytes each way, and CrypTen's byte count adds both directions, so one direction carries
half of it. Compute is left out because the cost model does not predict it; a bench measures it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx

from relu_opt.crypto_backend.cost_model import LAN, WAN, CostModel, Network, features


@dataclass(frozen=True)
class ModeledCost:
    """One forward as the cost model predicts it; `lan_s`/`wan_s` are communication seconds."""

    rounds: float
    bytes_per_party: float  # CrypTen's count: both directions added
    lan_s: float
    wan_s: float
    batch: int = 1

    @property
    def mb_per_party(self) -> float:
        return self.bytes_per_party / 1e6

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


def modeled_cost(
    prepared: fx.GraphModule, cost: CostModel, batch: int = 1, networks: tuple[Network, Network] = (LAN, WAN)
) -> ModeledCost:
    """Return the ModeledCost of a shape-propagated, CrypTen-prepared GraphModule at `batch`."""
    f = features(prepared, batch=batch)
    rounds, total = cost.rounds(f), cost.bytes(f)
    lan, wan = (n.communication_s(rounds, total) for n in networks)
    return ModeledCost(round(rounds, 2), round(total), lan, wan, batch)


def folder_costs(outdir: str | os.PathLike, cost: CostModel, batch: int = 1) -> dict[str, ModeledCost]:
    """Return the ModeledCost of an `relu-opt optimize` folder's model ("optimized"), of its base model
    ("original") and of the linear floor, prepared as a bench prepares them (ReluOptError when the base
    model's spec cannot be rebuilt)."""
    from relu_opt.crypto_backend.convert import linear_floor, prepare_for_crypten
    from relu_opt.loading import resolve_model
    from relu_opt.plan import load, read_plan

    plan = read_plan(outdir)
    example = torch.zeros(plan.input_shape)
    optimized = prepare_for_crypten(load(outdir), example, public_coeffs=plan.public_coeffs)
    base = resolve_model(plan.base_model, plan.num_classes, plan.input_shape[1]).model.eval()
    original = prepare_for_crypten(base, example, plan.leaf, public_coeffs=plan.public_coeffs)
    return {
        "original": modeled_cost(original, cost, batch),
        "optimized": modeled_cost(optimized, cost, batch),
        "floor": modeled_cost(linear_floor(original, example), cost, batch),
    }


def write_folder_costs(outdir: str | os.PathLike, cost: CostModel | None) -> dict[str, ModeledCost] | None:
    """Write OUTDIR/modeled_cost.json (original, optimized, floor) and return the costs; None without a
    cost model."""
    from relu_opt import atomic

    if cost is None:
        return None
    costs = folder_costs(outdir, cost)
    atomic.write_json(Path(outdir) / "modeled_cost.json", {k: v.to_dict() for k, v in costs.items()})
    return costs


def read_folder_costs(outdir: str | os.PathLike) -> dict[str, dict] | None:
    """Return the modeled costs an optimize folder holds (modeled_cost.json), or None."""
    import json

    path = Path(outdir) / "modeled_cost.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
