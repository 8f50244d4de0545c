"""Fine-tuning the rewritten model: distillation from the original, annealed masks, guarded retries."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

from torch import nn

from relu_opt.activations import MaskedSite
from relu_opt.data import Dataset
from relu_opt.finetune import check_drop, guarded_fit
from relu_opt.optimizer.config import OptimizeConfig
from relu_opt.optimizer.planner import Planned
from relu_opt.optimizer.structure import keeps_bn_frozen
from relu_opt.range_penalty import penalized, range_penalty
from relu_opt.training import LossFn, TrainConfig, evaluate, kd_loss, refresh_bn_stats

# Fine-tuning retries add the range penalty (relu_opt/range_penalty.py) at this weight. Measured on the
# Fashion-MNIST ResNet-20, snl at 20x fewer ReLUs, seed 0, 2 epochs: without it every attempt's output
# overflowed on 1 of 5,000 validation images (so did a mean-over-elements penalty at weight 1); with the
# worst-element penalty at weight 1 from the first attempt, 94.39% test (-0.07), first attempt.
RETRY_RANGE_WEIGHT = 1.0


def anneal_schedule(model: nn.Module, anneal: float):
    """Return on_step(fraction done): dropped elements fade from their original into their replacement
    over the first `anneal` of fine-tuning."""
    masked = [m for m in model.modules() if isinstance(m, MaskedSite)]

    def on_step(frac: float) -> None:
        blend = max(0.0, 1.0 - frac / anneal) if anneal > 0 else 0.0
        for m in masked:
            m.blend = blend

    return on_step


def finish(model: nn.Module, config: OptimizeConfig, data: Dataset) -> None:
    """End the annealing schedule, then recompute BatchNorm statistics on the final weights if asked."""
    anneal_schedule(model, config.anneal)(1.0)
    if config.refresh_bn_stats:
        refresh_bn_stats(model, data.train, device=config.device)


def max_train(cfg: OptimizeConfig, n: int) -> int | None:
    """Return the training prefix: fractional epochs train on a prefix of the (shuffled-once) train split."""
    if cfg.epochs >= 1 or cfg.epochs <= 0:
        return cfg.max_train
    return max(cfg.batch_size, int(min(n, cfg.max_train or n) * cfg.epochs))


def tune(p: Planned, data: Dataset, config: OptimizeConfig, checkpoint: Path, progress: bool) -> dict:
    """Fine-tune p.student with distillation from p.teacher; return accuracies (fractions) and the
    fine-tuning record. Raises FinetuneFailed when validation falls more than config.max_drop."""
    _, val_before = evaluate(p.teacher, data.val, device=config.device)
    _, test_before = evaluate(p.teacher, data.test, device=config.device)
    train_cfg = TrainConfig(
        epochs=max(1, math.ceil(config.epochs)),
        lr=config.lr,
        batch_size=config.batch_size,
        max_train=max_train(config, len(data.train)),
        device=config.device,
        seed=config.seed,
        freeze_bn=keeps_bn_frozen(config, p.student, pruned=p.original is not None),
    )
    poly_params = [q for n, q in p.student.named_parameters() if n.endswith("coeffs")]
    other = [q for n, q in p.student.named_parameters() if not n.endswith("coeffs")]
    groups = [{"params": other}] + (
        [{"params": poly_params, "lr": config.lr * 0.1, "weight_decay": 0.0}] if poly_params else []
    )
    kd = kd_loss(p.teacher, config.temperature, config.kd_alpha)
    if config.epochs == 0:  # no fine-tuning step at all: the sites take their replacements at once
        finish(p.student, config, data)
        ft = None
    else:
        with ExitStack() as hooks:
            excess = []  # the range penalty's hooks, set up once and only when a loss uses them

            def with_penalty(weight: float) -> LossFn:
                if not excess:
                    excess.append(hooks.enter_context(range_penalty(p.student, config.train_range)))
                return penalized(kd, excess[0], weight)

            first = with_penalty(config.range_weight) if config.train_range and config.range_weight else kd
            retry_weight = max(config.range_weight, RETRY_RANGE_WEIGHT)
            ft = guarded_fit(
                p.student,
                data,
                train_cfg,
                baseline_val=100 * val_before,
                checkpoint=checkpoint,
                param_groups=groups,
                finalize=lambda m: finish(m, config, data),
                loss_fn=first,
                retry_loss_fn=(lambda: with_penalty(retry_weight)) if config.train_range else None,
                on_step=anneal_schedule(p.student, config.anneal),
                progress=progress,
                description=f"fine-tune {config.label}",
                resume_hint="rerun the same command to continue from there",
            )
    p.student.eval()
    val_after = (ft.val_accuracy if ft else 100 * evaluate(p.student, data.val, device=config.device)[1]) / 100
    check_drop(100 * val_before, 100 * val_after, config.max_drop, config.label)
    _, test_after = evaluate(p.student, data.test, device=config.device)
    return {
        "val_before": val_before,
        "test_before": test_before,
        "val_after": val_after,
        "test_after": test_after,
        "finetune": {**(ft.to_dict() if ft else {"epochs": 0, "steps": 0}), "start": p.start},
    }
