"""Private-inference backends: one interface (`Backend`), engines found by name.

A backend registers itself with `@register_backend`; the built-in ones are imported only when first
asked for, so `import relu_opt` never imports an engine. Adding an engine touches one module.
"""

from __future__ import annotations

import importlib

from relu_opt.backends.base import (
    DEFAULT_BACKEND,
    INSECURE_LABEL,
    Backend,
    Cost,
    CostModel,
    Dealer,
    HostRole,
    Measurement,
    PartyRun,
)
from relu_opt.backends.network import LAN, WAN, Network, load_link, parse_network
from relu_opt.backends.pricing import Pricing
from relu_opt.errors import ConfigError

__all__ = [
    "DEFAULT_BACKEND",
    "INSECURE_LABEL",
    "LAN",
    "WAN",
    "Backend",
    "Cost",
    "CostModel",
    "Dealer",
    "HostRole",
    "Measurement",
    "Network",
    "PartyRun",
    "Pricing",
    "get_backend",
    "list_backends",
    "load_link",
    "parse_network",
    "register_backend",
]

_BACKENDS: dict[str, Backend] = {}
# name -> the module that registers it on import
_BUILTIN = {"crypten": "relu_opt.backends.crypten", "spu": "relu_opt.backends.spu"}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: register a Backend subclass under its `name`."""
    _BACKENDS[cls.name] = cls()
    return cls


def list_backends() -> list[str]:
    """Return the names `--backend` accepts."""
    return sorted(set(_BUILTIN) | set(_BACKENDS))


def get_backend(name: str) -> Backend:
    """Return the Backend registered as `name` (ConfigError naming the choices if unknown)."""
    if name not in _BACKENDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BACKENDS:
        raise ConfigError(f"--backend {name} is not a backend; choose {', '.join(list_backends())}")
    return _BACKENDS[name]
