"""The replacement registry: what can stand in for a dropped non-linear site, one entry per replacement.

`@register_replacement(name, applies=..., default_for=...)` on a builder `(SiteContext) -> module | None`
(None: identity). The optimizer asks `replacement_for(kind, requested)`: the requested replacement when it
applies to the site's kind, else the kind's default (2quad for softmax, frozen-norm for LayerNorm).
Builders get the site's own measured statistics, so a polynomial is fitted to the site's function on its
inputs; with no statistics (rebuilding a saved plan) they return the same module shape, to be loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relu_opt import ops
from relu_opt.activations import Poly, Square
from relu_opt.errors import BudgetError
from relu_opt.graph import register_leaf
from relu_opt.poly_fit import SiteStats, fit_poly


@dataclass
class SiteContext:
    """What a replacement builder knows about one site."""

    site: str
    kind: str
    shape: tuple[int, ...]  # per sample
    original: nn.Module | None = None
    stats: SiteStats | None = None  # measured input/output moments (elementwise sites)
    variance: float | None = None  # mean normalised variance (LayerNorm sites)
    degree: int = 2
    poly_per: str = "channel"
    train_range: float | None = None  # clamp a polynomial's training inputs to this times its fitted range


@dataclass(frozen=True)
class Replacement:
    name: str
    build: Callable[[SiteContext], nn.Module | None]
    applies: Callable[[ops.OpKind], bool]
    default_for: tuple[str, ...] = ()

    def __call__(self, ctx: SiteContext) -> nn.Module | None:
        """Return the module that replaces the site (None: identity)."""
        return self.build(ctx)


REPLACEMENTS: dict[str, Replacement] = {}


def _elementwise(kind: ops.OpKind) -> bool:
    return kind.elementwise


def register_replacement(
    name: str, applies: Callable[[ops.OpKind], bool] = _elementwise, default_for: tuple[str, ...] = ()
):
    """Register a replacement builder under `name`; returns the decorator."""

    def wrap(fn: Callable[[SiteContext], nn.Module | None]):
        REPLACEMENTS[name] = Replacement(name, fn, applies, tuple(default_for))
        return fn

    return wrap


def replacement_for(kind: str, requested: str) -> Replacement:
    """Return `requested` when it applies to `kind`, else the kind's default replacement."""
    if requested not in REPLACEMENTS:
        raise BudgetError(f"unknown replacement '{requested}'; choose {', '.join(REPLACEMENTS)}")
    entry = ops.get_kind(kind)
    if REPLACEMENTS[requested].applies(entry):
        return REPLACEMENTS[requested]
    default = next((r for r in REPLACEMENTS.values() if kind in r.default_for), None)
    if default is None:
        raise BudgetError(
            f"replacement '{requested}' does not apply to {kind} sites and {kind} has no default replacement; "
            f"choose one of {', '.join(r.name for r in REPLACEMENTS.values() if r.applies(entry))}, "
            f"or leave {kind} out of --kinds"
        )
    return default


@register_replacement("identity")
def _identity(ctx: SiteContext) -> nn.Module | None:
    return None


@register_replacement("square")
def _square(ctx: SiteContext) -> nn.Module:
    return Square()


@register_replacement("poly")
def _poly(ctx: SiteContext) -> nn.Module:
    channels = ctx.shape[0] if ctx.poly_per == "channel" and len(ctx.shape) > 0 else 1
    if ctx.stats is None:
        return Poly(torch.zeros(ctx.degree + 1, channels))
    stats = ctx.stats if ctx.poly_per == "channel" else ctx.stats.merged()
    bound = None if not ctx.train_range else ctx.train_range * stats.max_abs.float()
    return Poly(fit_poly(stats), input_range=bound)


@register_leaf
class TwoQuad(nn.Module):
    """MPCFormer's softmax replacement along the last dimension: (x + c)^2 / sum (x + c)^2.

    The sum is a product with a public ones vector (CrypTen's ReduceSum reads no opset-13 axes), and the
    division is of an encrypted value by an encrypted one, which CrypTen runs as one reciprocal per row."""

    def __init__(self, length: int, c: float = 5.0) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.register_buffer("ones", torch.ones(length, 1))
        # A public scale that keeps the row sums near 1, where CrypTen's reciprocal converges (its
        # Newton iteration diverges for sums in the thousands: 49 tokens x (0 + 5)^2 already is).
        self.scale = 1.0 / (length * c * c)

    def forward(self, x: Tensor) -> Tensor:
        q = (x + self.c) ** 2 * self.scale
        return q / (q @ self.ones)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("2quad", math.prod(shape))]


def _last_dim_softmax(ctx: SiteContext) -> bool:
    mod = ctx.original
    dim = getattr(mod, "dim", None)
    if dim is None and mod is not None and hasattr(mod, "kwargs"):
        dim = mod.kwargs.get("dim", mod.args[0] if mod.args else None)
    return dim in (-1, len(ctx.shape))


@register_replacement("2quad", applies=lambda k: k.name == "softmax", default_for=("softmax",))
def _two_quad(ctx: SiteContext) -> nn.Module:
    if not _last_dim_softmax(ctx):
        raise BudgetError(f"site '{ctx.site}': 2quad replaces a softmax over the last dimension only")
    return TwoQuad(ctx.shape[-1])


@register_leaf
class FrozenNorm(nn.Module):
    """LayerNorm with frozen statistics: (x - mean(x)) * scale + bias, scale = weight / sqrt(E[var] + eps).

    A linear map (no inverse square root), so CrypTen runs it at the cost of a mean and an affine."""

    def __init__(self, dims: int, scale: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.dims = tuple(range(-dims, 0))
        self.scale = nn.Parameter(scale.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(self.dims, keepdim=True)) * self.scale + self.bias

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return []  # linear


@register_replacement("frozen-norm", applies=lambda k: k.name == "layernorm", default_for=("layernorm",))
def _frozen_norm(ctx: SiteContext) -> nn.Module:
    mod = ctx.original
    if not isinstance(mod, nn.LayerNorm):
        raise BudgetError(f"site '{ctx.site}': frozen-norm replaces nn.LayerNorm modules only")
    shape = tuple(mod.normalized_shape)
    weight = mod.weight.detach() if mod.weight is not None else torch.ones(shape)
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(shape)
    var = 1.0 if ctx.variance is None else ctx.variance
    return FrozenNorm(len(shape), weight / math.sqrt(var + mod.eps), bias)
