"""The pass layer: a GraphPass is a GraphModule -> GraphModule function with its options and whether it
needs shapes; `run_passes` runs a list of them, propagating shapes only where a pass needs them.

Modelled on torch/fx/passes/infra (PassBase, PassManager): "fold BN, lower partial sites, re-propagate
shapes" is one list, not hand calls repeated in every module that prepares a graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from relu_opt.graph import propagate_shapes


@dataclass(frozen=True)
class PassResult:
    """What one pass returned and whether it changed the graph."""

    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class GraphPass:
    """A pure function `fn(gm, **options) -> GraphModule`; `needs_shapes`: it reads node tensor_meta."""

    fn: Callable[..., fx.GraphModule]
    needs_shapes: bool = False
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        """Return the PassResult of running the pass on `gm` (which it does not mutate)."""
        out = self.fn(gm, **self.options)
        modified = out is not gm and (out.code != gm.code or _modules(out) != _modules(gm))
        return PassResult(out, modified)


def _modules(gm: fx.GraphModule) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in gm.named_modules()]


def graph_pass(needs_shapes: bool = False, **options) -> Callable[[Callable], GraphPass]:
    """Return a decorator that makes a GraphModule function a GraphPass."""

    def wrap(fn: Callable[..., fx.GraphModule]) -> GraphPass:
        return GraphPass(fn, needs_shapes, options)

    return wrap


def run_passes(gm: fx.GraphModule, passes: Iterable[GraphPass], example: torch.Tensor) -> fx.GraphModule:
    """Return `gm` (a copy; the input is untouched) after each pass in order, shape-propagated on
    `example` before every pass that needs shapes and at the end, with non-linear kinds recorded."""
    from relu_opt.passes.census import annotate

    gm = copy.deepcopy(gm)
    fresh = False
    for p in passes:
        if p.needs_shapes and not fresh:
            gm, fresh = propagate_shapes(gm, example), True
        result = p(gm)
        gm, fresh = result.graph_module, fresh and not result.modified
    if not fresh:
        gm = propagate_shapes(gm, example)
    return annotate(gm)
