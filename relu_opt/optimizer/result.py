"""What an optimization produced: OptimizeResult and its per-site rows (written as report.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# report.json keys of results written before a field was renamed
_OLD_KEYS = {"relu_before": "elements_before", "relu_after": "elements_after"}


@dataclass(frozen=True)
class SiteResult:
    """One site after optimization: elements per sample, how many were kept, what replaced the rest."""

    site: str
    elements: int
    kept: int
    replacement: str
    fit_error: float | None  # relative MSE of the fitted polynomial to the site's function
    kind: str = "relu"
    score: float | None = None  # the ranking's criticality of the site (relu_opt.rank gives the same)


@dataclass(frozen=True)
class OptimizeResult:
    """What one budget produced; accuracies are percent on the test split."""

    outdir: str
    budget: int | None
    strategy: str
    replace: str
    granularity: str
    elements_before: int  # elements per sample of the optimized kinds (ReLUs for a ReLU network)
    elements_after: int  # the same, counted on the exported ONNX graph
    accuracy_before: float
    accuracy_after: float
    val_accuracy_before: float
    val_accuracy_after: float
    wall_s: float
    sites: tuple[SiteResult, ...]
    onnx: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)  # kind -> {"before", "after" (ONNX), "budget"}
    selection: dict = field(default_factory=dict)  # relu_opt.selection.Selection: choices per site, modeled cost
    pruning: dict = field(default_factory=dict)  # structure removed: mode, why, what (relu_opt/pruning.py)

    def to_dict(self) -> dict:
        """Return the JSON written as report.json."""
        d = asdict(self)
        d["sites"] = [asdict(s) for s in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OptimizeResult:
        """Return the result a report.json holds (older key names read too)."""
        d = {_OLD_KEYS.get(k, k): v for k, v in d.items()}
        known = {f.name for f in fields(cls)}
        site_known = {f.name for f in fields(SiteResult)}
        sites = tuple(SiteResult(**{k: v for k, v in s.items() if k in site_known}) for s in d["sites"])
        return cls(**{**{k: v for k, v in d.items() if k in known}, "sites": sites})


def elements_of(o: dict, which: str) -> int:
    """Return `elements_before` or `elements_after` of an OptimizeResult dict, old key names included."""
    old = {v: k for k, v in _OLD_KEYS.items()}[which]
    return o[which] if which in o else o[old]
