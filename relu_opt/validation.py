"""Checks every command runs on its options and inputs before any work starts.

Each check raises ConfigError with one line naming the bad option or input and the fix, so a bad
command fails in a second instead of after minutes of training, and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from relu_opt.errors import ConfigError, first_line

# Share of the available memory one forward's activations may take before a shape is refused.
MEMORY_SHARE = 0.5

# Python keywords whose command-line flag is not the keyword with dashes
_FLAGS = {
    "rank_epochs": "--snl-epochs",
    "rank_finetune_steps": "--finetune-steps",
    "output": "-o",
    "path": "-o",
    "outdir": "-o",
    "bench_batch": "--batch",
}


def flag(name: str) -> str:
    """Return how messages name an option: its command-line flag (max_train: --max-train), which reads
    as the keyword of the same name in Python."""
    if name.startswith("-") or " " in name:
        return name
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_int(option: str, value: int | None, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise ConfigError unless `value` (None passes) is an integer in [minimum, maximum]."""
    if value is None:
        return
    option = flag(option)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{option} {value!r} is a {type(value).__name__}; give an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{option} {value} is out of range; give an integer of at least {minimum}{upper}")


def check_float(
    option: str,
    value: float | None,
    above: float | None = 0.0,
    maximum: float | None = None,
    minimum: float | None = None,
) -> None:
    """Raise ConfigError unless `value` (None passes) is finite, > `above`, >= `minimum` and <= `maximum`."""
    if value is None:
        return
    option = flag(option)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{option} {value!r} is a {type(value).__name__}; give a number")
    if not math.isfinite(value):
        raise ConfigError(f"{option} {value} is not a finite number; give a number like 0.01")
    if above is not None and value <= above:
        raise ConfigError(f"{option} {value:g} must be above {above:g}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{option} {value:g} must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{option} {value:g} must be at most {maximum:g}")


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    choices, option = list(choices), flag(option)
    if value not in choices:
        raise ConfigError(f"{option} '{value}' is not known; choose one of {', '.join(choices)}")


def parse_budgets(budget: int | None, budgets: str | None, required: bool = True) -> list[int]:
    """Return the budgets from --budget or --budgets 'N1,N2'; raise ConfigError on an empty, malformed or
    negative entry (and, when `required`, when neither is given)."""
    if budget is not None and budgets:
        raise ConfigError("give --budget or --budgets, not both")
    if budgets is not None:
        parts = [p.strip().replace("_", "") for p in budgets.split(",")]
        if not budgets.strip() or any(p == "" for p in parts):
            raise ConfigError(f"--budgets '{budgets}' has an empty entry; write integers separated by commas")
        try:
            levels = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--budgets '{budgets}' must be integers separated by commas, e.g. 2000,1000") from None
    elif budget is not None:
        levels = [budget]
    elif required:
        raise ConfigError("give --budget N (ReLU elements per sample to keep) or --budgets N1,N2,...")
    else:
        return []
    for b in levels:
        if b < 0:
            raise ConfigError(f"budget {b} is negative; give the ReLU elements per sample to keep (0 or more)")
    return levels


def check_device(device: str) -> str:
    """Return `device` if torch can use it; raise ConfigError otherwise."""
    if not isinstance(device, str):
        raise ConfigError(f"--device {device!r} is a {type(device).__name__}; give cpu or cuda")
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
        return device
    raise ConfigError(f"--device '{device}' is not known; use cpu or cuda")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_under(path: Path, option: str, shown: Path | None = None) -> None:
    """Raise ConfigError unless something can be written at `path` (named `shown` in messages)."""
    shown = shown or path
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"{option} '{shown}': '{base}' is a file, not a folder; choose another place")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".relu-opt-probe-", dir=base)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"{option} '{shown}': cannot write in '{base}' ({reason}); choose another place") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike | None, option: str = "-o") -> None:
    """Raise ConfigError unless a file can be written at `path` (None passes): not a folder, under a
    folder that exists or can be made and is writable."""
    if path is None:
        return
    path, option = Path(path), flag(option)
    if path.is_dir():
        raise ConfigError(f"{option} '{path}' is a folder; give a file name, e.g. {path / 'out'}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{option} '{path}' is a device, pipe or socket, not a file; give a file name")
    _check_writable_under(path, option)


def check_output_dir(path: str | os.PathLike | None, option: str = "-o") -> None:
    """Raise ConfigError unless `path` (None passes) is, or can be made, a writable folder."""
    if path is None:
        return
    path, option = Path(path), flag(option)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} '{path}' is a file; give a folder (it is created if missing)")
    _check_writable_under(path / "x", option, path)


def check_input_file(path: str | os.PathLike | None, option: str) -> None:
    """Raise ConfigError unless `path` (None passes) is an existing file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} '{path}' is a folder; give a file")
    if not path.is_file():
        raise ConfigError(f"{option} '{path}' does not exist")


def check_leaf(model: nn.Module, leaf: Sequence[str] | None) -> None:
    """Raise ConfigError for a --leaf that names no module class or submodule of `model`."""
    if not leaf:
        return
    classes = {type(m).__name__ for m in model.modules()}
    names = {n for n, _ in model.named_modules() if n}
    for name in leaf:
        if name not in classes and name not in names:
            known = ", ".join(sorted(classes)[:12])
            raise ConfigError(f"--leaf '{name}' names no module class or submodule of the model; its classes: {known}")


@dataclass(frozen=True)
class ForwardCheck:
    """What a dry forward found: the output shape and the bytes its activations take."""

    output_shape: tuple[int, ...]
    activation_bytes: int


def available_memory() -> int:
    """Return the bytes of memory available now (MemAvailable; total memory where that is unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _dry_forward(model: nn.Module, shape: tuple[int, ...], device: str) -> tuple[object, int]:
    sizes: list[int] = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return out, sum(sizes)


def check_model_input(
    model: nn.Module,
    shape: Sequence[int],
    name: str = "the model",
    num_classes: int | None = None,
    fix: str = "pass --input-shape N,C,H,W that the model takes",
) -> ForwardCheck:
    """Return what a dry forward of `model` on zeros of `shape` found; raise ConfigError when the shape
    does not fit, the activations would not fit in memory, the forward does not return one tensor, or
    (given `num_classes`) its last dimension is not the number of classes.

    The forward runs on the meta device (no memory) first; models that the meta device cannot run are
    tried for real on one sample, once the input alone is known to be small."""
    shape = tuple(int(s) for s in shape)
    where = f"{name} on input shape {','.join(map(str, shape))}"
    try:
        meta = copy.deepcopy(model).to("meta").eval()
        out, act = _dry_forward(meta, shape, "meta")
    except Exception:
        out, act = None, None
    if act is None:
        one = (1, *shape[1:])
        if math.prod(one) * 4 * 64 > available_memory() * MEMORY_SHARE:
            raise ConfigError(f"{where} would need more memory than this machine has; use a smaller input shape")
        was = model.training
        model.eval()
        try:
            out, act = _dry_forward(model, one, "cpu")
        except Exception as exc:
            raise ConfigError(f"{where} fails: {first_line(exc)}; {fix}") from None
        finally:
            model.train(was)
        act *= shape[0]
    limit = available_memory() * MEMORY_SHARE
    if act > limit:
        raise ConfigError(
            f"{where} needs about {act / 2**30:.1f} GiB for its activations, over the {limit / 2**30:.1f} GiB "
            "this machine can spare; use a smaller input shape"
        )
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"{name}'s forward returns a {type(out).__name__}, not one tensor; relu-opt needs a model whose "
            "forward returns the logits as a single tensor (wrap it so it does)"
        )
    if num_classes is not None and (out.dim() < 2 or out.shape[-1] != num_classes):
        raise ConfigError(
            f"{name} outputs shape {tuple(out.shape)} but the dataset has {num_classes} classes; "
            "give a model whose last dimension is the number of classes"
        )
    return ForwardCheck(tuple(out.shape), act)


def check_optimized_fits(optimized: nn.Module, model: nn.Module, shape: Sequence[int], folder: str) -> None:
    """Raise ConfigError unless the optimized model from `folder` takes `shape` and gives the outputs
    `model` (the MODEL it is compared with) gives."""
    fix = "give the MODEL, --input-shape and --num-classes it was optimized from"
    mine = check_model_input(optimized, shape, f"the optimized model in '{folder}'", fix=fix)
    base = check_model_input(model, shape, "MODEL")
    if mine.output_shape != base.output_shape:
        raise ConfigError(
            f"the optimized model in '{folder}' outputs shape {mine.output_shape} but MODEL outputs "
            f"{base.output_shape}; {fix}"
        )
