"""What one optimization is asked to do: OptimizeConfig, checked where it is made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from relu_opt import validation as v
from relu_opt.activations import GRANULARITIES
from relu_opt.backends import Pricing
from relu_opt.errors import BudgetError, ConfigError

POLY_PER = ("channel", "layer")


@dataclass(frozen=True)
class OptimizeConfig:
    """Options of one optimization; everything but the budgets is shared by a frontier's levels.

    With no budget at all (`budget`, `rounds_budget` and `latency_budget` None) `relu_opt.optimize`
    searches for the lowest modeled latency within `max_drop`. Every field is checked when the config
    is made, so a bad option fails in Python exactly as it does on the command line."""

    budget: int | None = None  # elements per sample to keep of the optimized kinds
    strategy: str = "taylor"
    replace: str = "poly"
    granularity: str = "channel"
    degree: int = 2
    poly_per: str = "channel"
    epochs: float = 1.0
    lr: float = 0.01
    batch_size: int = 128
    temperature: float = 4.0
    kd_alpha: float = 0.9
    anneal: float = 0.5  # fraction of fine-tuning over which dropped elements fade into their replacement
    avgpool: bool = False  # replace max-pools by average pools (their comparisons go too)
    # Fine-tuning stability, measured on the shipped Fashion-MNIST ResNet-20 (notes in relu_opt/finetune.py):
    # with training-mode BatchNorm one batch whose polynomial inputs left their fitted range put a running
    # variance of 3e11 into BatchNorm (eval 11% while training looked fine). Fixed statistics make the
    # trained function the exported one; the clamp (training only, at 2x the fitted range; 1x cost 7 points)
    # keeps compositions of polynomials bounded, which fixed statistics no longer do.
    freeze_bn: bool = True
    train_range: float | None = 2.0  # clamp polynomial inputs in training to this times their fitted range
    range_weight: float = 0.0  # loss weight of polynomial inputs past their fitted range from the first attempt on
    refresh_bn_stats: bool = False  # recompute BatchNorm statistics after fine-tuning (cost 3 points with freeze_bn)
    rank_samples: int = 5000
    rank_epochs: float = 1.0  # snl: epochs its masks and weights train for
    rank_finetune_steps: int = 0  # drop-one: distillation steps after replacing each site
    fit_samples: int = 1024  # samples the replacement polynomials are fitted on
    max_train: int | None = None
    max_drop: float | None = None  # validation points the result may lose; more is a failure, not a result
    device: str = "cpu"
    seed: int = 0
    kinds: tuple[str, ...] = ()  # kinds to optimize; empty: every non-polynomial kind the model has
    kind_budgets: tuple[tuple[str, int], ...] = ()  # per-kind budgets; `budget` covers the other kinds
    selector: str = "latency"  # relu_opt/selection.py: "latency" (priced by the cost model) or "count"
    rounds_budget: float | None = None  # modeled communication rounds of one forward
    latency_budget: float | None = None  # modeled seconds of one forward on pricing.network
    pricing: Pricing = field(default_factory=Pricing)  # backend, dealer, parties, network, cost-model cache
    public_coeffs: bool = False  # unfoldable polynomials keep public coefficients under PI (plan.json)
    # structure removal toward a latency goal (relu_opt/pruning.py): "none", "channels", or None: channels
    # when the backend's linear layers carry more than a quarter of the modeled latency
    prune: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kinds, list | str):  # a list, or names separated by commas ("relu,gelu")
            names = self.kinds.split(",") if isinstance(self.kinds, str) else self.kinds
            object.__setattr__(self, "kinds", tuple(k.strip() if isinstance(k, str) else k for k in names if k != ""))
        if isinstance(self.kind_budgets, dict | list):
            items = self.kind_budgets.items() if isinstance(self.kind_budgets, dict) else self.kind_budgets
            object.__setattr__(self, "kind_budgets", tuple(tuple(i) for i in items))
        for pair in self.kind_budgets if isinstance(self.kind_budgets, tuple) else ():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ConfigError(f"kind budget {pair!r} must be a (kind, elements) pair, e.g. ('relu6', 20000)")
        check_config(self)

    @property
    def searches(self) -> bool:
        """Return whether no budget binds, so optimize searches for the lowest modeled latency."""
        return self.budget is None and self.rounds_budget is None and self.latency_budget is None

    @property
    def label(self) -> str:
        """Return how this configuration's constraint reads in folder names and messages."""
        if self.budget is not None:
            return f"budget {self.budget:,}"
        if self.latency_budget is not None:
            return f"latency {self.latency_budget:g} s"
        if self.rounds_budget is not None:
            return f"rounds {self.rounds_budget:g}"
        return "lowest latency"

    @property
    def dirname(self) -> str:
        """Return the folder name of this configuration's result in a frontier."""
        if self.budget is not None:
            return f"budget_{self.budget}"
        if self.latency_budget is not None:
            return f"latency_{self.latency_budget:g}s"
        return f"rounds_{self.rounds_budget:g}" if self.rounds_budget is not None else "lowest_latency"

    def key(self, *names: str) -> str:
        """Return a short hash of the named fields (all when none), to key cached work."""
        d = asdict(self)
        # fields added later, and renamed ones, keep the keys results were cached under
        d["calib_samples"] = d.pop("fit_samples")
        d["recalibrate_bn"] = d.pop("refresh_bn_stats")
        for k in ("kinds", "kind_budgets", "public_coeffs", "range_weight", "rank_finetune_steps", "prune"):
            if not d[k]:
                del d[k]
        del d["pricing"]  # the network was a field of its own before, and the default prices keep their keys
        d["network"] = self.pricing.network
        if self.pricing.key() != Pricing(network=self.pricing.network).key():
            d["pricing"] = self.pricing.key()
        blob = json.dumps({k: d[k] for k in (names or d) if k in d}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def check_budget(budget: int, total: int, what: str = "ReLU") -> None:
    """Raise BudgetError unless 0 <= budget < total."""
    if budget < 0:
        raise BudgetError(f"budget {budget} is negative; give the {what} elements per sample to keep (0 or more)")
    if budget >= total:
        raise BudgetError(
            f"budget {budget:,} is not below the model's {total:,} {what} elements per sample, so there is "
            f"nothing to remove; choose a budget under {total:,}"
            + ("" if what != "ReLU" else ", or optimize other kinds with --kinds (see relu-opt count)")
        )


def check_config(config: OptimizeConfig) -> None:
    """Raise ConfigError naming the first option of `config` that is unknown, of the wrong type, out of
    range, or one that does not apply to what was asked."""
    from relu_opt import ops
    from relu_opt.pruning import MODES
    from relu_opt.ranking import STRATEGIES
    from relu_opt.replacements import REPLACEMENTS
    from relu_opt.selection import SELECTORS

    v.check_choice("strategy", config.strategy, sorted(STRATEGIES))
    v.check_choice("replace", config.replace, REPLACEMENTS)
    v.check_choice("granularity", config.granularity, GRANULARITIES)
    v.check_choice("poly_per", config.poly_per, POLY_PER)
    v.check_choice("selector", config.selector, SELECTORS)
    if config.prune is not None:
        v.check_choice("prune", config.prune, MODES)
    if config.prune == "channels" and config.latency_budget is None and not config.searches:
        raise ConfigError(
            "--prune channels spends structure toward a latency goal; give --latency-budget, or no budget at all "
            "(the lowest-latency search), or leave --prune out"
        )
    v.check_int("degree", config.degree, 1, 4)
    if config.budget is not None and (isinstance(config.budget, bool) or not isinstance(config.budget, int)):
        raise ConfigError(f"--budget {config.budget!r} is a {type(config.budget).__name__}; give an integer")
    if config.budget is not None and config.budget < 0:
        raise ConfigError(f"--budget {config.budget} is negative; give the elements per sample to keep (0 or more)")
    v.check_float("epochs", config.epochs, above=None, minimum=0.0)  # 0: no fine-tuning at all
    for name in ("lr", "temperature", "rank_epochs"):
        v.check_float(name, getattr(config, name))
    v.check_float("kd_alpha", config.kd_alpha, above=None, minimum=0.0, maximum=1.0)
    v.check_float("anneal", config.anneal, above=None, minimum=0.0, maximum=1.0)
    v.check_float("range_weight", config.range_weight, above=None, minimum=0.0)
    v.check_float("max_drop", config.max_drop, above=None)  # negative: the result must gain accuracy
    v.check_float("train_range", config.train_range)
    v.check_int("rank_finetune_steps", config.rank_finetune_steps, 0)
    for name in ("batch_size", "rank_samples", "fit_samples", "max_train"):
        v.check_int(name, getattr(config, name))
    for name in ("rounds_budget", "latency_budget"):
        v.check_float(name, getattr(config, name))
    v.check_device(config.device)
    v.check_int("seed", config.seed, 0)
    if config.selector == "count" and (config.rounds_budget is not None or config.latency_budget is not None):
        raise ConfigError(
            "--rounds-budget and --latency-budget need --selector latency (the count selector ignores costs)"
        )
    if not isinstance(config.kinds, tuple) or not isinstance(config.kind_budgets, tuple):
        raise ConfigError("kinds and kind_budgets must be tuples, e.g. kinds=('relu',), kind_budgets=(('relu6', 100),)")
    unknown = [k for k in (*config.kinds, *(k for k, _ in config.kind_budgets)) if k not in ops.kind_names()]
    if unknown:
        raise ConfigError(
            f"kinds: unknown kind(s) {', '.join(map(str, unknown))}; known: {', '.join(ops.kind_names())}"
        )
    for kind, n in config.kind_budgets:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"--kind-budget {kind} {n!r} is out of range; give an integer of 0 or more")
    outside = [k for k, _ in config.kind_budgets if config.kinds and k not in config.kinds]
    if outside:
        raise ConfigError(
            f"a kind budget names {', '.join(outside)}, which is not among the kinds to optimize "
            f"({', '.join(config.kinds)}); add it to kinds or drop its budget"
        )
    if config.rank_epochs != 1.0 and config.strategy != "snl":
        raise ConfigError(f"--snl-epochs applies to strategy snl only, not {config.strategy}; leave it out")
    if config.degree != 2 and config.replace != "poly":
        raise ConfigError(f"--degree applies to --replace poly only, not {config.replace}; leave it out")
    if config.rank_finetune_steps and config.strategy != "drop-one":
        raise ConfigError("rank_finetune_steps (--finetune-steps) applies to strategy drop-one only; leave it out")
    if not isinstance(config.pricing, Pricing):
        raise ConfigError(f"pricing must be a relu_opt.backends.Pricing, not {type(config.pricing).__name__}")
    config.pricing.net()
