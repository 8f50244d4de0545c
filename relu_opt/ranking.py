"""How critical each ReLU is: per-site, per-channel or per-pixel scores from four strategies.

Every strategy returns keep priorities with the granularity's mask shape at each site; a higher score
means keep the ReLU. `select` then keeps the highest-scoring units that fit a budget. A strategy is an
object (Torch-Pruning's importance criteria are the model): its own settings go to `__init__`, `rank(ctx)`
scores the sites of a RankContext (what every strategy shares), and `cache_key()` names what its result
depends on, so no caller needs to know which settings a strategy reads. Strategies:
- drop-one (DeepReDuce): validation accuracy lost when one site is replaced, per ReLU it removes;
- taylor: first-order loss change |sum g * (relu(x) - replacement(x))| per unit, per ReLU;
- snl (SNL + AutoReP): masks and weights trained together with a budget-weighted lasso on the masks,
  binarised with hysteresis; fine-tuning continues from those weights, as SNL's authors run it;
- random: the honest baseline, a random order of units.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from relu_opt import distributed
from relu_opt.activations import MaskedSite
from relu_opt.data import Dataset, batches
from relu_opt.graph import eval_mode, register_leaf
from relu_opt.passes.replace import replace_sites, site_op
from relu_opt.plan import mask_shape
from relu_opt.sites import SiteInfo, find_sites
from relu_opt.training import evaluate, freeze_batchnorm, predict


@dataclass(frozen=True)
class Criticality:
    """Keep priorities per unit at each site, and per-site summaries for reports."""

    strategy: str
    granularity: str
    scores: dict[str, Tensor]  # site -> priorities, shaped like the site's mask
    unit_elements: dict[str, int]  # site -> ReLU elements per sample one unit holds
    site_scores: dict[str, float] = field(default_factory=dict)
    # The base model's state dict as the strategy left it, for strategies that train weights with the
    # masks (snl): the rewritten model starts from these instead of the original weights.
    weights: dict[str, Tensor] | None = None

    def site_score(self, site: str) -> float:
        """Return the site's own score, or the mean of its units' where the strategy gives none."""
        return float(self.site_scores.get(site, self.scores[site].float().mean()))

    def to_dict(self) -> dict:
        """Return a JSON-ready table: per site, plus per channel at channel granularity."""
        return {
            "strategy": self.strategy,
            "granularity": self.granularity,
            "sites": [
                {
                    "site": s,
                    "units": int(t.numel()),
                    "unit_elements": self.unit_elements[s],
                    "score": self.site_score(s),
                    "mean_unit_score": float(t.float().mean()),
                    **({"channel_scores": t.reshape(-1).tolist()} if self.granularity == "channel" else {}),
                }
                for s, t in self.scores.items()
            ],
        }


@dataclass
class RankContext:
    """What every strategy ranks: the model, its data, the sites and their replacements."""

    gm: fx.GraphModule  # the shape-propagated base model
    data: Dataset
    granularity: str
    replacement: Callable[[str], nn.Module | None]  # site -> a fresh fitted replacement (None = identity)
    samples: int = 5000
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    sites: dict[str, SiteInfo] | None = None  # default: the ReLU sites

    def site_info(self) -> dict[str, SiteInfo]:
        """Return the sites being ranked (the ReLU sites unless `sites` was given)."""
        if self.sites is None:
            self.sites = find_sites(self.gm, ("relu",), self.granularity)
        return self.sites

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s: info.shape for s, info in self.site_info().items()}

    def mask_shape(self, site: str) -> tuple[int, ...]:
        """Return the mask shape of `site` at its granularity."""
        info = self.site_info()[site]
        return mask_shape(info.shape, info.granularity)

    def make_site(self, cls, site: str, mask: Tensor, **kwargs) -> nn.Module:
        """Return `cls(mask, replacement, original=..., kind=...)` for `site` (a MaskedSite subclass)."""
        node = next(n for n in self.gm.graph.nodes if n.name == site)
        info = self.site_info()[site]
        return cls(mask, self.replacement(site), original=site_op(self.gm, node), kind=info.kind, **kwargs)


class Strategy:
    """A ranking strategy: settings in `__init__` (dataclass fields), `rank(ctx)` returns the Criticality."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # raised when the algorithm changes, so rankings cached by the old one are redone

    def rank(self, ctx: RankContext) -> Criticality:
        """Return the Criticality of every site of `ctx`."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Return the settings the result depends on (the dataclass fields; none for a plain class)."""
        return asdict(self) if is_dataclass(self) else {}

    def cache_key(self) -> str:
        """Return a short hash of the name and settings, which keys cached rankings."""
        blob = json.dumps(
            {"strategy": self.name, "version": self.version, **self.settings()}, sort_keys=True, default=str
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str):
    """Return a decorator registering a Strategy subclass, or a plain `fn(ctx) -> Criticality` (a strategy
    with no settings), under `name`."""

    def wrap(obj):
        if inspect.isclass(obj) and issubclass(obj, Strategy):
            obj.name = name
            STRATEGIES[name] = obj
        else:
            STRATEGIES[name] = type(f"{obj.__name__}_strategy", (Strategy,), {"name": name, "rank": staticmethod(obj)})
        return obj

    return wrap


def make_strategy(name: str, **options) -> Strategy:
    """Return the strategy `name` built with the options it declares (others are ignored, so a caller may
    pass every option it has: budget, epochs, finetune_steps, ...)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    own = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
    return cls(**{k: v for k, v in options.items() if k in own and v is not None})


def rank(ctx: RankContext, strategy: str | Strategy) -> Criticality:
    """Return the Criticality of every site of `ctx.gm` under `strategy` (a name: default settings)."""
    return (make_strategy(strategy) if isinstance(strategy, str) else strategy).rank(ctx)


def _unit_elements(shape: tuple[int, ...], granularity: str) -> int:
    return math.prod(shape) // math.prod(mask_shape(shape, granularity))


def _units(ctx: RankContext) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    shapes = ctx.site_shapes()
    return shapes, {s: _unit_elements(info.shape, info.granularity) for s, info in ctx.site_info().items()}


@register_strategy("random")
@dataclass(frozen=True)
class RandomStrategy(Strategy):
    """The honest baseline: a random order of units (seeded by the context)."""

    def rank(self, ctx: RankContext) -> Criticality:
        shapes, unit = _units(ctx)
        gen = torch.Generator().manual_seed(ctx.seed)
        scores = {s: torch.rand(ctx.mask_shape(s), generator=gen) for s in shapes}
        return Criticality("random", ctx.granularity, scores, unit)


@register_strategy("drop-one")
@dataclass(frozen=True)
class DropOne(Strategy):
    """DeepReDuce: validation accuracy lost when one site is replaced (after `finetune_steps` distillation
    steps), per ReLU it removes."""

    finetune_steps: int = 0

    def rank(self, ctx: RankContext) -> Criticality:
        return _drop_one(ctx, self.finetune_steps)


def _drop_one(ctx: RankContext, finetune_steps: int) -> Criticality:
    shapes, unit = _units(ctx)
    val = ctx.data.val.subset(ctx.samples)
    _, base_acc = evaluate(ctx.gm, val, device=ctx.device)
    scores, site_scores = {}, {}
    with Progress(disable=not (ctx.progress and distributed.is_main()), transient=True) as bar:
        task = bar.add_task("drop-one", total=len(shapes))
        for _, (site, shape) in distributed.mine(list(shapes.items())):  # sites spread over the ranks
            rep = ctx.replacement(site)
            trial = replace_sites(ctx.gm, {site: rep if rep is not None else nn.Identity()})
            if finetune_steps:
                _short_finetune(trial, ctx, finetune_steps)
            _, acc = evaluate(trial, val, device=ctx.device)
            drop = base_acc - acc
            site_scores[site] = drop
            # Priority per ReLU removed, so cheap sites with the same drop are kept first.
            scores[site] = torch.full(ctx.mask_shape(site), drop / math.prod(shape))
            bar.advance(task)
    for part in distributed.gather((scores, site_scores)):
        scores.update(part[0])
        site_scores.update(part[1])
    scores, site_scores = {s: scores[s] for s in shapes}, {s: site_scores[s] for s in shapes}
    return Criticality("drop-one", ctx.granularity, scores, unit, site_scores)


def _short_finetune(model: nn.Module, ctx: RankContext, steps: int) -> None:
    teacher = ctx.gm
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    it = batches(ctx.data.train, 128, shuffle=True, generator=torch.Generator().manual_seed(ctx.seed))
    for _, (x, _y) in zip(range(steps), it):
        with torch.no_grad():
            t = predict(teacher, x)
        loss = F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _masked(ctx: RankContext, shapes, module_cls) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    mods = {s: ctx.make_site(module_cls, s, torch.ones(ctx.mask_shape(s))) for s in shapes}
    return replace_sites(ctx.gm, mods), mods


@register_strategy("taylor")
@dataclass(frozen=True)
class Taylor(Strategy):
    """First-order loss change |sum g * (relu(x) - replacement(x))| per unit, per ReLU."""

    def rank(self, ctx: RankContext) -> Criticality:
        return _taylor(ctx)


def _taylor(ctx: RankContext) -> Criticality:
    shapes, unit = _units(ctx)
    model, mods = _masked(ctx, shapes, LearnableMask)
    sal = {s: torch.zeros_like(m.alpha) for s, m in mods.items()}
    train = ctx.data.train.subset(ctx.samples)
    with eval_mode(model):  # BatchNorm statistics stay as trained
        for x, y in batches(train, 128):
            model.zero_grad()
            x, y, weight = distributed.shard(x, y)  # each rank a part of the batch, summed before |.|
            (F.cross_entropy(model(x), y) * weight / distributed.parts()).backward()
            sites = list(model_sites(model, mods))
            distributed.sum_tensors([m.alpha.grad for _, m in sites])
            for s, m in sites:
                sal[s] += m.alpha.grad.abs()
    scores = {s: v / unit[s] for s, v in sal.items()}
    return Criticality("taylor", ctx.granularity, scores, unit, {s: float(v.sum()) for s, v in sal.items()})


def model_sites(model: fx.GraphModule, mods: dict[str, nn.Module]):
    """Yield (site, module) for the modules `_masked` put into `model` (deep-copied by replace_sites)."""
    names = {n.name: n.target for n in model.graph.nodes if n.op == "call_module"}
    for s in mods:
        yield s, model.get_submodule(names[s])


@register_leaf
class LearnableMask(MaskedSite):
    """A MaskedSite whose mask is a trainable alpha; binarised with hysteresis when `hysteresis` > 0.

    AutoReP-style: the forward uses a 0/1 mask that flips only when alpha crosses 0.5 +- hysteresis,
    with a straight-through gradient to alpha, so masks do not oscillate around the threshold."""

    def __init__(
        self,
        mask: Tensor,
        replacement: nn.Module | None = None,
        hysteresis: float = 0.0,
        original: nn.Module | None = None,
        kind: str = "relu",
    ) -> None:
        super().__init__(mask, replacement, original, kind)
        del self.mask
        self.alpha = nn.Parameter(mask.float().clone())
        self.register_buffer("state", mask.float().clone())
        self.hysteresis = hysteresis

    @property
    def mask(self) -> Tensor:  # type: ignore[override]
        if not self.hysteresis:
            return self.alpha
        a = self.alpha.detach()
        self.state = torch.where(
            a > 0.5 + self.hysteresis, 1.0, torch.where(a < 0.5 - self.hysteresis, 0.0, self.state)
        )
        return self.state + self.alpha - self.alpha.detach()

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask
        return m * self.original(x) + (1 - m) * self.replacement(x)


@register_strategy("snl")
@dataclass(frozen=True)
class Snl(Strategy):
    """SNL + AutoReP: masks and weights trained together for `epochs` with a lasso weighted until the
    masks fit `budget` (default: 1/10 of the elements), binarised with hysteresis. The masks stop there
    (their alphas are the ranking) and the weights train on with the budget's selection for the rest of
    the epochs. With `keep_weights` the trained weights go with the ranking and fine-tuning starts from
    them."""

    # 1 kept training the masks past the budget, until every alpha was 0; 2 let BatchNorm statistics move;
    # 3 distilled without the labels' loss, so all masks flipped at once
    version: ClassVar[int] = 4
    budget: int | None = None
    epochs: float = 1.0
    keep_weights: bool = True

    def rank(self, ctx: RankContext) -> Criticality:
        return _snl(ctx, self.budget, self.epochs, self.keep_weights)


def _snl(ctx: RankContext, budget: int | None, epochs: float, keep_weights: bool = True) -> Criticality:
    shapes, unit = _units(ctx)
    model, mods = _masked(ctx, shapes, lambda m, r, **kw: LearnableMask(m, r, hysteresis=0.05, **kw))
    sites = dict(model_sites(model, mods))
    total = sum(math.prod(sh) for sh in shapes.values())
    budget = budget if budget is not None else total // 10
    alphas = [m.alpha for m in sites.values()]
    weights = [p for n, p in model.named_parameters() if not n.endswith("alpha")]
    opt_w = torch.optim.SGD(weights, lr=0.005, momentum=0.9)
    opt_a = torch.optim.Adam(alphas, lr=0.01)
    lam = 0.5
    train = ctx.data.train.subset(ctx.samples)
    steps = max(1, int(epochs * math.ceil(len(train) / 128)))
    gen = torch.Generator().manual_seed(ctx.seed)

    def kept() -> int:
        return sum(int((m.state > 0.5).sum()) * unit[s] for s, m in sites.items())

    def freeze() -> dict[str, Tensor]:
        # SNL stops the mask search at the budget: the lasso would otherwise push every alpha to 0 (all of
        # them move at Adam's step size), leaving no ranking and weights trained for no ReLUs at all.
        # The alphas now are the ranking; the weights train on with exactly what `select` keeps.
        scores = {s: m.alpha.detach().clone() for s, m in sites.items()}
        keep = select(Criticality("snl", ctx.granularity, scores, unit), budget)
        for s, m in sites.items():
            m.alpha.requires_grad_(False)
            m.alpha.copy_(keep[s].float())
            m.state.copy_(keep[s].float())
        return scores

    model.train()
    # Fixed statistics, as in fine-tuning: in training mode a batch whose polynomial inputs left their
    # range raised running variances 100-fold (measured on ResNet-20), and evaluation fell to chance.
    freeze_batchnorm(model)
    step, scores = 0, None
    with Progress(disable=not (ctx.progress and distributed.is_main()), transient=True) as bar:
        task = bar.add_task("snl masks", total=steps)
        while step < steps:
            for x, y in batches(train, 128, shuffle=True, generator=gen):
                if step >= steps:
                    break
                x, y, weight = distributed.shard(x, y)
                logits = model(x)
                with torch.no_grad():
                    t = predict(ctx.gm, x)
                # The student starts as the teacher, so distillation alone gives the masks no gradient: every
                # alpha then moved at Adam's step and all crossed together (144,256 ReLUs kept, then none, and
                # the weights went NaN). The labels' loss tells the channels apart from the first step.
                loss = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
                loss = (loss + F.cross_entropy(logits, y)) * weight
                if scores is None:
                    loss = loss + lam * sum((m.alpha.clamp(0, 1) * unit[s]).sum() for s, m in sites.items()) / total
                opt_w.zero_grad()
                opt_a.zero_grad()
                # a batch that overflows while masks flip is skipped, not learned (by every rank alike)
                if not math.isfinite(distributed.all_sum([loss.item()])[0]):
                    step += 1
                    bar.advance(task)
                    continue
                loss.backward()
                distributed.average_grads(weights + alphas)
                nn.utils.clip_grad_norm_(weights, 5.0)
                opt_w.step()
                if scores is None:
                    opt_a.step()
                    with torch.no_grad():
                        for a in alphas:
                            a.clamp_(0, 1)
                        if kept() <= budget:
                            scores = freeze()
                        else:  # raise the penalty until the binarised masks fit the budget (SNL's schedule)
                            lam *= 1.05
                step += 1
                bar.advance(task)
    model.eval()
    if scores is None:  # the budget was not reached in `epochs`: the alphas as they are rank the units
        scores = {s: m.alpha.detach().clone() for s, m in sites.items()}
    # replace_sites keeps every other module's name, so the base model's keys pick its trained weights
    # (and BatchNorm statistics) out of the masked model; the masks and fitted replacements stay behind.
    weights = None
    if keep_weights:
        own = ctx.gm.state_dict().keys()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k in own}
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            weights = None  # training overflowed: fine-tuning starts from the original weights instead
    site_scores = {s: float(v.mean()) for s, v in scores.items()}
    return Criticality("snl", ctx.granularity, scores, unit, site_scores, weights)


def select(crit: Criticality, budget: int) -> dict[str, Tensor]:
    """Return a boolean keep-mask per site: the highest-priority units whose ReLUs fit in `budget`.

    Greedy in priority order; a unit that does not fit is skipped and smaller ones may still fill the
    rest, so the kept total is never above the budget."""
    sites = list(crit.scores)
    flat = torch.cat([crit.scores[s].reshape(-1).float() for s in sites])
    cost = torch.cat([torch.full((crit.scores[s].numel(),), crit.unit_elements[s]) for s in sites])
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    left = budget
    for i, c in zip(order.tolist(), cost[order].tolist()):
        if c <= left:
            keep[i] = True
            left -= c
            if left == 0:
                break
    out, start = {}, 0
    for s in sites:
        n = crit.scores[s].numel()
        out[s] = keep[start : start + n].reshape(crit.scores[s].shape)
        start += n
    return out
