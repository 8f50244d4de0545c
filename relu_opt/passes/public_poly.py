"""Public polynomial coefficients: the opt-in for the poly sites `fold_poly` cannot fold.

Under CrypTen a Poly's coefficients are the model owner's weights, kept secret, so every coefficient
times a power of x is a multiplication of secrets (a degree-2 site: 3 rounds, 48 B per element). Where
folding them into the neighbouring linear layers is not exact (the site's output is read twice, it sits
after a residual addition, inside a partly kept site, or has degree 3-4), the owner may choose to reveal
them instead: `publicize_polys` turns each remaining Poly into a PublicPoly, whose coefficients are plain
tensor attributes. The ONNX export holds those as Constant nodes, which CrypTen's converter keeps as
unencrypted tensors (`crypten.nn.Constant` is never encrypted), so multiplying by them is local and only
the powers of x cost rounds: a degree-2 site costs one square (1 round, 16 B per element for 2 parties).

What it reveals: the coefficients of each such polynomial, i.e. part of the owner's weights, to every
party (the input and all other weights stay secret). `relu-opt optimize --public-coeffs` records the
choice in plan.json, so export and bench agree.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.activations import Poly
from relu_opt.graph import register_leaf
from relu_opt.passes.utils import set_submodule


def _power_steps(degree: int) -> list[str]:
    """Return the multiplication that makes each power x^2 .. x^degree: "square" (x^k = (x^(k/2))^2) or
    "mul" (x^k = x^(k-1) * x), one round each."""
    return ["square" if k % 2 == 0 else "mul" for k in range(2, degree + 1)]


@register_leaf
class PublicPoly(nn.Module):
    """sum_k coeffs[k] * x**k with coefficients CrypTen keeps public (per channel, dim 1, or one set).

    The coefficients are a plain tensor attribute, neither parameter nor buffer: tracing for ONNX turns
    them into Constant nodes. The powers are built from each other (x^3 = x^2 * x, x^4 = (x^2)^2)."""

    def __init__(self, coeffs: Tensor) -> None:
        super().__init__()
        coeffs = torch.as_tensor(coeffs).detach().float().clone()
        self.coeffs = coeffs[:, None] if coeffs.dim() == 1 else coeffs  # (degree + 1, channels), public

    @classmethod
    def from_poly(cls, poly: Poly) -> PublicPoly:
        """Return the PublicPoly computing what `poly` computes."""
        return cls(poly.coeffs.detach())

    @property
    def degree(self) -> int:
        return self.coeffs.shape[0] - 1

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2) if self.coeffs.shape[1] > 1 else ()
        c = [self.coeffs[k].reshape(shape) if shape else self.coeffs[k] for k in range(self.degree + 1)]
        powers = {1: x}
        for k, step in zip(range(2, self.degree + 1), _power_steps(self.degree)):
            powers[k] = powers[k // 2] ** 2 if step == "square" else powers[k - 1] * x
        y = x * c[1] + c[0]  # the encrypted operand first: CrypTen multiplies a CrypTensor by a tensor
        for k in range(2, self.degree + 1):
            y = y + powers[k] * c[k]
        return y

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [("poly", math.prod(shape))]

    def cost_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        """Return what the site costs under MPC: one square or product per power, nothing per coefficient."""
        return [(step, math.prod(shape)) for step in _power_steps(self.degree)]


def publicize_polys(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with every Poly module (sites, and replacements inside partial sites) turned
    into a PublicPoly with the same coefficients; outputs are unchanged up to float rounding."""
    gm = copy.deepcopy(gm)
    for name, mod in list(gm.named_modules()):
        if type(mod) is Poly:
            set_submodule(gm, name, PublicPoly.from_poly(mod))
    gm.recompile()
    return gm
