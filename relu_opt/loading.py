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

from relu_opt.errors import InputShapeError, ModelSpecError, WeightsError, first_line
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
        why = first_line(exc)
        why = "not a state dict of tensors" if "weights_only" in why or why.isdigit() else why  # not torch's advice
        raise WeightsError(
            f"cannot read '{path}' as a weights-only torch checkpoint ({why}); save one with "
            "torch.save(model.state_dict(), path)"
        ) from exc
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


@dataclass(frozen=True)
class Loaded:
    """A model ready to use: built, weights loaded, checked on its input shape; with its dataset when one
    was named."""

    model: nn.Module
    name: str
    input_shape: tuple[int, ...]
    data: object | None = None  # relu_opt.data.Dataset


def dataset_for(data: str, data_dir, input_shape: tuple[int, ...] | None, spec: str, default_shape):
    """Return dataset `data`; `synthetic` takes `input_shape` (else the model's default), 10 classes."""
    from relu_opt.data import load_dataset

    if data == "synthetic":
        shape = input_shape or default_shape
        if shape is None:
            raise InputShapeError(
                f"'{spec}' has no default input shape, so random inputs need one; pass --input-shape N,C,H,W"
            )
        return load_dataset(data, data_dir, shape=tuple(shape[1:]), num_classes=10)
    ds = load_dataset(data, data_dir, download=False)
    if input_shape is not None and tuple(ds.input_shape[1:]) != tuple(input_shape[1:]):
        raise InputShapeError(
            f"input shape {','.join(map(str, input_shape))} does not match {data}'s inputs "
            f"{','.join(map(str, ds.input_shape))}; leave --input-shape out, or use --data synthetic for random "
            "inputs of any shape"
        )
    return ds


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool | str = False,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    num_classes: int | None = None,
    leaf: tuple[str, ...] | list[str] = (),
) -> Loaded:
    """Return the Loaded model named by `spec` (with dataset `data` when given), checked on its input."""
    from relu_opt import validation
    from relu_opt.graph import parse_input_shape, register_leaves

    validation.check_int("num_classes", num_classes)
    validation.check_input_file(weights, "--weights")
    if pretrained and weights is not None:
        raise WeightsError("give --pretrained or --weights, not both")
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    if isinstance(spec, nn.Module):
        if pretrained:
            raise ModelSpecError("pretrained= is for zoo names; load the weights into your module yourself")
        built = LoadedModel(spec, type(spec).__name__, getattr(spec, "default_input_shape", None))
        ds = dataset_for(data, data_dir, shape, built.name, built.default_input_shape) if data else None
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ModelSpecError(f"model {spec!r} is not a model spec. {_SPEC_HELP}")
        early = resolve_model(spec) if ":" in spec and data else None  # a file's model: its own default shape
        zoo = None if ":" in spec else _zoo_entry(spec)
        default = early.default_input_shape if early else getattr(zoo, "default_input_shape", None)
        ds = dataset_for(data, data_dir, shape, spec, default) if data else None
        classes = ds.num_classes if ds is not None else num_classes
        channels = ds.input_shape[1] if ds is not None else (shape[1] if shape else None)
        wanted = pretrained if isinstance(pretrained, str) else ((data or True) if pretrained else False)
        built = early or resolve_model(spec, classes, channels, pretrained=wanted)
    shape = tuple(ds.input_shape) if ds is not None else (shape or built.default_input_shape)
    if shape is None:
        raise InputShapeError(
            f"'{built.name}' has no default input shape; pass --input-shape, e.g. --input-shape 1,3,32,32"
        )
    shape = tuple(shape)
    validation.check_leaf(built.model, list(leaf))
    register_leaves(built.model, list(leaf))
    fix = (
        f"give a model that takes the {data} inputs ({','.join(map(str, shape))})"
        if ds is not None
        else "pass --input-shape N,C,H,W that the model takes"
    )
    classes = ds.num_classes if ds is not None else None
    validation.check_model_input(built.model, shape, f"'{built.name}'", num_classes=classes, fix=fix)
    if weights is not None:
        load_weights(built.model, weights)
    return Loaded(built.model.eval(), built.name, shape, ds)


def _zoo_entry(spec: str):
    if spec.endswith(".py") or os.sep in spec:
        return None
    return get_entry(spec)
