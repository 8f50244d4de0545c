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
    """sum_k coeffs[k] * x**k, with one coefficient vector per channel (dim 1) or one for the layer."""

    def __init__(self, coeffs: Tensor, trainable: bool = True) -> None:
        super().__init__()
        coeffs = torch.as_tensor(coeffs, dtype=torch.float32)
        if coeffs.dim() == 1:
            coeffs = coeffs[:, None]
        self.coeffs = nn.Parameter(coeffs.clone(), requires_grad=trainable)  # (degree + 1, channels)

    @property
    def degree(self) -> int:
        return self.coeffs.shape[0] - 1

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2) if self.coeffs.shape[1] > 1 else ()
        c = [self.coeffs[k].reshape(shape) if shape else self.coeffs[k] for k in range(self.degree + 1)]
        y = c[0] + c[1] * x
        for k in range(2, self.degree + 1):
            y = y + c[k] * x**k  # x**k exports as Pow: CrypTen cannot run Mul(x, x)
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


def _replacement_kind(rep: nn.Module | None) -> str | None:
    if rep is None or isinstance(rep, nn.Identity):
        return None
    return "square" if isinstance(rep, Square) else "poly"


@register_leaf
class MaskedReLU(nn.Module):
    """ReLU where `mask` is 1 and `replacement` (identity when None) elsewhere; the training form.

    `mask` has the per-sample shape broadcast to the activation: (1,) for a whole site, (C, 1, 1) per
    channel, (C, H, W) per pixel. Every element is evaluated both ways, so this form costs a full ReLU
    under MPC; `materialize_partial` turns it into PartialReLU for export.
    """

    def __init__(self, mask: Tensor, replacement: nn.Module | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float().clone())
        self.replacement = replacement if replacement is not None else nn.Identity()
        self.blend = 0.0  # > 0 during gradual replacement: dropped elements are still part ReLU

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask if not self.blend else self.mask + (1 - self.mask) * self.blend
        return m * torch.relu(x) + (1 - m) * self.replacement(x)

    def kept(self, shape: tuple[int, ...]) -> int:
        """Return the ReLU elements per sample this mask keeps at an activation of `shape`."""
        return int(torch.broadcast_to(self.mask, shape).count_nonzero())

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        kept = self.kept(shape)
        items = [("relu", kept)] if kept else []
        kind = _replacement_kind(self.replacement)
        if kind and kept < math.prod(shape):
            items.append((kind, math.prod(shape) - kept))
        return items


@register_leaf
class PartialReLU(nn.Module):
    """ReLU on the kept elements only, the replacement on the rest: the form that really saves.

    Kept and other elements are gathered with public indices, so under MPC only the kept ones pay for a
    comparison; the results are concatenated and put back in place with an inverse permutation (CrypTen
    has Gather and Concat but no ScatterElements).
    """

    def __init__(self, keep: Tensor, shape: tuple[int, ...], replacement: nn.Module | None = None) -> None:
        super().__init__()
        keep = keep.reshape(-1).bool()
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("keep_idx", keep.nonzero().flatten())
        self.register_buffer("rest_idx", (~keep).nonzero().flatten())
        self.register_buffer("inverse", torch.argsort(order))
        self.replacement = replacement if replacement is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        kept = torch.relu(flat.index_select(1, self.keep_idx))
        rest = self.replacement(flat.index_select(1, self.rest_idx))
        return torch.cat([kept, rest], 1).index_select(1, self.inverse).view(-1, *self.shape)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        items = [("relu", int(self.keep_idx.numel()))]
        kind = _replacement_kind(self.replacement)
        if kind:
            items.append((kind, int(self.rest_idx.numel())))
        return items


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
