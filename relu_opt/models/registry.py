"""A timm-style model registry: `@register_model` on factories, `create_model(name, ...)`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from relu_opt.errors import ModelSpecError

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    default_input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE):
    """Register a factory under its function name; returns the factory unchanged."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[factory.__name__] = ModelEntry(factory.__name__, factory, doc[0] if doc else "", tuple(input_shape))
        return factory

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Return the sorted names of registered models matching a shell-style pattern."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """Return the registry entry for `name`, or raise ModelSpecError naming close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(
            f"unknown model '{name}'.{hint} Zoo models: {', '.join(list_models())}; "
            "or give path/to/file.py:Class or package.module:factory"
        ) from None


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    pretrained: bool | str = False,
    **kwargs,
) -> nn.Module:
    """Return a zoo model: randomly initialised, or with shipped weights when `pretrained` (True or a dataset).

    Pretrained models take their classes and input channels from the weights' record; giving other values
    is an error rather than a silently different head."""
    entry = get_entry(name)
    if not pretrained:
        return entry.factory(num_classes=num_classes or 10, in_channels=in_channels or 3, **kwargs)
    from relu_opt.models.pretrained import get_pretrained, load_pretrained

    rec = get_pretrained(name, pretrained)
    for what, given, shipped in (
        ("num_classes", num_classes, rec.num_classes),
        ("in_channels", in_channels, rec.in_channels),
    ):
        if given is not None and given != shipped:
            flag = "--num-classes" if what == "num_classes" else "--input-shape"
            raise ModelSpecError(
                f"{what}={given} does not match the pretrained '{name}' ({rec.dataset}), which has {what}={shipped}; "
                f"leave {what} out (on the command line: {flag} "
                f"matching {rec.input_shape}) or train your own weights"
            )
    return load_pretrained(entry.factory(num_classes=rec.num_classes, in_channels=rec.in_channels, **kwargs), rec)
