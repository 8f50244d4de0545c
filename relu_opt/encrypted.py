"""Measure encrypted inference: the original, the optimized model and the linear floor, run by a backend's
real parties (and dealer), with online and offline cost side by side and what they mean in latency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from relu_opt.backends import DEFAULT_BACKEND, LAN, WAN, CostModel, HostRole, Measurement, Network, Pricing


@dataclass(frozen=True)
class ModelReport:
    """One model's row of a bench: measured cost (online and offline), agreement with plaintext, the
    cost model's prediction and modelled latency (online, and with the offline part on the same link)."""

    name: str
    relu_elements: int
    rounds: int
    bytes_per_party: list[int]
    wall_s_median: float
    wall_s_runs: list[float]
    conversion_s: float
    encryption_s: float
    max_abs_err: float | None  # None where no party holds both the weights and the samples
    top1_agreement: float | None
    accuracy: float | None
    plain_accuracy: float | None
    lan_s: float  # online: compute + round trips x RTT + busiest direction / bandwidth
    wan_s: float
    predicted_rounds: float | None = None
    predicted_bytes: float | None = None
    sent_per_party: list[int] = field(default_factory=list)
    received_per_party: list[int] = field(default_factory=list)
    compute_s: float = 0.0
    predicted_s: float | None = None  # online latency on the --link network, next to wall_s_median
    comparisons: int = 0  # secure comparisons per sample on the graph the engine ran (ReLU6 counts two)
    offline_sent_per_party: list[int] = field(default_factory=list)  # to the dealer
    offline_received_per_party: list[int] = field(default_factory=list)  # from the dealer
    offline_requests: int = 0  # requests to the dealer per forward
    lan_total_s: float = 0.0  # online + offline on the same link
    wan_total_s: float = 0.0
    predicted_offline_bytes: float | None = None
    predicted_total_s: float | None = None  # online + offline on the --link network
    round_trips: float = 0.0  # of the link, waited for online (what latency charges; a round may be several)
    offline_round_trips: float = 0.0  # waited for the dealer's answers
    predicted_round_trips: float | None = None
    sends_per_party: list[int] = field(default_factory=list)  # messages per party (engines that count them)
    linear_share: float | None = None  # of the bytes sent, the part in linear layers (engines that profile ops)
    predicted_linear_share: float | None = None

    @property
    def wall_s_spread(self) -> float:
        return max(self.wall_s_runs) - min(self.wall_s_runs)

    @property
    def offline_bytes(self) -> int:
        """Bytes between the parties and the dealer per forward, both directions, all parties."""
        return sum(self.offline_sent_per_party) + sum(self.offline_received_per_party)

    def to_dict(self) -> dict:
        return {**asdict(self), "wall_s_spread": self.wall_s_spread, "offline_bytes": self.offline_bytes}


@dataclass(frozen=True)
class BenchResult:
    parties: int
    batch: int  # samples per encrypted forward: rounds, bytes and times are per batch
    models: tuple[ModelReport, ...]
    warnings: tuple[str, ...] = ()
    networks: dict = field(default_factory=dict)
    link: dict | None = None  # the --link network predicted_s refers to
    hosts: dict | None = None  # parties on separate hosts: this process's role, rank and interface
    samples: int | None = None  # samples the accuracy columns cover (None: one batch)
    backend: str = DEFAULT_BACKEND
    title: str = ""  # how reports name the backend
    dealer: str = ""
    insecure: str | None = None  # the INSECURE label when the dealer is a computing party

    @property
    def ratios(self) -> dict[str, dict[str, float]]:
        """Each model's cost divided by the original's (none on the dealer, which measures nothing)."""
        if not self.models:
            return {}
        base = self.models[0]
        keys = ("relu_elements", "rounds", "wall_s_median", "lan_s", "wan_s", "lan_total_s", "wan_total_s")
        out = {}
        for m in self.models[1:]:
            r = {k: getattr(m, k) / getattr(base, k) if getattr(base, k) else float("nan") for k in keys}
            r["bytes_per_party"] = m.bytes_per_party[0] / base.bytes_per_party[0]
            r["offline_bytes"] = m.offline_bytes / base.offline_bytes if base.offline_bytes else float("nan")
            out[m.name] = r
        return out

    def to_dict(self) -> dict:
        """Return the JSON schema `relu-opt bench --json` writes."""
        return {
            "backend": self.backend,
            "title": self.title,
            "dealer": self.dealer,
            "insecure": self.insecure,
            "parties": self.parties,
            "batch": self.batch,
            "samples": self.samples or self.batch,
            "models": [m.to_dict() for m in self.models],
            "ratios": self.ratios,
            "warnings": list(self.warnings),
            "networks": self.networks,
            "link": self.link,
            "hosts": self.hosts,
            "latency_model": LATENCY_MODEL,
        }


LATENCY_MODEL = {
    "online": "measured compute + the round trips the parties wait for x RTT + the busiest direction of the "
    "parties' own traffic / bandwidth per direction",
    "total": "online + the round trips waited for the dealer x RTT + the dealer's bytes / bandwidth, on the same link",
}


def _report(
    m: Measurement,
    ref: np.ndarray | None,
    y: torch.Tensor | None,
    networks: tuple[Network, Network],
    cost_model: CostModel | None,
    link: Network | None,
    prepared: fx.GraphModule | None,
    batch: int,
) -> ModelReport:
    """Return the ModelReport of one measured model (`ref`: its plaintext logits, when known)."""
    labels = None if y is None else y.numpy()
    lan, wan = networks
    offline = sum(m.offline_sent_per_party) + sum(m.offline_received_per_party)

    def online(net: Network) -> float:
        return net.latency(m.compute_s, m.round_trips, m.sent_per_party, m.received_per_party)

    def total(net: Network) -> float:
        return net.with_offline_s(online(net), offline, m.offline_round_trips)

    predicted = cost_model.cost(prepared, batch) if cost_model is not None and prepared is not None else None
    linear = cost_model.linear_bytes(prepared, batch) if cost_model is not None and prepared is not None else None
    sent = sum(m.sent_per_party)
    return ModelReport(
        name=m.name,
        relu_elements=m.relu_elements,
        rounds=m.rounds,
        bytes_per_party=m.bytes_per_party,
        wall_s_median=m.wall_s_median,
        wall_s_runs=m.wall_s_runs,
        conversion_s=m.conversion_s,
        encryption_s=m.encryption_s,
        max_abs_err=None if ref is None else float(np.abs(m.logits - ref).max()),
        top1_agreement=None if ref is None else float((m.logits.argmax(1) == ref.argmax(1)).mean()),
        accuracy=None if labels is None else float((m.logits.argmax(1) == labels).mean()),
        plain_accuracy=None if labels is None or ref is None else float((ref.argmax(1) == labels).mean()),
        lan_s=online(lan),
        wan_s=online(wan),
        predicted_rounds=None if predicted is None else predicted.rounds,
        predicted_bytes=None if predicted is None else predicted.bytes,
        sent_per_party=m.sent_per_party,
        received_per_party=m.received_per_party,
        compute_s=m.compute_s,
        predicted_s=None if link is None else online(link),
        comparisons=m.comparisons,
        offline_sent_per_party=m.offline_sent_per_party,
        offline_received_per_party=m.offline_received_per_party,
        offline_requests=m.offline_requests,
        lan_total_s=total(lan),
        wan_total_s=total(wan),
        predicted_offline_bytes=None if predicted is None else predicted.offline_bytes,
        predicted_total_s=None if link is None else total(link),
        round_trips=m.round_trips,
        offline_round_trips=m.offline_round_trips,
        predicted_round_trips=None if predicted is None else predicted.round_trips,
        sends_per_party=m.sends_per_party,
        linear_share=sum(m.linear_sent_per_party) / sent if m.linear_sent_per_party and sent else None,
        predicted_linear_share=linear / predicted.bytes if linear is not None and predicted.bytes else None,
    )


def variants(
    pricing: Pricing,
    model: nn.Module,
    example: torch.Tensor,
    optimized: nn.Module | None = None,
    public_coeffs: bool = False,
) -> list[tuple[str, fx.GraphModule]]:
    """Return the prepared models one bench compares: original, optimized (if given), linear floor; each is
    checked against what the backend can run before any party starts."""
    engine = pricing.engine()
    original = engine.prepare(model, example[:1], public_coeffs=public_coeffs)
    out = [("original", original)]
    if optimized is not None:
        out.append(("optimized", engine.prepare(optimized, example[:1], public_coeffs=public_coeffs)))
    out.append(("floor", engine.floor(original, example[:1])))
    for _, gm in out:
        engine.check(gm, example[:1])
    return out


def _batch(batch: int | None, x: torch.Tensor) -> int:
    return min(batch or len(x), len(x))


def _result(pricing: Pricing, batch, reports, warnings, networks, link, samples=None, hosts=None) -> BenchResult:
    return BenchResult(
        pricing.parties,
        batch,
        tuple(reports),
        tuple(warnings),
        {n.name: n.to_dict() for n in networks},
        None if link is None else {"name": link.name, **link.to_dict()},
        hosts,
        samples,
        pricing.backend,
        pricing.engine().describe(pricing),
        pricing.dealer_name,
        pricing.insecure,
    )


def bench(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    optimized: nn.Module | None = None,
    pricing: Pricing | None = None,
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    networks: tuple[Network, Network] = (LAN, WAN),
    cost_model: CostModel | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    link: Network | None = None,
    public_coeffs: bool = False,
    batch: int | None = None,
) -> BenchResult:
    """Return the BenchResult of running the original, the optimized (when given) and the linear floor
    with real parties (and dealer) of `pricing` (default: the default backend, 2 parties, its honest dealer) on
    the samples `x` (labels `y` optional). With `link`, each model also gets `predicted_s` on that
    network; with `public_coeffs`, polynomials that cannot be folded keep their coefficients public; with
    `batch`, the samples run in batches of that size and the costs are one batch's (batch 1: the latency
    of one private query)."""
    pricing = pricing or Pricing()
    engine = pricing.engine()
    prepared = variants(pricing, model, x[:1], optimized, public_coeffs)
    warnings = []
    for name, gm in prepared:
        warnings += [f"{name}: {w}" for w in engine.warnings(gm, x)]
    if pricing.insecure:
        warnings.append(f"--dealer {pricing.dealer_name}: {pricing.insecure}")
    for w in warnings:
        log(f"warning: {w}")
    with torch.no_grad():
        plain = {name: gm(x).double().numpy() for name, gm in prepared}
    b = _batch(batch, x)
    log(f"running {len(prepared)} models with {pricing.describe()}, {len(x)} samples in batches of {b}")
    measured = engine.measure(prepared, x, pricing, runs=runs, warmup=warmup, timeout=timeout, batch=b)
    graphs = dict(prepared)
    reports = [_report(m, plain[m.name], y, networks, cost_model, link, graphs[m.name], b) for m in measured]
    return _result(pricing, b, reports, warnings, networks, link, len(x))


def bench_host(
    model: nn.Module,
    x: torch.Tensor,
    host: HostRole,
    pricing: Pricing | None = None,
    optimized: nn.Module | None = None,
    y: torch.Tensor | None = None,
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    networks: tuple[Network, Network] = (LAN, WAN),
    link: Network | None = None,
    public_coeffs: bool = False,
    cost_model: CostModel | None = None,
    batch: int | None = None,
) -> BenchResult:
    """Run this process as one party (or the dealer) of a bench whose parties are on separate hosts;
    return the BenchResult every party ends with (all parties' traffic and times, shared at the end).

    Every party runs the same models (party 0's weights reach the others only as secret shares), and
    the data owner's samples are the input; the others pass zeros of the same shape. Every member checks
    at rendezvous that all run the same models, shapes, dealer and versions. Agreement with plaintext
    needs the weights and the samples in one place, so it is not reported; accuracy is, where `y` is
    given. The dealer's result has no models: it never sees a measurement."""
    pricing = pricing or Pricing()
    prepared = variants(pricing, model, x[:1], optimized, public_coeffs)
    b = _batch(batch, x)
    run = pricing.engine().run_host(prepared, x, pricing, host, runs, warmup, timeout, b)
    graphs = dict(prepared)
    reports = [_report(m, None, y, networks, cost_model, link, graphs[m.name], b) for m in run.measurements]
    where = {"role": host.role, "rank": host.rank, "interface": run.interface}
    warnings = [f"--dealer {pricing.dealer_name}: {pricing.insecure}"] if pricing.insecure else []
    return _result(pricing, b, reports, warnings, networks, link, len(x), where)
