"""Resolve MODEL specs (zoo name, path/to/file.py:Name, package.module:factory) and load weights."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from relu_opt.errors import ModelSpecError, WeightsError
from relu_opt.models import create_model, get_entry

_SPEC_HELP = "MODEL is a zoo name (see `relu-opt models`), path/to/file.py:ClassOrFactory, or package.module:factory"


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a spec, with the input shape it expects by default (None if unknown)."""

    model: nn.Module
    name: str
    default_input_shape: tuple[int, ...] | None


def _import_file(path: Path):
    mod_name = f"relu_opt_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import '{path}' as Python; {_SPEC_HELP}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSpecError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.pop(0)
    return module


def _candidates(module) -> list[str]:
    return sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and getattr(v, "__module__", None) == module.__name__
        and (inspect.isclass(v) and issubclass(v, nn.Module) or inspect.isfunction(v))
    )


def resolve_model(
    spec: str, num_classes: int | None = 10, in_channels: int | None = 3, pretrained: bool | str = False
) -> LoadedModel:
    """Return the model named by `spec`; raise ModelSpecError naming what is missing and the fix.

    `pretrained` (True or a dataset name) loads a zoo model's shipped weights; None for `num_classes` or
    `in_channels` then means "whatever the weights have"."""
    if ":" not in spec:
        if spec.endswith(".py") or os.sep in spec:
            raise ModelSpecError(f"'{spec}' names a file but no class; write {spec}:ClassName. {_SPEC_HELP}")
        entry = get_entry(spec)  # raises with close matches
        if pretrained:
            from relu_opt.models.pretrained import get_pretrained

            rec = get_pretrained(spec, pretrained)
            model = create_model(spec, num_classes=num_classes, in_channels=in_channels, pretrained=rec.dataset)
            return LoadedModel(model, spec, rec.input_shape)
        num_classes, in_channels = num_classes or 10, in_channels or 3
        try:
            model = entry.factory(num_classes=num_classes, in_channels=in_channels)
        except (RuntimeError, MemoryError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelSpecError(
                f"building '{spec}' with {num_classes} classes and {in_channels} input channels failed: {first}"
            ) from exc
        shape = (1, in_channels, *entry.default_input_shape[2:])
        return LoadedModel(model, spec, shape)
    if pretrained:
        raise ModelSpecError(
            f"--pretrained works for zoo models only (see `relu-opt models`); for '{spec}' pass --weights FILE"
        )
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise ModelSpecError(f"model file '{where}' does not exist. {_SPEC_HELP}")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ModelSpecError(
                f"cannot import module '{where}' ({exc}); is it installed or on PYTHONPATH? {_SPEC_HELP}"
            ) from exc
    if not hasattr(module, attr):
        found = ", ".join(_candidates(module)) or "none"
        raise ModelSpecError(f"'{where}' has no attribute '{attr}'. Module classes and functions it defines: {found}")
    obj = getattr(module, attr)
    try:
        model = obj()
    except TypeError as exc:
        raise ModelSpecError(
            f"'{spec}' must be constructible with no arguments ({exc}); "
            "wrap it in a factory function that sets its arguments"
        ) from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelSpecError(f"building '{spec}' raised {type(exc).__name__}: {first}; fix the model's code") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    shape = getattr(model, "default_input_shape", None)
    return LoadedModel(model, spec, tuple(shape) if shape else None)


def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"'{path}' does not hold a state dict of tensors; save one with torch.save(model.state_dict(), path)"
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict into `model` in place and return it; raise WeightsError on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read '{path}' as a weights-only torch checkpoint: {first}") from exc
    state = _state_dict_of(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise WeightsError(
            f"'{path}' does not fit the model: {'; '.join(parts)}. Is it a checkpoint of this architecture?"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"'{path}' has wrong shapes: {_first(wrong)}. Check --num-classes and --input-shape")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"'{path}' has non-finite (NaN or Inf) values in: {_first(bad)}")
    model.load_state_dict(state)
    return model
