"""Measure prepared models under CrypTen with real parties (and the dealer): locally, or as one process
of a run whose parties and dealer are on separate hosts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx

from relu_opt.backends.base import HostRole, Measurement, PartyRun
from relu_opt.backends.crypten.convert import crypten_onnx
from relu_opt.backends.crypten.launch import launch_local
from relu_opt.backends.crypten.party import PartyJob, start_watchdog
from relu_opt.backends.crypten.party import run as run_party
from relu_opt.onnx_export import onnx_census
from relu_opt.private_tmp import private_dir


def _median(values: list) -> int:
    return int(statistics.median(values)) if values else 0


def measurements(results: list[dict], names: Sequence[str], counts: Sequence[tuple[int, int]]) -> list[Measurement]:
    """Return one Measurement per model from every party's result (ordered by rank); `counts` holds each
    model's (non-linear elements, secure comparisons) per sample, counted on its ONNX graph."""
    out = []
    for i, name in enumerate(names):
        per_party = [r["models"][i] for r in results]
        p0 = per_party[0]
        walls = [max(w) for w in zip(*(p["wall_s_runs"] for p in per_party))]
        compute = [
            max(w - c for w, c in zip(ws, cs))
            for ws, cs in zip(zip(*(p["wall_s_runs"] for p in per_party)), zip(*(p["comm_s"] for p in per_party)))
        ]
        out.append(
            Measurement(
                name=name,
                relu_elements=counts[i][0],
                rounds=_median(p0["rounds"]),
                bytes_per_party=[_median(p["bytes"]) for p in per_party],
                wall_s_runs=walls,
                conversion_s=max(p["conversion_s"] for p in per_party),
                encryption_s=max(p["encryption_s"] for p in per_party),
                logits=np.asarray(p0["logits"], dtype=np.float64),
                sent_per_party=[_median(p["sent"]) for p in per_party],
                received_per_party=[_median(p["received"]) for p in per_party],
                compute_s=statistics.median(compute),
                comparisons=counts[i][1],
                offline_sent_per_party=[_median(p["offline_sent"]) for p in per_party],
                offline_received_per_party=[_median(p["offline_received"]) for p in per_party],
                offline_requests=sum(_median(p["requests"]) for p in per_party),
                round_trips=float(statistics.median(p0["round_trips"])),
                offline_round_trips=sum(float(statistics.median(p["offline_round_trips"])) for p in per_party),
            )
        )
    return out


def write_models(models: Sequence[tuple[str, fx.GraphModule]], x: torch.Tensor, folder: Path):
    """Write each prepared model's CrypTen ONNX to `folder`; return (specs, counts, ONNX bytes)."""
    specs, counts, blobs = [], [], []
    for name, gm in models:
        data = crypten_onnx(gm, x[:1])
        path = folder / f"{name}.onnx"
        path.write_bytes(data)
        specs.append({"name": name, "onnx": str(path)})
        counted = onnx_census(onnx.load_from_string(data), tuple(x[:1].shape))
        counts.append((counted.total_relu, counted.total_comparisons))
        blobs.append(data)
    return specs, counts, blobs


def measure(
    models: Sequence[tuple[str, fx.GraphModule]],
    x: torch.Tensor,
    parties: int = 2,
    dealer: str = "third-party",
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    workdir: str | Path | None = None,
    batch: int | None = None,
) -> list[Measurement]:
    """Return each prepared model's Measurement from one run of `parties` CrypTen processes (and the
    dealer's) on localhost. With `batch`, the samples go through in batches of that size: costs and
    times are those of one batch (the first), the logits those of every sample.

    The ONNX files (the owner's weights) and the inputs go to a private 0700 folder that is removed on
    every exit path, unless `workdir` names a folder to keep them in."""
    with private_dir("bench") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        specs, counts, _ = write_models(models, x, work)
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
            dealer=dealer,
        )
        results = launch_local(job, work, timeout)
    return measurements(results, [name for name, _ in models], counts)


def run_host(
    models: Sequence[tuple[str, fx.GraphModule]],
    x: torch.Tensor,
    host: HostRole,
    dealer: str,
    dealer_process: bool,
    versions: dict[str, str],
    runs: int = 3,
    warmup: int = 1,
    timeout: float = 300,
    batch: int | None = None,
) -> PartyRun:
    """Run this process as party `host.rank` (or the dealer) of a run on separate hosts; return every
    party's measurements (the dealer returns none). Every member checks at rendezvous that all run the
    same models, shapes, dealer and versions."""
    from relu_opt.backends import rendezvous as rdv

    with private_dir("party") as tmp:
        specs, counts, blobs = write_models(models, x, Path(tmp))
        torch.save(x.clone(), Path(tmp) / "inputs.pt")
        job = {
            "command": "bench",
            "models": {name: rdv.structure_hash(data) for (name, _), data in zip(models, blobs)},
            "input_shape": list(x.shape),
            "runs": runs,
            "warmup": warmup,
            "batch": batch,
            "dealer": dealer,
            "dealer_process": dealer_process,
        }
        pj = PartyJob(
            rank=host.world_size if host.is_dealer else host.rank,
            world_size=host.world_size,
            master_addr=host.master_addr,
            master_port=host.master_port,
            models=specs,
            input_shape=list(x.shape),
            result=str(Path(tmp) / "result.json"),
            inputs=str(Path(tmp) / "inputs.pt"),
            warmup=warmup,
            runs=runs,
            batch=batch,
            timeout=timeout,
            ifname=host.ifname,
            fingerprint=rdv.fingerprint(host.world_size, job, versions),
            dealer=dealer,
            role=host.role,
        )
        start_watchdog(replace(pj, grace=10))  # the rendezvous' own errors come first
        result = run_party(pj)
    if host.is_dealer:
        return PartyRun([], result["interface"])
    return PartyRun(measurements(result["parties"], [n for n, _ in models], counts), result["interface"])


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
