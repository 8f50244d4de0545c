"""Which units of each site keep their non-linearity: selectors over criticality, constraints and prices.

A selector gets the ranking (a keep priority per unit), the constraints the user gave and, when it prices
its choices, what each choice costs under MPC. Two selectors:
- count: the highest-priority units that fit the ReLU budget, wherever they are (the papers' metric);
- latency: sites are opened by criticality per modeled second. A site that keeps any ReLU pays all of its
  comparison rounds, and a partial site pays its replacement's rounds on top, so a budget packed into few
  sites is far faster than the same count spread over many.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.activations import MaskedSite
from relu_opt.backends import LAN, WAN, Cost, CostModel, Network, Pricing
from relu_opt.passes.replace import replace_sites, site_op
from relu_opt.ranking import Criticality, select
from relu_opt.sites import SiteInfo


@dataclass(frozen=True)
class Constraints:
    """What the selection must fit: ReLU elements (shared and per kind), rounds, modeled latency."""

    elements: int | None = None  # kept elements per sample of the kinds without their own budget
    kind_elements: tuple[tuple[str, int], ...] = ()  # kind -> its own budget
    rounds: float | None = None
    latency_s: float | None = None
    network: Network = WAN

    def describe(self) -> str:
        """Return the constraints as one line for reports."""
        parts = [f"{self.elements:,} elements" if self.elements is not None else ""]
        parts += [f"{n:,} {k}" for k, n in self.kind_elements]
        parts += [f"{self.rounds:g} rounds" if self.rounds is not None else ""]
        parts += [f"{self.latency_s:g} s on {self.network.name}" if self.latency_s is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


@dataclass(frozen=True)
class SitePrice:
    """What one site costs per forward at batch 1 under MPC: as it is, fully replaced, or partial."""

    kind: str
    elements: int
    keep_rounds: float
    keep_bytes: float
    replace_rounds: float  # folded into one square where the polynomial folds (passes/fold_poly.py)
    replace_bytes: float
    partial_rounds: float  # the op on the kept elements, then the replacement (unfolded) on the rest
    partial_keep_bpe: float  # bytes per kept element of a partial site
    partial_replace_bpe: float  # bytes per replaced element of a partial site

    def cost(self, kept: int) -> tuple[float, float]:
        """Return (rounds, bytes per party) with `kept` elements keeping the site's op."""
        if kept >= self.elements:
            return self.keep_rounds, self.keep_bytes
        if kept <= 0:
            return self.replace_rounds, self.replace_bytes
        return self.partial_rounds, kept * self.partial_keep_bpe + (self.elements - kept) * self.partial_replace_bpe


@dataclass(frozen=True)
class Prices:
    """Per-site prices plus the cost of everything else (linear layers, ops that are not sites)."""

    sites: dict[str, SitePrice]
    other_rounds: float
    other_bytes: float
    network: Network = WAN
    # the link's round trips one round waits for (the cost model's, over the whole model: every CrypTen
    # round is one all-reduce, so the ratio is one number)
    round_trips_per_round: float = 1.0

    def total(self, kept: dict[str, int]) -> tuple[float, float]:
        """Return the model's (rounds, bytes per party) with `kept` elements per site."""
        rounds, nbytes = self.other_rounds, self.other_bytes
        for s, p in self.sites.items():
            r, b = p.cost(kept.get(s, 0))
            rounds, nbytes = rounds + r, nbytes + b
        return rounds, nbytes

    def latency(self, rounds: float, nbytes: float, network: Network | None = None) -> float:
        """Return the modeled seconds of rounds (each its round trips of the link) and bytes per party (both
        directions, so half each way)."""
        return (network or self.network).communication_s(rounds * self.round_trips_per_round, nbytes)


@dataclass(frozen=True)
class SiteChoice:
    """What the selector chose for one site, what it costs, and why."""

    site: str
    kind: str
    action: str  # keep | partial | replace
    kept: int
    elements: int
    rounds: float | None = None
    bytes: float | None = None
    why: str = ""


@dataclass(frozen=True)
class Selection:
    """Keep-masks per site, the per-site choices, and the modeled totals (None for unpriced selectors)."""

    keep: dict[str, Tensor]
    choices: tuple[SiteChoice, ...]
    selector: str
    constraints: str
    rounds: float | None = None
    bytes: float | None = None
    latency_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the JSON form (without the masks)."""
        d = asdict(self)
        del d["keep"]
        d["choices"] = list(d["choices"])  # as JSON reads it back, so a reloaded result compares equal
        return d


class Selector(Protocol):
    """Chooses keep-masks from a ranking under constraints, with prices when it needs them."""

    name: str
    needs_prices: bool

    def select(
        self, crit: Criticality, sites: dict[str, SiteInfo], constraints: Constraints, prices: Prices | None
    ) -> Selection: ...


SELECTORS: dict[str, Callable[[], Selector]] = {}


def register_selector(name: str):
    """Register a selector class under `name` (for --selector); returns the decorator."""

    def deco(cls):
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return deco


def get_selector(name: str) -> Selector:
    """Return a new selector `name` (ValueError naming the choices if unknown)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector '{name}'; choose {', '.join(SELECTORS)}")
    return SELECTORS[name]()


def _kept_elements(crit: Criticality, keep: dict[str, Tensor]) -> dict[str, int]:
    return {s: int(m.sum()) * crit.unit_elements[s] for s, m in keep.items()}


def _choices(
    crit: Criticality, sites: dict[str, SiteInfo], keep: dict[str, Tensor], prices: Prices | None, why
) -> tuple[SiteChoice, ...]:
    kept = _kept_elements(crit, keep)
    out = []
    for s, info in sites.items():
        k = kept[s]
        action = "keep" if k >= info.elements else "replace" if k == 0 else "partial"
        r, b = prices.sites[s].cost(k) if prices else (None, None)
        out.append(SiteChoice(s, info.kind, action, k, info.elements, r, b, why(s, action)))
    return tuple(out)


def _summary(prices: Prices | None, kept: dict[str, int]) -> dict:
    if prices is None:
        return {}
    rounds, nbytes = prices.total(kept)
    lat = {n.name: prices.latency(rounds, nbytes, n) for n in _NETWORKS}
    return {"rounds": rounds, "bytes": nbytes, "latency_s": lat}


@register_selector("count")
class CountSelector:
    """The most criticality that fits the ReLU budget(s), wherever it is: the ReLU-count objective."""

    needs_prices = False

    def select(
        self, crit: Criticality, sites: dict[str, SiteInfo], constraints: Constraints, prices: Prices | None
    ) -> Selection:
        """Return the Selection: kinds with their own budget are selected within it, the rest share one."""
        if constraints.elements is None:
            raise ValueError("the count selector needs a ReLU budget (--budget)")
        caps = dict(constraints.kind_elements)
        groups: dict[str | None, list[str]] = {}
        for s, info in sites.items():
            groups.setdefault(info.kind if info.kind in caps else None, []).append(s)
        keep = {}
        for kind, names in groups.items():
            sub = Criticality(
                crit.strategy,
                crit.granularity,
                {s: crit.scores[s] for s in names},
                {s: crit.unit_elements[s] for s in names},
            )
            keep.update(select(sub, caps[kind] if kind is not None else constraints.elements))
        kept = _kept_elements(crit, keep)
        choices = _choices(crit, sites, keep, prices, lambda s, a: "highest priority within the ReLU budget")
        return Selection(keep, choices, self.name, constraints.describe(), **_summary(prices, kept))


@register_selector("latency")
class LatencySelector:
    """Sites opened greedily by criticality per modeled second, each filled by priority, under every
    constraint given. A site is opened only when it keeps more elements than before (with a ReLU budget,
    until the budget is used) and carries at least a quarter of the model's criticality per second."""

    needs_prices = True
    # A site must bring >= share x (criticality of all units / removable latency) per second: low enough
    # that a ReLU budget is used (small_cnn at 300 of 7,168 ReLUs kept none at 1.0), high enough that a
    # leftover of a few elements does not open a site for its 9 rounds.
    share = 0.25

    def select(
        self, crit: Criticality, sites: dict[str, SiteInfo], constraints: Constraints, prices: Prices | None
    ) -> Selection:
        """Return the Selection that the greedy site opening reaches."""
        if prices is None:
            raise ValueError("the latency selector needs prices (a cost model)")
        order = {s: torch.argsort(crit.scores[s].reshape(-1).float(), descending=True, stable=True) for s in sites}
        score = {s: crit.scores[s].reshape(-1).float()[order[s]] for s in sites}
        net = constraints.network
        caps = dict(constraints.kind_elements)

        def lat(kept: dict[str, int]) -> float:
            return prices.latency(*prices.total(kept), net)

        everything = {s: info.elements for s, info in sites.items()}
        # a selection slower than the original on some network is no saving there (under Cheetah a
        # square's bytes can cost more on a LAN than the ReLU's round trips it saves on a WAN): _no_slower

        def fits(kept: dict[str, int], latency: bool = True) -> bool:
            shared = sum(k for s, k in kept.items() if sites[s].kind not in caps)
            if constraints.elements is not None and shared > constraints.elements:
                return False
            for kind, cap in caps.items():
                if sum(k for s, k in kept.items() if sites[s].kind == kind) > cap:
                    return False
            rounds, nbytes = prices.total(kept)
            if constraints.rounds is not None and rounds > constraints.rounds + 1e-9:
                return False
            return (
                not latency
                or constraints.latency_s is None
                or prices.latency(rounds, nbytes, net) <= constraints.latency_s
            )

        def fill(opened: list[str]) -> tuple[dict[str, int], float] | None:
            """Units of the opened sites by priority (each keeps its best unit); None if they cannot fit."""
            n = {s: int(s in opened) for s in sites}
            kept = {s: n[s] * crit.unit_elements[s] for s in sites}
            if not fits(kept):
                return None
            if opened:
                cand = torch.cat([score[s][1:] for s in opened])
                owner = torch.cat([torch.full((len(score[s]) - 1,), i) for i, s in enumerate(opened)])
                owner = owner[torch.argsort(cand, descending=True, stable=True)]

                def prefix(m: int) -> dict[str, int]:
                    counts = torch.bincount(owner[:m], minlength=len(opened)).tolist()
                    return {**kept, **{s: (1 + c) * crit.unit_elements[s] for s, c in zip(opened, counts)}}

                lo, hi = 0, len(owner)  # the longest prefix that fits (more kept elements never cost less)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if fits(prefix(mid)) else (lo, mid - 1)
                kept = prefix(lo)
                if crit.granularity != "pixel":  # units differ in size: smaller later ones may still fit
                    kept = self._skip_fill(kept, [opened[i] for i in owner[lo:].tolist()], crit, sites, fits)
                n = {s: kept[s] // crit.unit_elements[s] for s in sites}
            value = sum(float(score[s][: n[s]].sum()) for s in opened)
            return kept, value

        none = {s: 0 for s in sites}
        if not fits(none):
            cheapest = self._cheapest(prices, everything, net)
            if cheapest != none and fits(cheapest):  # keeping some sites is what makes the goal (Cheetah)
                why = "kept whole: keeping it costs less than its replacement on {} ({}), and the goal needs that"
                reasons = {s: why.format(net.name, _versus(prices.sites[s])) for s, k in cheapest.items() if k}
                return self._selection(crit, sites, cheapest, order, prices, constraints, reasons)
            raise ValueError(
                f"even with every site replaced the model needs {prices.total(none)[0]:.0f} rounds and "
                f"{lat(none):.3g} s on {net.name}, over the constraints ({constraints.describe()})"
            )
        removable = max(lat(everything) - lat(none), 1e-9)
        rate = self.share * sum(float(v.clamp(min=0).sum()) for v in score.values()) / removable
        opened: list[str] = []
        kept, value, cost = none, 0.0, lat(none)
        reasons: dict[str, str] = {}
        cheaper: dict[str, str] = {}  # sites whose op costs less than their replacement
        while True:
            best = None
            for s in sites:
                if s in opened:
                    continue
                trial = fill(opened + [s])
                if trial is None:
                    reasons.setdefault(s, "opening it breaks the constraints")
                    continue
                k2, v2 = trial
                if sum(k2.values()) <= sum(kept.values()):
                    reasons[s] = "the budget is used by sites of more criticality per second"
                    continue
                gain, extra = v2 - value, lat(k2) - cost
                ratio = gain / extra if extra > 1e-12 else math.inf
                if extra <= 1e-12:
                    p = prices.sites[s]
                    cheaper[s] = f"keeping it costs less than its replacement on {net.name} ({_versus(p)})"
                if ratio < rate:
                    reasons[s] = f"criticality per second {ratio:.3g} is below the model's {rate:.3g}"
                    continue
                if best is None or ratio > best[0]:
                    best = (ratio, s, k2, v2)
            if best is None:
                break
            ratio, s, kept, value = best
            cost = lat(kept)
            opened.append(s)
            reasons[s] = f"opened #{len(opened)}: " + (cheaper.get(s) or f"criticality per second {ratio:.3g}")
        kept = self._no_slower(kept, everything, prices, reasons, lambda k: fits(k, latency=False))
        if not fits(kept):
            raise ValueError(
                f"no selection within {constraints.describe()} is as fast as the original on both LAN and WAN "
                f"(the closest needs {lat(kept):.3g} s on {net.name})"
            )
        return self._selection(crit, sites, kept, order, prices, constraints, reasons)

    def _selection(self, crit, sites, kept, order, prices, constraints, reasons) -> Selection:
        """Return the Selection keeping `kept` elements per site, the highest priorities first."""
        keep = {}
        for s in sites:
            n = kept[s] // crit.unit_elements[s]
            flat = torch.zeros(crit.scores[s].numel(), dtype=torch.bool)
            flat[order[s][:n]] = True
            keep[s] = flat.reshape(crit.scores[s].shape)
        choices = _choices(crit, sites, keep, prices, lambda s, a: reasons.get(s, ""))
        return Selection(keep, choices, self.name, constraints.describe(), **_summary(prices, kept))

    @staticmethod
    def _cheapest(prices: Prices, everything: dict[str, int], net) -> dict[str, int]:
        """Return each site whole where keeping it costs less on `net` than its replacement, else replaced."""
        return {
            s: everything[s]
            if prices.latency(p.keep_rounds, p.keep_bytes, net) < prices.latency(p.replace_rounds, p.replace_bytes, net)
            else 0
            for s, p in prices.sites.items()
        }

    @staticmethod
    def _no_slower(
        kept: dict[str, int], everything: dict[str, int], prices: Prices, reasons: dict, fits
    ) -> dict[str, int]:
        """Return `kept`, or where it is slower than the original on some network, `kept` with the sites whose
        op costs less there than their replacement kept whole (most saving first) as far as the element and
        round budgets allow (a latency budget it then breaks makes the selection fail)."""
        for n in _NETWORKS:
            ceiling = prices.latency(*prices.total(everything), n) * (1 + 1e-9)
            if prices.latency(*prices.total(kept), n) <= ceiling:
                continue
            saving = {
                s: prices.latency(*p.cost(kept[s]), n) - prices.latency(p.keep_rounds, p.keep_bytes, n)
                for s, p in prices.sites.items()
            }
            for s in sorted((s for s in kept if saving[s] > 0), key=saving.get, reverse=True):
                wider = {**kept, s: everything[s]}
                if not fits(wider):
                    continue
                kept = wider
                reasons[s] = f"kept whole: its replacement made the model slower than the original on {n.name} " + (
                    f"({_versus(prices.sites[s])})"
                )
                if prices.latency(*prices.total(kept), n) <= ceiling:
                    break
        return kept

    @staticmethod
    def _skip_fill(kept: dict[str, int], owners: list[str], crit, sites, fits) -> dict[str, int]:
        """Return `kept` with each later unit (in priority order) added when it still fits."""
        kept = dict(kept)
        for s in owners:
            kept[s] += crit.unit_elements[s]
            if not fits(kept):
                kept[s] -= crit.unit_elements[s]
        return kept


def price_sites(
    teacher: fx.GraphModule,
    example: Tensor,
    sites: dict[str, SiteInfo],
    crit: Criticality,
    make_rep: Callable[[str], nn.Module | None],
    cost_model: CostModel,
    pricing: Pricing,
    public_coeffs: bool = False,
) -> Prices:
    """Return each site's prices, measured on the graph `pricing`'s backend runs as the site is, fully
    replaced and partial (one unit kept), and the cost of the rest of the model, from `cost_model` at
    batch 1 (with `public_coeffs`, unfoldable polynomials priced as the plan will run them: powers only)."""
    nodes = {n.name: n for n in teacher.graph.nodes}
    example = example[:1]
    engine = pricing.engine()

    def site_costs(model: nn.Module) -> tuple[dict[str, tuple[float, float]], Cost]:
        gm = engine.prepare(model, example, public_coeffs=public_coeffs)
        per_site = {}
        for n in gm.graph.nodes:
            if n.name in sites:
                c = cost_model.node_cost(gm, n)
                per_site[n.name] = (c.rounds, c.bytes)
        return per_site, cost_model.cost(gm)

    def rewritten(one_unit: bool) -> fx.GraphModule:
        new = {}
        for s, info in sites.items():
            mask = torch.zeros(crit.scores[s].shape)
            if one_unit and mask.numel() > 1:
                mask.view(-1)[0] = 1
            new[s] = MaskedSite(mask, make_rep(s), site_op(teacher, nodes[s]), info.kind)
        return replace_sites(teacher, new)

    keep, whole = site_costs(teacher)
    replaced, _ = site_costs(rewritten(False))
    partial, _ = site_costs(rewritten(True))
    prices = {}
    for s, info in sites.items():
        kr, kb = keep.get(s, (0.0, 0.0))
        rr, rb = replaced.get(s, (0.0, 0.0))
        bpe = cost_model.element_bytes(info.kind)
        u = crit.unit_elements[s]
        if s in partial and u < info.elements:
            pr, pb = partial[s]
            rest_bpe = max(pb - u * bpe, 0.0) / (info.elements - u)
        else:  # whole-site units: no partial form
            pr, rest_bpe = kr + rr, rb / info.elements
        prices[s] = SitePrice(info.kind, info.elements, kr, kb, rr, rb, pr, bpe, rest_bpe)
    other_r = whole.rounds - sum(p.keep_rounds for p in prices.values())
    other_b = whole.bytes - sum(p.keep_bytes for p in prices.values())
    trips = whole.round_trips / whole.rounds if whole.rounds else 1.0
    return Prices(prices, other_r, other_b, pricing.net(), trips)


_NETWORKS = (WAN, LAN)


def _versus(p: SitePrice) -> str:
    """Return a site's kept and replaced prices, e.g. "12 vs 4 round trips, 0.10 vs 0.40 MB"."""
    return (
        f"{p.keep_rounds:.0f} vs {p.replace_rounds:.0f} round trips, {p.keep_bytes / 1e6:.2f} vs "
        f"{p.replace_bytes / 1e6:.2f} MB"
    )
