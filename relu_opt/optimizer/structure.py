"""Which structure to remove beside the non-linear choices: the pruning mode, structure scores and trials.

One objective (relu_opt/optimizer/planner.py): with a latency goal, nothing is pruned wherever the
non-linear choices alone meet it, so the result is exactly the ReLU-only one there. Where they cannot, each
channel fraction is paired with the fewest residual branches (least important first by first-order
Taylor) with which the selector meets the goal, and those candidates are compared by a short distillation.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from relu_opt import atomic
from relu_opt.checked_io import load_cache, read_json
from relu_opt.data import Dataset
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.ranking_cache import content_key
from relu_opt.pruning import Pruning, StructureScores, structure_scores
from relu_opt.training import note

LINEAR_SHARE = 0.25  # --prune's default is channels when linear layers carry more of the modeled latency
# Candidates are compared after this much distillation: first-order Taylor misjudges large removals
# (measured on the shipped ResNet-20, 3 epochs: 7 branches dropped, Taylor's cheapest for its cost, 88.9%
# test; 6 branches and 0.75 of the channels 92.0%; 3 branches and half the channels 93.2%).
TRIAL_EPOCHS = 0.5


def _seconds(prepared: fx.GraphModule, config: OptimizeConfig) -> float:
    """Return the modeled online seconds of a prepared graph on config.pricing's network."""
    c = config.pricing.cost_model(note=note).cost(prepared)
    return config.pricing.net().communication_s(c.round_trips, c.bytes)


def linear_share(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> float:
    """Return the fraction of the model's modeled latency (config.pricing's network) its linear floor keeps."""
    engine = config.pricing.engine()
    prepared = engine.prepare(gm, example[:1])
    return _seconds(engine.floor(prepared, example[:1]), config) / max(_seconds(prepared, config), 1e-12)


def keeps_bn_frozen(config: OptimizeConfig, student: nn.Module, pruned: bool) -> bool:
    """Return whether fine-tuning keeps BatchNorm statistics fixed: as configured, except where structure was
    removed and every site kept (no polynomial can upset them, and they must follow the smaller model)."""
    from relu_opt.activations import MaskedSite

    return config.freeze_bn and (not pruned or any(isinstance(m, MaskedSite) for m in student.modules()))


def prune_mode(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> tuple[str, str]:
    """Return (mode, why): config.prune when given, else channels when the linear layers carry more than
    LINEAR_SHARE of the modeled latency."""
    if config.prune is not None:
        return config.prune, f"--prune {config.prune}"
    share = linear_share(gm, example, config)
    mode = "channels" if share > LINEAR_SHARE else "none"
    where = f"{config.pricing.describe()}, {config.pricing.network}"
    return mode, f"linear layers carry {share:.0%} of the modeled latency ({where}); default above {LINEAR_SHARE:.0%}"


def cached_scores(gm: fx.GraphModule, data: Dataset, config: OptimizeConfig, work: Path) -> StructureScores:
    """Return the structure scores of `gm`, from WORK when computed before on the same weights and data."""
    path = Path(work) / f"structure_{content_key(gm, data)}_{config.rank_samples}.pt"
    saved = load_cache(path, lambda p: torch.load(p, weights_only=True), note=note)
    if isinstance(saved, dict) and {"channels", "branches"} <= set(saved):
        return StructureScores(saved["channels"], saved["branches"])
    scores = structure_scores(gm, data, config.rank_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_torch({"channels": scores.channels, "branches": scores.branches}, path)
    return scores


def trial_accuracy(
    teacher: fx.GraphModule, student: fx.GraphModule, cand: Pruning, data: Dataset, config: OptimizeConfig, work: Path
) -> float:
    """Return the validation accuracy (%) of `student` after TRIAL_EPOCHS of distillation from `teacher`
    (remembered in WORK/structure_trials.json, so a rerun does not train it again)."""
    from relu_opt.activations import MaskedSite
    from relu_opt.training import TrainConfig, evaluate, fit, kd_loss

    ledger = Path(work) / "structure_trials.json"
    key = f"{config.key()}_{content_key(teacher, data)}_{hash_of(cand)}"
    done = load_cache(ledger, lambda p: read_json(p, what="structure trials"), note=note) or {}
    if key in done:
        return float(done[key])
    model = copy.deepcopy(student)
    for m in model.modules():
        if isinstance(m, MaskedSite):
            m.blend = 0.0  # the replacements as they will run
    cfg = TrainConfig(
        epochs=1,
        lr=config.lr,
        batch_size=config.batch_size,
        max_train=max(config.batch_size, int(TRIAL_EPOCHS * len(data.train))),
        device=config.device,
        seed=config.seed,
        freeze_bn=keeps_bn_frozen(config, model, pruned=True),
    )
    fit(model, data, cfg, loss_fn=kd_loss(teacher, config.temperature, config.kd_alpha), progress=False)
    acc = 100 * evaluate(model.eval(), data.val, device=config.device)[1]
    note(f"structure trial: {cand.describe()}: {acc:.2f}% validation after {TRIAL_EPOCHS:g} epoch of distillation")
    done[key] = acc
    ledger.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(ledger, done)
    return acc


def hash_of(cand: Pruning) -> str:
    """Return a short digest of what a candidate removes."""
    blob = json.dumps(cand.to_dict(), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def lower_bound_s(gm: fx.GraphModule, example: torch.Tensor, config: OptimizeConfig) -> float:
    """Return the modeled seconds of `gm` with no non-linearity at all: no selection can be faster."""
    engine = config.pricing.engine()
    return _seconds(engine.floor(engine.prepare(gm, example[:1]), example[:1]), config)


__all__ = [
    "LINEAR_SHARE",
    "TRIAL_EPOCHS",
    "keeps_bn_frozen",
    "linear_share",
    "lower_bound_s",
    "prune_mode",
    "trial_accuracy",
]
