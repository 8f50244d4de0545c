"""Fine-tuning that cannot silently collapse: divergence is detected, rolled back and retried more gently.

Rewritten networks (many ReLUs replaced by polynomials) can diverge when fine-tuned: compositions of
polynomials grow without bound once an input leaves the range its polynomial was fitted on, and the loss
explodes or the network falls to chance. `guarded_fit` runs `train.fit` and treats four outcomes as a
failed attempt: a non-finite loss, losses lastingly `max_loss_growth` times their earlier median, a
validation accuracy that ends near chance, and an output that overflows on any validation image. After
a failure it goes back to the last good epoch (or the start) and tries again with the learning rate scaled
down and, where the caller gives one, a safer loss (`optimize`: with the range penalty of
relu_opt/range_penalty.py), up to `retries` times; if every attempt fails it raises FinetuneFailed, so a
collapsed model is never saved as a result.

The guard is the last line. `optimize` first makes collapse unlikely by construction (measured in
benchmarks/results/finetune_stability.md): BatchNorm statistics stay fixed, so one batch whose polynomial
inputs left their fitted range cannot leave a running variance of 1e11 behind (eval at chance while training
looks fine), and in training each polynomial's inputs are clamped to twice its fitted range, so a
composition of polynomials stays bounded; eval and export compute the bare polynomial.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from relu_opt import atomic, distributed
from relu_opt.checked_io import load_torch
from relu_opt.data import Dataset
from relu_opt.errors import CorruptFileError, ReluOptError
from relu_opt.training import LossFn, TrainConfig, TrainingDiverged, TrainResult, fit, predict

_CLEARLY_ABOVE_CHANCE = 10.0  # points; below this the baseline itself is near chance and "collapse" means nothing


class FinetuneFailed(ReluOptError):
    """Fine-tuning diverged on every attempt, or the result fell further below the baseline than allowed."""


@dataclass(frozen=True)
class Attempt:
    """One fine-tuning attempt: its peak learning rate, final validation accuracy (%) and why it failed."""

    lr: float
    val_accuracy: float | None
    failure: str | None
    from_epoch: int = 0  # the epoch it went on from (0: the start)
    retry_loss: bool = False  # trained with the loss of guarded_fit's `retry_loss_fn` (e.g. a range penalty)


@dataclass(frozen=True)
class GuardedResult:
    """The successful attempt's training history, every attempt made, and the final validation accuracy (%)."""

    train: TrainResult
    attempts: tuple[Attempt, ...]
    val_accuracy: float

    def to_dict(self) -> dict:
        return {**self.train.to_dict(), "attempts": [asdict(a) for a in self.attempts]}


def _clearly_above_chance(n_val: int) -> float:
    # a handful of validation images cannot tell a collapse from noise: 3 standard errors at worst (p = 1/2)
    return max(_CLEARLY_ABOVE_CHANCE, 3 * 50.0 / max(n_val, 1) ** 0.5)


def collapse_threshold(baseline_val: float, num_classes: int, fraction: float = 0.25) -> float:
    """Return the validation accuracy (%) below which a model counts as collapsed toward chance."""
    chance = 100.0 / num_classes
    return chance + fraction * max(baseline_val - chance, 0.0)


def check_drop(val_before: float, val_after: float, max_drop: float | None, what: str) -> None:
    """Raise FinetuneFailed when validation accuracy (%) fell more than `max_drop` points."""
    if max_drop is not None and val_before - val_after > max_drop:
        raise FinetuneFailed(
            f"{what}: validation accuracy {val_after:.2f}% is {val_before - val_after:.2f} points below the "
            f"baseline's {val_before:.2f}%, over the limit --max-drop {max_drop:g}; nothing was saved. Give a "
            "larger budget, more --epochs, or a larger --max-drop"
        )


def _attempt_checkpoint(checkpoint: Path | None, attempt: int) -> Path | None:
    if checkpoint is None or attempt == 0:
        return checkpoint
    return checkpoint.with_name(f"{checkpoint.stem}.retry{attempt}{checkpoint.suffix}")


def _snapshot(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.last-epoch{checkpoint.suffix}")


def _good_epoch(snapshot: Path | None, floor: float) -> dict | None:
    """Return the checkpoint in `snapshot` (removing the file) if its epoch's validation loss was finite
    and its accuracy above `floor` (%), else None."""
    if snapshot is None or not snapshot.is_file():
        return None
    try:
        state = load_torch(snapshot, "epoch checkpoint", keys=("history", "epoch", "optimizer"))
    except CorruptFileError:
        return None
    finally:
        snapshot.unlink(missing_ok=True)
    last = state["history"][-1] if state["history"] else None
    good = last is not None and math.isfinite(last["val_loss"]) and 100 * last["val_acc"] >= floor
    return state if good and not state.get("step") else None


def _scaled_checkpoint(state: dict, target: Path, factor: float) -> None:
    """Write checkpoint `state` to `target` with every learning rate of its optimizer and schedule times `factor`."""
    state = copy.deepcopy(state)  # a later retry may scale the same epoch again
    for group in state["optimizer"]["param_groups"]:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= factor
    sched = state.get("scheduler") or {}
    for key in ("base_lrs", "_last_lr"):
        if key in sched:
            sched[key] = [lr * factor for lr in sched[key]]
    state["recent_losses"] = []  # the loss-explosion reference starts again at the new rate
    atomic.save_torch(state, target)


def _judge(model: nn.Module, data: Dataset, device: str, floor: float, baseline_val: float) -> tuple[str | None, float]:
    """Return (why the fine-tuned `model` failed or None, its validation accuracy %)."""
    logits = predict(model, data.val.x, device=device)
    val = 100 * float((logits.argmax(1) == data.val.y).float().mean())
    # A polynomial composition fed far outside its fitted range overflows on a few images while
    # the accuracy still looks fine; the export's parity check would then refuse the model.
    overflow = int((~torch.isfinite(logits).all(1)).sum())
    if overflow:
        return f"the output overflows (NaN or infinite) on {overflow} of {len(logits)} validation images", val
    if val < floor and baseline_val - 100.0 / data.num_classes >= _clearly_above_chance(len(data.val)):
        return f"validation accuracy {val:.2f}% fell toward chance (below {floor:.2f}%)", val
    return None, val


def guarded_fit(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    baseline_val: float,
    checkpoint: str | os.PathLike | None = None,
    param_groups: list[dict] | None = None,
    finalize: Callable[[nn.Module], None] | None = None,
    retries: int = 2,
    lr_factor: float = 0.3,
    max_loss_growth: float = 50.0,
    collapse_fraction: float = 0.25,
    log: Callable[[str], None] = lambda _m: None,
    retry_loss_fn: Callable[[], LossFn] | None = None,
    **fit_kwargs,
) -> GuardedResult:
    """Fine-tune `model` in place with rollback and retries; returns the GuardedResult.

    Retries train with the loss `retry_loss_fn()` returns where given (a safer loss than the first attempt's
    `loss_fn`); it is called once, when the first retry starts, so what it sets up costs the first attempt
    nothing.

    `finalize(model)` runs after each attempt's training and before its evaluation (e.g. to end an
    annealing schedule). Checkpoints of failed attempts are removed, so a resumed run does not pick up a
    diverged state."""
    ckpt = Path(checkpoint) if checkpoint else None
    start = copy.deepcopy(model.state_dict())
    floor = collapse_threshold(baseline_val, data.num_classes, collapse_fraction)
    attempts: list[Attempt] = []
    user_epoch_start = fit_kwargs.pop("on_epoch_start", None)
    good: tuple[dict, int] | None = None  # (a good epoch's checkpoint, the attempt that wrote it)
    retry_loss: LossFn | None = None
    for attempt in range(retries + 1):
        scale = lr_factor**attempt
        cfg = copy.copy(config)
        cfg.lr = config.lr * scale
        cfg.max_loss_growth = max_loss_growth
        groups = (
            [{**g, "lr": g["lr"] * scale} if "lr" in g else dict(g) for g in param_groups] if param_groups else None
        )
        path = _attempt_checkpoint(ckpt, attempt)
        snap = _snapshot(path) if path is not None else None
        from_epoch = 0
        if good is not None and path is not None:
            _scaled_checkpoint(good[0], path, lr_factor ** (attempt - good[1]))
            from_epoch = int(good[0]["epoch"])

        def on_epoch_start(epoch: int, frac: float, path=path, snap=snap) -> None:
            # the checkpoint on disk now holds the epoch just finished; keep it in case a later one collapses
            if epoch > 0 and snap is not None and distributed.writes() and path.is_file():
                shutil.copyfile(path, snap)
            if user_epoch_start:
                user_epoch_start(epoch, frac)

        failure, val = None, None
        if attempt > 0 and retry_loss_fn is not None and retry_loss is None:
            retry_loss = retry_loss_fn()
        safer = attempt > 0 and retry_loss is not None
        try:
            result = fit(
                model,
                data,
                cfg,
                checkpoint=path,
                resume=True,
                param_groups=groups,
                on_epoch_start=on_epoch_start,
                **({**fit_kwargs, "loss_fn": retry_loss} if safer else fit_kwargs),
            )
        except TrainingDiverged as exc:
            failure = str(exc)
        else:
            if finalize:
                finalize(model)
            failure, val = distributed.on_main(lambda c=cfg: _judge(model, data, c.device, floor, baseline_val))
        attempts.append(Attempt(cfg.lr, val, failure, from_epoch, safer))
        if failure is None:
            if snap is not None and distributed.writes():
                snap.unlink(missing_ok=True)
            return GuardedResult(result, tuple(attempts), val)
        state = distributed.on_main(lambda snap=snap: _good_epoch(snap, floor))
        if state is not None:
            good = (state, attempt)
        where = f"epoch {good[0]['epoch']}" if good else "the start"
        log(f"fine-tuning attempt {attempt + 1} at lr {cfg.lr:.3g} failed ({failure}); rolling back to {where}")
        model.load_state_dict(start)
        if path is not None and distributed.writes():
            path.unlink(missing_ok=True)
    tried = ", ".join(f"lr {a.lr:.3g}: {a.failure}" for a in attempts)
    raise FinetuneFailed(
        f"fine-tuning diverged on all {len(attempts)} attempts ({tried}); nothing was saved. "
        "Give a larger budget, a lower --lr, or another --replace"
    )
