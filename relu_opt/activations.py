"""relu-opt's own activation modules: polynomial replacements, masked ReLUs and their export form.

Each is an fx leaf (one node per site) and reports what it computes through `census_items`, so the census
and the ONNX count agree on rewritten models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from relu_opt.graph import register_leaf

GRANULARITIES = ("site", "channel", "pixel")


@register_leaf
class Poly(nn.Module):
    """sum_k coeffs[k] * x**k, with one coefficient vector per channel (dim 1) or one for the layer.

    With `input_range` (per channel, or one value), training-mode inputs are clamped to
    [-input_range, input_range] first: a composition of polynomials cannot blow up on an input outside
    the range the polynomial was fitted on, so one such batch cannot poison BatchNorm statistics. The
    clamp is training-only and not saved (a non-persistent buffer): eval mode, export and MPC compute
    the bare polynomial, which costs no comparison."""

    def __init__(self, coeffs: Tensor, trainable: bool = True, input_range: Tensor | None = None) -> None:
        super().__init__()
        coeffs = torch.as_tensor(coeffs, dtype=torch.float32)
        if coeffs.dim() == 1:
            coeffs = coeffs[:, None]
        self.coeffs = nn.Parameter(coeffs.clone(), requires_grad=trainable)  # (degree + 1, channels)
        bound = None if input_range is None else torch.as_tensor(input_range, dtype=torch.float32).reshape(-1)
        self.register_buffer("input_range", bound, persistent=False)

    @property
    def degree(self) -> int:
        return self.coeffs.shape[0] - 1

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2) if self.coeffs.shape[1] > 1 else ()
        if self.training and self.input_range is not None:
            r = self.input_range.reshape(shape) if shape and self.input_range.numel() > 1 else self.input_range
            x = torch.maximum(torch.minimum(x, r), -r)
        c = [self.coeffs[k].reshape(shape) if shape else self.coeffs[k] for k in range(self.degree + 1)]
        # Horner's form: under MPC each product of secrets is a round, so degree d costs d rounds
        # (c2 * x, then (c2 * x + c1) * x), where summing c_k * x**k costs 2d - 1.
        y = c[self.degree]
        for k in range(self.degree - 1, -1, -1):
            y = y * x + c[k]
        return y

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("poly", math.prod(shape))]


@register_leaf
class Square(nn.Module):
    """x**2, the cheapest non-linearity under MPC (one round)."""

    def forward(self, x: Tensor) -> Tensor:
        return x**2

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("square", math.prod(shape))]


def replacement_items(rep: nn.Module | None, shape: tuple[int, ...], cost: bool = False) -> list[tuple[str, int]]:
    """Return what a replacement module computes on `shape`, as (kind, elements) census items; with
    `cost`, its MPC cost items where it has its own (`cost_items`, e.g. a polynomial with public
    coefficients costs its powers only)."""
    if rep is None or isinstance(rep, nn.Identity):
        return []
    items = (getattr(rep, "cost_items", None) if cost else None) or getattr(rep, "census_items", None)
    return list(items(shape)) if callable(items) else [("poly", math.prod(shape))]


def _arg_value(a):
    return a.detach().clone() if isinstance(a, Tensor) else a


@register_leaf
class FunctionOp(nn.Module):
    """A function-call site as a module: `fn(x, *args, **kwargs)` (or `x.method(...)`), constant args."""

    def __init__(self, target, args: tuple = (), kwargs: dict | None = None, kind: str = "", method: bool = False):
        super().__init__()
        self.target, self.args, self.kwargs = target, tuple(args), dict(kwargs or {})
        self.kind, self.method = kind, method

    def forward(self, x: Tensor) -> Tensor:
        if self.method:
            return getattr(x, self.target)(*self.args, **self.kwargs)
        return self.target(x, *self.args, **self.kwargs)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [(self.kind, math.prod(shape))] if self.kind else []


@register_leaf
class MaskedSite(nn.Module):
    """The site's own op (`original`, ReLU by default) where `mask` is 1 and `replacement` (identity when
    None) elsewhere; the training form, whatever the site's kind.

    `mask` has the per-sample shape broadcast to the activation: (1,) for a whole site, (C, 1, 1) per
    channel, (C, H, W) per pixel. Every element is evaluated both ways, so this form costs the full op
    under MPC; `materialize_partial` turns it into the original, the replacement or a PartialSite.
    """

    def __init__(
        self,
        mask: Tensor,
        replacement: nn.Module | None = None,
        original: nn.Module | None = None,
        kind: str = "relu",
    ) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float().clone())
        self.replacement = replacement if replacement is not None else nn.Identity()
        self.original = original if original is not None else nn.ReLU()
        self.kind = kind
        self.blend = 0.0  # > 0 during gradual replacement: dropped elements are still part original

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask if not self.blend else self.mask + (1 - self.mask) * self.blend
        return m * self.original(x) + (1 - m) * self.replacement(x)

    def kept(self, shape: tuple[int, ...]) -> int:
        """Return the elements per sample this mask keeps at an activation of `shape`."""
        return int(torch.broadcast_to(self.mask, shape).count_nonzero())

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        kept = self.kept(shape)
        items = [(self.kind, kept)] if kept else []
        if kept < math.prod(shape):
            items += [
                (k, n * (math.prod(shape) - kept) // math.prod(shape))
                for k, n in replacement_items(self.replacement, shape)
            ]
        return items


MaskedReLU = MaskedSite  # the ReLU case, by its historical name


@register_leaf
class PartialSite(nn.Module):
    """The original (elementwise) op on the kept elements only, the replacement on the rest: the form
    that really saves.

    Kept and other elements are gathered with public indices, so under MPC only the kept ones pay for the
    original op; the results are concatenated and put back in place with an inverse permutation (CrypTen
    has Gather and Concat but no ScatterElements).
    """

    def __init__(
        self,
        keep: Tensor,
        shape: tuple[int, ...],
        replacement: nn.Module | None = None,
        original: nn.Module | None = None,
        kind: str = "relu",
    ) -> None:
        super().__init__()
        keep = keep.reshape(-1).bool()
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("keep_idx", keep.nonzero().flatten())
        self.register_buffer("rest_idx", (~keep).nonzero().flatten())
        self.register_buffer("inverse", torch.argsort(order))
        self.replacement = replacement if replacement is not None else nn.Identity()
        self.original = original if original is not None else nn.ReLU()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        kept = self.original(flat.index_select(1, self.keep_idx))
        rest = self.replacement(flat.index_select(1, self.rest_idx))
        return torch.cat([kept, rest], 1).index_select(1, self.inverse).view(-1, *self.shape)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        rest = int(self.rest_idx.numel())
        return [(self.kind, int(self.keep_idx.numel()))] + replacement_items(self.replacement, (rest,))

    def cost_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        """Return what the site costs under MPC: the kept elements' op, then the replacement's cost items."""
        rest = int(self.rest_idx.numel())
        return [(self.kind, int(self.keep_idx.numel()))] + replacement_items(self.replacement, (rest,), cost=True)


PartialReLU = PartialSite


@register_leaf
class ChannelAffine(nn.Module):
    """x * scale + shift per channel: an eval-mode BatchNorm with no conv before it to fold into."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)
