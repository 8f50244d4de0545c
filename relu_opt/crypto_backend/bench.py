"""Measure encrypted inference: original vs optimized vs the linear floor, in one CrypTen run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import nn

from relu_opt.crypto_backend.convert import crypten_onnx, linear_floor, prepare_for_crypten
from relu_opt.crypto_backend.cost_model import LAN, WAN, CostFeatures, CostModel, Network, features
from relu_opt.crypto_backend.launch import launch_local
from relu_opt.crypto_backend.party import PartyJob, start_watchdog
from relu_opt.crypto_backend.party import run as run_party
from relu_opt.export import onnx_census
from relu_opt.private_tmp import private_dir


@dataclass(frozen=True)
class Measurement:
    """One model's encrypted forward as the parties measured it (`batch` samples at once)."""

    name: str
    relu_elements: int  # per sample, counted on the exported ONNX graph
    rounds: int
    bytes_per_party: list[int]  # CrypTen's count: both directions of each all-reduce added up
    wall_s_runs: list[float]
    conversion_s: float
    encryption_s: float
    logits: np.ndarray
    features: CostFeatures | None
    sent_per_party: list[int] = field(default_factory=list)  # bytes each party sends per forward
    received_per_party: list[int] = field(default_factory=list)  # bytes each party receives per forward
    compute_s: float = 0.0  # median over runs of the slowest party's time outside communication
    comparisons: int = 0  # secure comparisons per sample (ReLU, ReLU6, max-pool, ...), on the ONNX graph

    @property
    def wall_s_median(self) -> float:
        return statistics.median(self.wall_s_runs)


def _measurements(
    results: list[dict],
    names: Sequence[str],
    relus: Sequence[int],
    feats: Sequence[CostFeatures | None],
    comparisons: Sequence[int] | None = None,
) -> list[Measurement]:
    """Return one Measurement per model from every party's result (ordered by rank)."""
    out = []
    for i, name in enumerate(names):
        per_party = [r["models"][i] for r in results]
        p0 = per_party[0]
        walls = [max(w) for w in zip(*(p["wall_s_runs"] for p in per_party))]
        compute = [
            max(w - c for w, c in zip(ws, cs))
            for ws, cs in zip(
                zip(*(p["wall_s_runs"] for p in per_party)),
                zip(*(p.get("comm_s", [0.0] * len(p["wall_s_runs"])) for p in per_party)),
            )
        ]
        out.append(
            Measurement(
                name=name,
                relu_elements=relus[i],
                rounds=int(statistics.median(p0["rounds"])),
                bytes_per_party=[int(statistics.median(p["bytes"])) for p in per_party],
                wall_s_runs=walls,
                conversion_s=max(p["conversion_s"] for p in per_party),
                encryption_s=max(p["encryption_s"] for p in per_party),
                logits=np.asarray(p0["logits"], dtype=np.float64),
                features=feats[i],
                sent_per_party=[int(statistics.median(p.get("sent", [0]))) for p in per_party],
                received_per_party=[int(statistics.median(p.get("received", [0]))) for p in per_party],
                compute_s=statistics.median(compute),
                comparisons=comparisons[i] if comparisons else 0,
            )
        )
    return out


def measure(
    models: Sequence[tuple[str, nn.Module]],
    x: torch.Tensor,
    parties: int = 2,
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    workdir: str | Path | None = None,
    public_coeffs: bool = False,
    batch: int | None = None,
) -> list[Measurement]:
    """Return each model's Measurement from one run of `parties` CrypTen processes on localhost.

    With `batch`, the samples go through in batches of that size: rounds, bytes and times are those of
    one batch (the first), the logits those of every sample.

    The ONNX files (the owner's weights) and the inputs go to a private 0700 folder that is removed on
    every exit path, unless `workdir` names a folder to keep them in. With `public_coeffs`, polynomials
    that cannot be folded keep their coefficients public (relu_opt/passes/public_poly.py)."""
    with private_dir("bench") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        specs, feats, relus, comparisons = [], [], [], []
        for name, model in models:
            prepared = prepare_for_crypten(model, x[:1], public_coeffs=public_coeffs)
            data = crypten_onnx(prepared, x[:1])
            path = work / f"{name}.onnx"
            path.write_bytes(data)
            specs.append({"name": name, "onnx": str(path)})
            feats.append(features(prepared, batch=_batch(batch, x)))
            counted = onnx_census(onnx.load_from_string(data), tuple(x[:1].shape))
            relus.append(counted.total_relu)
            comparisons.append(counted.total_comparisons)
        torch.save(x.clone(), work / "inputs.pt")
        job = PartyJob(
            rank=0,
            world_size=parties,
            master_addr="127.0.0.1",
            master_port=0,
            models=specs,
            input_shape=list(x.shape),
            result="",
            inputs=str(work / "inputs.pt"),
            warmup=warmup,
            runs=runs,
            batch=batch,
            timeout=timeout,
        )
        results = launch_local(job, work, timeout)
    return _measurements(results, [name for name, _ in models], relus, feats, comparisons)


def _batch(batch: int | None, x: torch.Tensor) -> int:
    return min(batch or len(x), len(x))


def fixed_point_warnings(gm: fx.GraphModule, x: torch.Tensor, precision_bits: int = 16) -> list[str]:
    """Return a warning for each site whose plaintext activations on `x` come near CrypTen's
    fixed-point range: a value v is stored as v * 2**precision_bits in a 64-bit ring, so products
    (and squares) of values past 2**((63 - 2 * precision_bits) / 2) wrap around."""
    limit = 2 ** ((63 - 2 * precision_bits) / 2)
    peaks: dict[str, float] = {}

    class Probe(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op in ("placeholder", "output"):
                return value
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                peaks[n.name] = float(value.detach().abs().max())
            return value

    with torch.no_grad():
        Probe(gm).run(x)
    near = sorted(((v, k) for k, v in peaks.items() if v >= limit / 4), key=lambda t: -t[0])
    return [
        f"site '{k}' reaches |x| = {v:.3g} on these samples, near the fixed-point limit {limit:.3g} "
        f"({precision_bits}-bit precision); encrypted results there may wrap around"
        for v, k in near[:5]
    ]


def pi_variants(
    model: nn.Module, example: torch.Tensor, optimized: nn.Module | None = None, public_coeffs: bool = False
) -> list[tuple[str, fx.GraphModule]]:
    """Return the prepared models one bench compares: original, optimized (if given), linear floor."""
    original = prepare_for_crypten(model, example, public_coeffs=public_coeffs)
    variants = [("original", original)]
    if optimized is not None:
        variants.append(("optimized", prepare_for_crypten(optimized, example, public_coeffs=public_coeffs)))
    return variants + [("floor", linear_floor(original, example))]


def run_one_party(
    model: nn.Module,
    x: torch.Tensor,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    optimized: nn.Module | None = None,
    y: torch.Tensor | None = None,
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    ifname: str | None = None,
    networks: tuple[Network, Network] = (LAN, WAN),
    link: Network | None = None,
    public_coeffs: bool = False,
    cost_model: CostModel | None = None,
    batch: int | None = None,
) -> BenchResult:
    """Run this process as party `rank` of a bench whose parties are on separate hosts; return the
    BenchResult every party ends with (all parties' traffic and times, shared at the end).

    Every party runs the same models (party 0's weights reach the others only as secret shares), and
    the data owner's samples are the input; the others pass zeros of the same shape. The parties check
    at rendezvous that they run the same models, shapes and versions. Agreement with plaintext needs the
    weights and the samples in one place, so it is not reported; accuracy is, where `y` is given. With
    `cost_model`, each model also gets the rounds and bytes it predicts."""
    from relu_opt.crypto_backend import rendezvous as rdv

    variants = pi_variants(model, x[:1], optimized, public_coeffs)
    with private_dir("party") as tmp:
        specs, relus, comparisons, hashes = [], [], [], {}
        for name, gm in variants:
            data = crypten_onnx(gm, x[:1])
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(data)
            specs.append({"name": name, "onnx": str(path)})
            counted = onnx_census(onnx.load_from_string(data), tuple(x[:1].shape))
            relus.append(counted.total_relu)
            comparisons.append(counted.total_comparisons)
            hashes[name] = rdv.structure_hash(data)
        torch.save(x.clone(), Path(tmp) / "inputs.pt")
        fp = rdv.fingerprint(
            world_size,
            {
                "command": "bench",
                "models": hashes,
                "input_shape": list(x.shape),
                "runs": runs,
                "warmup": warmup,
                "batch": batch,
            },
        )
        job = PartyJob(
            rank=rank,
            world_size=world_size,
            master_addr=master_addr,
            master_port=master_port,
            models=specs,
            input_shape=list(x.shape),
            result=str(Path(tmp) / "result.json"),
            inputs=str(Path(tmp) / "inputs.pt"),
            warmup=warmup,
            runs=runs,
            batch=batch,
            timeout=timeout,
            ifname=ifname,
            fingerprint=fp,
        )
        start_watchdog(replace(job, timeout=timeout + 10))  # the rendezvous' own errors come first
        result = run_party(job)
    names = [name for name, _ in variants]
    feats = [features(gm, batch=_batch(batch, x)) for _, gm in variants]
    measured = _measurements(result["parties"], names, relus, feats, comparisons)
    reports = [_report(m, None, y, networks, cost_model, link) for m in measured]
    return _result(
        world_size, _batch(batch, x), reports, (), networks, link, len(x), interface=result["interface"], rank=rank
    )


@dataclass(frozen=True)
class ModelReport:
    """One model's row of a bench: measured cost, agreement with plaintext, modelled latency."""

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
    lan_s: float
    wan_s: float
    predicted_rounds: float | None = None
    predicted_bytes: float | None = None
    sent_per_party: list[int] = field(default_factory=list)
    received_per_party: list[int] = field(default_factory=list)
    compute_s: float = 0.0
    predicted_s: float | None = None  # latency on the --link network, next to wall_s_median
    comparisons: int = 0  # secure comparisons per sample on the ONNX graph (ReLU6 counts two)

    @property
    def wall_s_spread(self) -> float:
        return max(self.wall_s_runs) - min(self.wall_s_runs)

    def to_dict(self) -> dict:
        return {**asdict(self), "wall_s_spread": self.wall_s_spread}


@dataclass(frozen=True)
class BenchResult:
    parties: int
    batch: int  # samples per encrypted forward: rounds, bytes and times are per batch
    models: tuple[ModelReport, ...]
    warnings: tuple[str, ...] = ()
    networks: dict = field(default_factory=dict)
    link: dict | None = None  # the --link network predicted_s refers to
    hosts: dict | None = None  # parties on separate hosts: this party's rank and interface
    samples: int | None = None  # samples the accuracy columns cover (None: one batch)

    @property
    def ratios(self) -> dict[str, dict[str, float]]:
        """Each model's cost divided by the original's."""
        base = self.models[0]
        keys = ("relu_elements", "rounds", "wall_s_median", "lan_s", "wan_s")
        out = {}
        for m in self.models[1:]:
            r = {k: getattr(m, k) / getattr(base, k) if getattr(base, k) else float("nan") for k in keys}
            r["bytes_per_party"] = m.bytes_per_party[0] / base.bytes_per_party[0]
            out[m.name] = r
        return out

    def to_dict(self) -> dict:
        """Return the JSON schema `relu-opt bench --json` writes."""
        return {
            "parties": self.parties,
            "batch": self.batch,
            "samples": self.samples or self.batch,
            "models": [m.to_dict() for m in self.models],
            "ratios": self.ratios,
            "warnings": list(self.warnings),
            "networks": self.networks,
            "link": self.link,
            "hosts": self.hosts,
        }


def _net_dict(n: Network) -> dict:
    return {"rtt_ms": n.rtt_s * 1e3, "bandwidth_MBps": n.bandwidth_Bps / 1e6}


def _report(
    m: Measurement,
    ref: np.ndarray | None,
    y: torch.Tensor | None,
    networks: tuple[Network, Network],
    cost_model: CostModel | None,
    link: Network | None,
) -> ModelReport:
    """Return the ModelReport of one measured model (`ref`: its plaintext logits, when known)."""
    labels = None if y is None else y.numpy()
    lan, wan = networks

    def latency(net: Network) -> float:
        return net.latency(m.compute_s, m.rounds, m.sent_per_party, m.received_per_party)

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
        lan_s=latency(lan),
        wan_s=latency(wan),
        predicted_rounds=cost_model.rounds(m.features) if cost_model and m.features else None,
        predicted_bytes=cost_model.bytes(m.features) if cost_model and m.features else None,
        sent_per_party=m.sent_per_party,
        received_per_party=m.received_per_party,
        compute_s=m.compute_s,
        predicted_s=None if link is None else latency(link),
        comparisons=m.comparisons,
    )


def _result(parties, batch, reports, warnings, networks, link, samples=None, **hosts) -> BenchResult:
    nets = {n.name: _net_dict(n) for n in networks}
    return BenchResult(
        parties,
        batch,
        tuple(reports),
        tuple(warnings),
        nets,
        None if link is None else {"name": link.name, **_net_dict(link)},
        hosts or None,
        samples,
    )


def bench(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    optimized: nn.Module | None = None,
    parties: int = 2,
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
    """Return the BenchResult of running the original, the optimized (when given) and the linear
    floor under CrypTen with `parties` parties on the samples `x` (labels `y` optional); with `link`,
    each model also gets `predicted_s` on that network; with `public_coeffs`, polynomials that cannot be
    folded keep their coefficients public; with `batch`, the samples run in batches of that size and the
    costs are one batch's (batch 1: the latency of one private query)."""
    variants = pi_variants(model, x[:1], optimized, public_coeffs)
    warnings = []
    for name, gm in variants:
        warnings += [f"{name}: {w}" for w in fixed_point_warnings(gm, x)]
    for w in warnings:
        log(f"warning: {w}")
    with torch.no_grad():
        plain = {name: gm(x).double().numpy() for name, gm in variants}

    b = _batch(batch, x)
    log(f"running {len(variants)} models under CrypTen with {parties} parties, {len(x)} samples in batches of {b}")
    measured = measure(variants, x, parties=parties, runs=runs, warmup=warmup, timeout=timeout, batch=b)
    reports = [_report(m, plain[m.name], y, networks, cost_model, link) for m in measured]
    return _result(parties, b, reports, warnings, networks, link, len(x))
