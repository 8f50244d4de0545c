"""Training and fine-tuning: SGD + cosine schedule, channels_last, atomic per-epoch checkpoints,
resume, clean Ctrl-C, and a stop with the last good checkpoint kept when the loss goes non-finite."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from relu_opt import atomic, distributed
from relu_opt.checked_io import load_cache, load_torch
from relu_opt.data import Dataset, Split, batches
from relu_opt.errors import ConfigError, ReluOptError

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, x, y) -> loss


class TrainingDiverged(ReluOptError):
    """The loss became NaN or infinite, or grew past `max_loss_growth` times its start."""


class TrainingInterrupted(ReluOptError):
    """Ctrl-C during training; the state was saved."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What a training run did: per-epoch stats and where the checkpoint is."""

    history: tuple[EpochStats, ...]
    checkpoint: str | None = None
    resumed_from: int = 0

    @property
    def val_acc(self) -> float:
        return self.history[-1].val_acc if self.history else float("nan")

    def to_dict(self) -> dict:
        return {
            "history": [asdict(e) for e in self.history],
            "checkpoint": self.checkpoint,
            "resumed_from": self.resumed_from,
        }


@dataclass
class TrainConfig:
    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    clip_grad: float | None = 5.0
    max_train: int | None = None  # train on the first N examples of the train split (subset runs)
    freeze_bn: bool = False  # keep BatchNorm running statistics fixed (fine-tuning polynomial nets)
    device: str = "cpu"
    seed: int = 0
    max_loss_growth: float | None = None  # losses lastingly this many times their earlier median: diverged
    extra: dict = field(default_factory=dict)


def note(message: str) -> None:
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


def _prepare_input(x: Tensor, device: str) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500, device: str = "cpu") -> Tensor:
    """Return the model's logits on `x` (eval mode, batched), on the CPU."""
    was = model.training
    model.eval()
    try:
        return torch.cat(
            [model(_prepare_input(x[i : i + batch_size], device)).float().cpu() for i in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was)


def evaluate(model: nn.Module, split: Split, batch_size: int = 500, device: str = "cpu") -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy in [0, 1]) of `model` on a split."""
    logits = predict(model, split.x, batch_size, device)
    return float(F.cross_entropy(logits, split.y)), float((logits.argmax(1) == split.y).float().mean())


@torch.no_grad()
def refresh_bn_stats(
    model: nn.Module, split: Split, num_batches: int = 20, batch_size: int = 256, device: str = "cpu"
) -> int:
    """Recompute every BatchNorm's running statistics from scratch on the first `num_batches` batches of
    `split` (training-mode forward passes, no weight changes); returns the number of layers reset.

    Running statistics are a moving average over training steps, so after fine-tuning they can describe a
    network that no longer exists (one exploding batch leaves a running variance of 1e11 for hundreds of
    steps); the recomputed ones describe the final weights. BatchNorm folds into the conv at export."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    try:
        for i in range(0, min(len(split), num_batches * batch_size), batch_size):
            model(_prepare_input(split.x[i : i + batch_size], device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was)
    return len(norms)


def kd_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> LossFn:
    """Return a distillation loss: alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE."""
    teacher.eval()

    def loss(logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            t = teacher(x)
        kl = F.kl_div(
            F.log_softmax(logits / temperature, 1),
            F.log_softmax(t / temperature, 1),
            reduction="batchmean",
            log_target=True,
        )
        return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(logits, y)

    return loss


_LOSS_RECENT = 10  # steps whose median is judged: an explosion lasts, a single spike does not count
_LOSS_WINDOW = 50 + _LOSS_RECENT  # the steps before the judged ones are the reference
_LOSS_WARMUP = 20  # reference steps needed first: early losses move fast for good reasons (annealing)


def _exploded(recent: deque[float], growth: float | None) -> bool:
    """Return whether the median of the last steps' losses is `growth` times the median before them."""
    if growth is None or len(recent) < _LOSS_WARMUP + _LOSS_RECENT:
        return False
    losses = list(recent)
    now, before = statistics.median(losses[-_LOSS_RECENT:]), statistics.median(losses[:-_LOSS_RECENT])
    return now > growth * max(before, 1.0)


def _data_parallel(model: nn.Module, device: str) -> nn.Module:
    """Return `model` wrapped in DistributedDataParallel when several ranks train it, else `model`."""
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
    # masks and replacements leave some parameters without a gradient in some steps
    with distributed.collective():
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _ce(logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of `model` in eval mode, so training leaves its running statistics as they are."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fit(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    loss_fn: LossFn = _ce,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    param_groups: list[dict] | None = None,
    on_epoch_start: Callable[[int, float], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    progress: bool = True,
    description: str = "train",
    resume_hint: str = "rerun with --resume",
) -> TrainResult:
    """Train `model` in place for `config.epochs` and return the TrainResult.

    `on_epoch_start(epoch, fraction_done)` and `on_step(fraction_done)` let callers anneal masks.
    Raises TrainingDiverged on a non-finite loss (the checkpoint on disk is the last good epoch) and
    TrainingInterrupted on Ctrl-C (after saving the current state for --resume).

    A resumed run continues at the step where the checkpoint stopped, with the same batches, learning
    rates and random state, so it ends with the weights an uninterrupted run would have. A damaged
    checkpoint is removed and training starts again; one written with other settings is a ConfigError."""
    device = config.device
    model.to(device).to(memory_format=torch.channels_last)
    net = _data_parallel(model, device)
    progress = progress and distributed.is_main()
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    train = data.train.subset(config.max_train)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g.get("lr", config.lr) for g in opt.param_groups],
            total_steps=config.epochs * steps_per_epoch,
            pct_start=0.15,
            anneal_strategy="cos",
            div_factor=10,
            final_div_factor=100,
        )
        if config.epochs
        else None
    )
    history: list[EpochStats] = []
    start_epoch, start_step, partial = 0, 0, (0.0, 0, 0)
    ckpt = Path(checkpoint) if checkpoint else None
    schedule = {"epochs": config.epochs, "steps_per_epoch": steps_per_epoch, "batch_size": config.batch_size}
    keys = ("model", "optimizer", "scheduler", "epoch", "history")
    state = (
        load_cache(ckpt, lambda p: load_torch(p, "training checkpoint", keys=keys), note=note)
        if ckpt and resume
        else None
    )
    if state is not None:
        if state.get("schedule", schedule) != schedule:
            raise ConfigError(
                f"checkpoint '{ckpt}' was written by a run with {state['schedule']}, not {schedule}; rerun with "
                "the same --epochs, --batch-size and --max-train, or delete the checkpoint to start again"
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"checkpoint '{ckpt}' does not fit this model ({first}); delete it to start again"
            ) from None
        history = [EpochStats(**e) for e in state["history"]]
        start_epoch, start_step = int(state["epoch"]), int(state.get("step", 0))
        partial = tuple(state.get("partial", partial))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
    resumed_from = start_epoch

    def save(epoch: int, step: int = 0, stats: tuple = (0.0, 0, 0)) -> None:
        if ckpt and distributed.writes():
            atomic.save_torch(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched else {},
                    "epoch": epoch,
                    "step": step,  # steps done in `epoch` (an interrupted epoch continues from here)
                    "partial": list(stats),
                    "schedule": schedule,
                    "rng": torch.get_rng_state(),
                    "recent_losses": list(recent),
                    "history": [asdict(e) for e in history],
                },
                ckpt,
            )

    gen = torch.Generator().manual_seed(config.seed)
    recent: deque[float] = deque(state.get("recent_losses", []) if state else [], maxlen=_LOSS_WINDOW)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # Ctrl-C anywhere (steps, evaluation, saving, between epochs) saves where it stopped. `open_epoch` is
    # the epoch whose progress is not yet on disk; None between epochs, where the last save is complete.
    open_epoch: int | None = None
    epoch, done, total_loss, correct, seen = start_epoch, 0, 0.0, 0, 0
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            for epoch in range(start_epoch, config.epochs):
                gen.manual_seed(config.seed + epoch)
                skip = start_step if epoch == start_epoch else 0
                total_loss, correct, seen = (
                    (float(partial[0]), int(partial[1]), int(partial[2])) if skip else (0.0, 0, 0)
                )
                done, open_epoch = skip, epoch
                task = bar.add_task(f"{description} {epoch + 1}/{config.epochs}", total=steps_per_epoch, info="")
                t0 = time.perf_counter()
                if skip:
                    bar.update(task, advance=skip)
                if on_epoch_start:
                    on_epoch_start(epoch, epoch / config.epochs)
                model.train()
                if config.freeze_bn:
                    freeze_batchnorm(model)
                for step, (x, y) in enumerate(
                    batches(train, config.batch_size, shuffle=True, generator=gen, augment=data.augment)
                ):
                    if step < skip:  # drawn (so the random stream is the same) but already trained on
                        continue
                    if on_step:
                        on_step((epoch + step / steps_per_epoch) / config.epochs)
                    x, y, weight = distributed.shard(x, y)
                    x, y = _prepare_input(x, device), y.to(device)
                    logits = net(x)
                    loss = loss_fn(logits, x, y)
                    # the whole batch's loss and hits, so every rank judges (and logs) the same numbers
                    batch_loss, hits, n = distributed.all_sum(
                        [loss.item() * len(y), int((logits.argmax(1) == y).sum()), len(y)]
                    )
                    recent.append(batch_loss / n)
                    exploded = _exploded(recent, config.max_loss_growth)
                    if not math.isfinite(batch_loss) or exploded:
                        where = f"'{ckpt}' (epoch {len(history)})" if ckpt and ckpt.is_file() else "none"
                        raise TrainingDiverged(
                            f"loss became {batch_loss / n:.4g}{' (exploding)' if exploded else ''} at epoch "
                            f"{epoch + 1}, step {step + 1}; stopped. Last good checkpoint: {where}. Try a lower --lr"
                        )
                    opt.zero_grad(set_to_none=True)
                    (loss * weight).backward()
                    if config.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                    opt.step()
                    sched.step()
                    done = sched.last_epoch - epoch * steps_per_epoch
                    total_loss += batch_loss
                    correct += int(hits)
                    seen += int(n)
                    bar.update(task, advance=1, info=f"loss {total_loss / seen:.3f} acc {correct / seen:.1%}")
                val_loss, val_acc = evaluate(model, data.val, device=device)
                history.append(
                    EpochStats(
                        epoch + 1,
                        total_loss / max(seen, 1),
                        correct / max(seen, 1),
                        val_loss,
                        val_acc,
                        opt.param_groups[0]["lr"],
                        time.perf_counter() - t0,
                    )
                )
                bar.update(task, info=f"loss {total_loss / max(seen, 1):.3f} val acc {val_acc:.2%}")
                save(epoch + 1)
                open_epoch = None
    except (KeyboardInterrupt, SystemExit, RuntimeError, distributed.RankLost) as exc:
        # Ctrl-C, a stop signal (torchrun's, too, when a rank failed: the launcher names it), or a rank lost
        lost = distributed.rank_lost(exc) if isinstance(exc, RuntimeError | distributed.RankLost) else None
        if lost is None and not isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        if open_epoch is not None:
            if sched is not None:  # the steps the schedule took are the steps done, wherever Ctrl-C hit
                done = sched.last_epoch - open_epoch * steps_per_epoch
            del history[open_epoch:]  # this epoch's stats are recomputed when it finishes
            save(open_epoch, done, (total_loss, correct, seen))
        else:
            epoch, done = len(history), 0
        where = f"state saved to '{ckpt}' (epoch {epoch + 1}, step {done})" if ckpt else "nothing saved"
        if ckpt and not distributed.writes():  # rank 0 writes checkpoints; its last one stays
            where = f"'{ckpt}' keeps rank 0's last save"
        if lost is not None:
            raise distributed.RankLost(f"{lost} during {description}; {where}; {resume_hint}") from None
        if isinstance(exc, SystemExit) and distributed.world_size() < 2:  # the signal handler said why
            raise
        raise TrainingInterrupted(
            f"interrupted in epoch {epoch + 1} after step {done}; state saved to '{ckpt}', {resume_hint}"
            if ckpt
            else f"interrupted in epoch {epoch + 1}"
        ) from None
    model.to(memory_format=torch.contiguous_format)
    distributed.sync_state(model)
    return TrainResult(tuple(history), str(ckpt) if ckpt else None, resumed_from)
