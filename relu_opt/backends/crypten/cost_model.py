"""Predict CrypTen's cost from a model's graph, with per-op prices fitted to measured runs.

Features per forward: for each op category, how many ops (each costs a fixed number of rounds and of
requests to the dealer), how many elements they open (online bytes scale with these) and how many
elements they output (the dealer's triples are the size of the results). `fit` fits the prices by
non-negative least squares to measured runs; `calibration.calibrate` measures its suite of tiny models
under CrypTen and caches the fitted model, so nothing is typed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch.fx as fx

from relu_opt.backends.base import Cost, CostModel
from relu_opt.backends.features import (  # noqa: F401  (re-exported: the calibration and tests use them here)
    BYTE_TERMS,
    CATEGORIES,
    CostFeatures,
    cost_category,
    features,
    node_features,
)


@dataclass(frozen=True)
class CrypTenCostModel(CostModel):
    """Per-op rounds and dealer requests, per-element online bytes and per-output-element offline bytes,
    for one party count and dealer, fitted to measured runs."""

    parties: int
    rounds_per_op: dict[str, float]
    bytes_per_element: dict[str, float]
    fit_max_rel_err: float = 0.0
    dealer: str = "third-party"
    requests_per_op: dict[str, float] = field(default_factory=dict)
    offline_bytes_per_output: dict[str, float] = field(default_factory=dict)
    offline_bytes_per_request: float = 0.0  # the request message and the size it is answered with
    round_trips_per_op: dict[str, float] = field(default_factory=dict)  # of the link, online
    offline_round_trips_per_op: dict[str, float] = field(default_factory=dict)  # waiting for the dealer

    def rounds(self, f: CostFeatures) -> float:
        """Return the predicted online rounds of one forward."""
        return sum(self.rounds_per_op.get(k, 0.0) * v for k, v in f.ops.items())

    def bytes(self, f: CostFeatures) -> float:
        """Return the predicted online bytes per party of one forward (CrypTen's count)."""
        return sum(self.bytes_per_element.get(k, 0.0) * v for k, v in f.elements.items())

    def price(self, f: CostFeatures) -> Cost:
        """Return the Cost of features `f`."""

        def per_op(table: dict[str, float]) -> float:
            return sum(table.get(k, 0.0) * v for k, v in f.ops.items())

        requests = per_op(self.requests_per_op)
        triples = sum(self.offline_bytes_per_output.get(k, 0.0) * v for k, v in f.outputs.items())
        return Cost(
            self.rounds(f),
            self.bytes(f),
            triples + self.offline_bytes_per_request * requests,
            requests,
            per_op(self.round_trips_per_op),
            per_op(self.offline_round_trips_per_op),
        )

    def node_cost(self, gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> Cost:
        return self.price(node_features(gm, node, batch))

    def cost(self, gm: fx.GraphModule, batch: int = 1) -> Cost:
        return self.price(features(gm, batch))

    def element_bytes(self, kind: str) -> float:
        return self.bytes_per_element.get(cost_category(kind), 0.0)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CrypTenCostModel:
        if "round_trips_per_op" not in d:  # measured before round trips were: a cache to measure again
            raise KeyError("round_trips_per_op")
        return cls(**d)


@dataclass(frozen=True)
class Sample:
    """One calibration model's measured forward."""

    features: CostFeatures
    rounds: float
    bytes: float
    offline_bytes: float = 0.0
    requests: float = 0.0
    round_trips: float = 0.0
    offline_round_trips: float = 0.0


def _nnls(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import nnls

    x, _ = nnls(a, y)
    return x, float(np.max(np.abs(a @ x - y) / np.maximum(y, 1))) if len(y) else 0.0


def fit(samples: list[Sample], parties: int, dealer: str = "third-party") -> CrypTenCostModel:
    """Return the CrypTenCostModel fitted (NNLS) to measured samples."""
    ops = [c for c in CATEGORIES if any(s.features.ops.get(c) for s in samples)]
    terms = [c for c in BYTE_TERMS if any(s.features.elements.get(c) for s in samples)]
    outs = [c for c in CATEGORIES if any(s.features.outputs.get(c) for s in samples)]
    a_ops = np.array([[s.features.ops.get(c, 0) for c in ops] for s in samples], dtype=float)
    a_el = np.array([[s.features.elements.get(c, 0) for c in terms] for s in samples], dtype=float)
    # offline bytes: the triples (the size of each op's results) and a message per request
    a_out = np.array([[s.features.outputs.get(c, 0) for c in outs] + [s.requests] for s in samples], dtype=float)
    xr, er = _nnls(a_ops, np.array([s.rounds for s in samples], dtype=float))
    xb, eb = _nnls(a_el, np.array([s.bytes for s in samples], dtype=float))
    xo, eo = _nnls(a_out, np.array([s.offline_bytes for s in samples], dtype=float))
    xq, eq = _nnls(a_ops, np.array([s.requests for s in samples], dtype=float))
    xt, et = _nnls(a_ops, np.array([s.round_trips for s in samples], dtype=float))
    xu, eu = _nnls(a_ops, np.array([s.offline_round_trips for s in samples], dtype=float))

    def table(names, values) -> dict[str, float]:
        return {c: round(float(v), 4) for c, v in zip(names, values) if v}

    return CrypTenCostModel(
        parties,
        {c: round(float(v), 4) for c, v in zip(ops, xr)},
        {c: round(float(v), 4) for c, v in zip(terms, xb)},
        max(er, eb, eo, eq, et, eu),
        dealer,
        table(ops, xq),
        table(outs, xo[:-1]),
        round(float(xo[-1]), 4),
        {c: round(float(v), 4) for c, v in zip(ops, xt)},
        table(ops, xu),
    )
