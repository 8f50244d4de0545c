"""The sites an optimization rewrites: non-linear nodes of the chosen kinds, with their shapes and the
granularity their masks can have."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx

from relu_opt import ops
from relu_opt.passes.replace import nonlinear_nodes, partial_ok, site_op

# Kinds the optimizer does not mask: max-pool (see --avgpool) and what is already polynomial.
UNMASKED = ("maxpool",)


@dataclass(frozen=True)
class SiteInfo:
    """One rewritable site: its kind, per-sample shape and the mask granularity it allows."""

    name: str
    kind: str
    shape: tuple[int, ...]
    granularity: str

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def default_kinds(gm: fx.GraphModule) -> tuple[str, ...]:
    """Return the kinds `--kinds` defaults to: every non-polynomial kind the model has (but max-pool)."""
    found = []
    for n in nonlinear_nodes(gm):
        k = ops.node_kind(gm, n)
        if k not in found and k not in UNMASKED and not ops.get_kind(k).polynomial:
            found.append(k)
    return tuple(found)


def find_sites(
    gm: fx.GraphModule, kinds: Iterable[str] | None = None, granularity: str = "channel"
) -> dict[str, SiteInfo]:
    """Return the sites of `kinds` (default: `default_kinds`) of a shape-propagated graph, in graph order.

    Sites whose op takes other graph values (e.g. a functional PReLU's weight) are not rewritable and are
    left out; kinds that cannot keep part of their elements get whole-site masks."""
    kinds = tuple(kinds) if kinds else default_kinds(gm)
    for k in kinds:
        ops.get_kind(k)  # unknown kinds fail here, naming the known ones
    out = {}
    for n in nonlinear_nodes(gm, kinds):
        kind = ops.node_kind(gm, n)
        original = site_op(gm, n)
        if kind in UNMASKED or original is None:
            continue
        shape = tuple(n.meta["tensor_meta"].shape[1:])
        out[n.name] = SiteInfo(n.name, kind, shape, granularity if partial_ok(kind, original) else "site")
    return out
