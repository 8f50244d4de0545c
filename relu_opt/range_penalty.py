"""A training loss term that keeps each polynomial's inputs inside the range it was fitted on.

In training, a polynomial's inputs are clamped to twice its fitted range (relu_opt.activations.Poly), so
a composition of polynomials stays bounded there; evaluation, export and MPC compute the bare polynomial.
The clamp hides from training the few inputs that leave the range: their gradient is zero, so nothing
pulls them back, and in evaluation a degree-2 polynomial squares their excess at each site. Measured on
the Fashion-MNIST ResNet-20 with SNL's weights at 20x fewer ReLUs: one validation image was 1.44x past
its range at layers.0.1.relu2, 67x by layers.1.2 and infinite at the output. This term gives those inputs a
gradient: weight x the squared excess over the fitted range (|x| / range - 1 where positive) of each
image's worst element per site, averaged over the batch and summed over sites, on the elements a
polynomial replaces (kept ReLUs may take any value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from relu_opt.activations import MaskedSite, Poly
from relu_opt.training import LossFn


def _guarded(site: MaskedSite) -> bool:
    rep = site.replacement
    return isinstance(rep, Poly) and rep.input_range is not None and bool((site.mask < 1).any())


@contextmanager
def range_penalty(model: nn.Module, train_range: float) -> Iterator[Callable[[], Tensor]]:
    """Yield a function that returns (and resets) the summed range excess of `model`'s polynomials since
    its last call; only training-mode forwards count. Each polynomial's fitted range is its training clamp
    over `train_range` (the clamp is train_range x the fitted range). The hooks are removed on exit."""
    excess: list[Tensor] = []

    def hook(site: MaskedSite, args: tuple) -> None:
        if not site.training:
            return
        x, rep = args[0], site.replacement
        r = rep.input_range / train_range
        if r.numel() > 1:
            r = r.reshape((-1,) + (1,) * (x.dim() - 2))
        # a channel that was all zeros in the fitting samples has no range to keep to (its clamp is 0 anyway)
        over = torch.where(r > 0, torch.relu(x.abs() / r.clamp_min(1e-30) - 1), 0.0) * (1 - site.mask)
        # Each image's worst element: an overflow starts at one element of one image, which a mean over
        # all elements (tried first, weight 1) diluted until it moved nothing.
        excess.append(over.flatten(1).amax(1).square().mean())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, MaskedSite) and _guarded(m)]

    def take() -> Tensor:
        total = torch.stack(excess).sum() if excess else torch.zeros(())
        excess.clear()
        return total

    try:
        yield take
    finally:
        for h in handles:
            h.remove()


def penalized(loss_fn: LossFn, excess: Callable[[], Tensor], weight: float) -> LossFn:
    """Return `loss_fn` plus `weight` times the range excess `excess()` of the same forward."""

    def loss(logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(logits, x, y) + weight * excess()

    return loss
