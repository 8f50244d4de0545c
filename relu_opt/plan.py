"""A rewrite plan: which non-linear sites keep how many elements and what replaces the rest.

A plan plus the rewritten state dict rebuilds the optimized model from the base model exactly: sites are
named by their node names in the traced base model, and passes keep module names stable.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from relu_opt.activations import GRANULARITIES, MaskedSite
from relu_opt.checked_io import load_torch, read_json
from relu_opt.errors import ConfigError, CorruptFileError, ModelSpecError, ReluOptError, first_line
from relu_opt.graph import propagate_shapes, trace
from relu_opt.passes.replace import maxpool_to_avgpool, module_name_for, replace_sites, site_op
from relu_opt.replacements import REPLACEMENTS, SiteContext, replacement_for


def get_replacement(name: str):
    """Return the registered replacement `name` (ValueError naming the choices if unknown)."""
    if name not in REPLACEMENTS:
        raise ValueError(f"unknown replacement '{name}'; choose {', '.join(REPLACEMENTS)}")
    return REPLACEMENTS[name]


@dataclass(frozen=True)
class SitePlan:
    """One site: `kept` of its `elements` (per sample) stay as they are, `replacement` computes the rest."""

    site: str
    elements: int
    kept: int
    replacement: str = "poly"
    granularity: str = "channel"
    degree: int = 2
    poly_per: str = "channel"  # "channel": coefficients per channel; "layer": one set for the site
    module: str = ""  # the submodule name the rewrite uses; its mask/coefficients are in model.pt
    kind: str = "relu"  # the site's op-table kind

    @property
    def action(self) -> str:
        if self.kept == self.elements:
            return "relu"
        return self.replacement if self.kept == 0 else "partial"


@dataclass(frozen=True)
class Plan:
    base_model: str
    input_shape: tuple[int, ...]
    num_classes: int
    sites: tuple[SitePlan, ...]
    leaf: tuple[str, ...] = ()
    avgpool: bool = False  # max-pools became average pools
    state: str = "model.pt"
    meta: dict = field(default_factory=dict)
    public_coeffs: bool = False  # polynomials fold_poly cannot fold run with public coefficients (opt-in)
    pruning: dict = field(default_factory=dict)  # structure removed before the sites (relu_opt/pruning.py)

    @property
    def kept(self) -> int:
        """Return the elements per sample the plan keeps as they are, over all sites."""
        return sum(s.kept for s in self.sites)

    def to_dict(self) -> dict:
        """Return the JSON form written as plan.json."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["leaf"] = list(self.leaf)
        d["kept"] = self.kept
        return d

    def __post_init__(self) -> None:
        from relu_opt import ops

        shape = self.input_shape
        if len(shape) < 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in shape):
            raise ValueError(f"input_shape {list(shape)} is not a batch shape of positive integers")
        if Path(self.state).name != self.state:
            raise ValueError(f"state '{self.state}' must be a file name in the plan's folder")
        for sp in self.sites:
            if not 0 <= sp.kept <= sp.elements or sp.granularity not in GRANULARITIES:
                raise ValueError(f"site {sp.site}: kept {sp.kept} of {sp.elements}, granularity '{sp.granularity}'")
            ops.get_kind(sp.kind)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            base_model=d["base_model"],
            input_shape=tuple(d["input_shape"]),
            num_classes=int(d["num_classes"]),
            sites=tuple(SitePlan(**s) for s in d["sites"]),
            leaf=tuple(d.get("leaf", ())),
            avgpool=bool(d.get("avgpool", False)),
            state=d.get("state", "model.pt"),
            meta=d.get("meta", {}),
            public_coeffs=bool(d.get("public_coeffs", False)),
            pruning=dict(d.get("pruning") or {}),
        )


def mask_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Return the mask's shape for a per-sample activation `shape` at a granularity."""
    if granularity == "site":
        return (1,)
    if granularity == "channel":
        return (shape[0],) + (1,) * (len(shape) - 1)
    if granularity == "pixel":
        return tuple(shape)
    raise ValueError(f"unknown granularity '{granularity}'; choose site, channel or pixel")


def replacement_module(kind: str, channels: int, degree: int = 2) -> nn.Module | None:
    """Return a fresh ReLU-site replacement module (None for identity); coefficients are set later."""
    return get_replacement(kind)(SiteContext("", "relu", (channels,), degree=degree))


def site_modules(gm: fx.GraphModule, sites: Iterable[SitePlan]) -> dict[str, nn.Module]:
    """Return the new module for each rewritten site of a shape-propagated base graph."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for sp in sites:
        if sp.action == "relu":
            continue
        if sp.site not in nodes:
            raise ReluOptError(f"plan names site '{sp.site}', which the base model does not have")
        node = nodes[sp.site]
        shape = tuple(node.meta["tensor_meta"].shape[1:])
        original = site_op(gm, node)
        ctx = SiteContext(sp.site, sp.kind, shape, original, degree=sp.degree, poly_per=sp.poly_per)
        rep = replacement_for(sp.kind, sp.replacement)(ctx)
        # Fully replaced sites keep the masked (training) form too, with an all-zero mask, so every
        # rewritten site has the same state-dict layout; export materialises each into its cheap form.
        out[sp.site] = MaskedSite(torch.ones(mask_shape(shape, sp.granularity)), rep, original, sp.kind)
    return out


def apply_plan(base: nn.Module, plan: Plan, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Return the base model rewritten by `plan` (masks all-ones, coefficients zero until loaded)."""
    example = torch.zeros(plan.input_shape) if example is None else example
    gm = pruned(propagate_shapes(trace(base, plan.leaf), example), plan, example)
    gm = replace_sites(gm, site_modules(gm, plan.sites))
    return propagate_shapes(maxpool_to_avgpool(gm) if plan.avgpool else gm, example)


def pruned(gm: fx.GraphModule, plan: Plan, example: torch.Tensor) -> fx.GraphModule:
    """Return the traced base `gm` with the plan's structure removal replayed (itself when none)."""
    from relu_opt.pruning import Pruning, apply_pruning

    p = Pruning.from_dict(plan.pruning)
    return gm if p.empty else apply_pruning(gm, p, example)


def with_module_names(gm: fx.GraphModule, sites: Iterable[SitePlan]) -> tuple[SitePlan, ...]:
    """Return the site plans with the submodule name each rewritten site gets in `gm`."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return tuple(
        SitePlan(**{**asdict(sp), "module": "" if sp.action == "relu" else module_name_for(gm, nodes[sp.site])})
        for sp in sites
    )


_PLAN_FIX = "rerun `relu-opt optimize` to write it again"


def read_plan(outdir: str | os.PathLike) -> Plan:
    """Return the Plan saved in `outdir` (ReluOptError naming the folder when missing or malformed)."""
    plan_path = Path(outdir) / "plan.json"
    if not plan_path.is_file():
        inside = sorted(p.parent.name for p in Path(outdir).glob("*/plan.json"))
        hint = f"; it holds {', '.join(inside[:4])}: give one, e.g. {Path(outdir) / inside[0]}" if inside else ""
        raise ReluOptError(f"'{outdir}' has no plan.json{hint or '; give a folder `relu-opt optimize` wrote'}")
    d = read_json(plan_path, ("base_model", "input_shape", "num_classes", "sites"), "plan", _PLAN_FIX)
    try:
        return Plan.from_dict(d)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptFileError(f"plan '{plan_path}' is malformed ({type(exc).__name__}: {exc}); {_PLAN_FIX}") from None


def check_fits(plan: Plan, model: nn.Module, folder: str | os.PathLike) -> None:
    """Raise ConfigError unless `model` is the architecture the plan in `folder` was made from (its input
    shape and classes, the same sites with the same elements)."""
    from relu_opt.errors import ConfigError
    from relu_opt.sites import find_sites
    from relu_opt.validation import check_model_input

    fix = "give the MODEL (and --weights or --pretrained) the folder was optimized from"
    shape = ",".join(map(str, plan.input_shape))
    out = check_model_input(model, plan.input_shape, "MODEL", fix=f"'{folder}' was optimized for inputs {shape}; {fix}")
    if out.output_shape[-1] != plan.num_classes:
        raise ConfigError(
            f"the optimized model in '{folder}' outputs shape (1, {plan.num_classes}) but MODEL outputs "
            f"{out.output_shape}; {fix}"
        )
    example = torch.zeros(plan.input_shape)
    try:
        gm = pruned(propagate_shapes(trace(copy.deepcopy(model).eval()), example), plan, example)
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise ConfigError(f"'{folder}' removed structure MODEL does not have ({first_line(exc)}); {fix}") from None
    kinds = sorted({s.kind for s in plan.sites})
    mine = {s: (i.kind, i.elements) for s, i in find_sites(gm, kinds, "site").items()}
    wrong = [s.site for s in plan.sites if mine.get(s.site) != (s.kind, s.elements)]
    if wrong or len(mine) != len(plan.sites):
        shown = ", ".join(wrong[:3]) or f"{len(mine)} sites vs {len(plan.sites)}"
        raise ConfigError(
            f"'{folder}' was optimized from another model than MODEL ({plan.base_model}; sites differ: {shown}); {fix}"
        )


def weights_mismatch(plan: Plan, model: nn.Module, folder: str | os.PathLike) -> str | None:
    """Return a warning when `model`'s weights differ from those the plan recorded (accuracy comparisons
    are then between different models), else None."""
    from relu_opt.cache import state_digest

    recorded = plan.meta.get("base_weights")
    if recorded and recorded != state_digest(model):
        return f"MODEL's weights are not those '{folder}' was optimized from, so accuracies compare different models"
    return None


def load(outdir: str | os.PathLike, model: nn.Module | None = None) -> fx.GraphModule:
    """Return the optimized model saved in `outdir`: the base model rebuilt (or `model`, checked to be the
    one the plan was made from: for models not built from a spec), the plan applied, and the saved state
    dict loaded (outputs match the saved model exactly)."""
    from relu_opt.loading import resolve_model

    outdir = Path(outdir)
    plan_path = outdir / "plan.json"
    fix = _PLAN_FIX
    plan = read_plan(outdir)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model is a {type(model).__name__}; give the nn.Module '{outdir}' was optimized from")
        check_fits(plan, model, outdir)
        base = copy.deepcopy(model)
    else:
        try:
            built = resolve_model(plan.base_model, num_classes=plan.num_classes, in_channels=plan.input_shape[1])
        except ModelSpecError:
            raise ConfigError(
                f"'{outdir}' was optimized from a model given as an object ({plan.base_model}), which cannot be "
                "rebuilt by name; pass it: relu_opt.load(folder, model=that_model)"
            ) from None
        base = built.model
    try:
        gm = apply_plan(base, plan)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(
            f"the plan in '{plan_path}' does not apply to its model ({first_line(exc)}); {fix}"
        ) from None
    state_path = outdir / plan.state
    state = load_torch(state_path, "optimized weights", fix)
    try:
        gm.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CorruptFileError(
            f"'{state_path}' does not fit the plan in '{plan_path}' ({first_line(exc)}); {fix}"
        ) from None
    return gm.eval()
