"""Measure prepared models under SPU with real parties: compile each one (our fx -> JAX lowering, then
SPU's compiler), hand party 0 its weights and party 1 the samples, and turn SPU's profile into
Measurements: steady-state bytes and send actions per party, the first forward's setup apart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from relu_opt.backends.base import HostRole, Measurement, PartyRun
from relu_opt.backends.processes import Member, free_port, run_members
from relu_opt.backends.spu.lower import lower
from relu_opt.backends.spu.party import SpuJob
from relu_opt.backends.spu.party import run as run_party
from relu_opt.private_tmp import private_dir

PARTY_MODULE = "relu_opt.backends.spu.party"


def compile_program(gm: fx.GraphModule, x: torch.Tensor) -> tuple[dict, dict[str, np.ndarray]]:
    """Return SPU's compiled program for `gm` on inputs shaped like `x` ({"name", "code", "input_names",
    "output_names"}; every input secret) and party 0's weights by input name."""
    import spu.libspu as libspu
    from spu.utils import frontend

    low = lower(gm, x)
    names = ["x"] + [f"w{i}" for i in range(len(low.weights))]
    args = [x.detach().float().numpy()] + low.weights
    exe, _ = frontend.compile(
        frontend.Kind.JAX, low.fn, args, {}, names, [libspu.Visibility.VIS_SECRET] * len(names), lambda out: ["y"]
    )
    program = {"name": "model", "code": exe.code, "input_names": names, "output_names": list(exe.output_names)}
    return program, dict(zip(names[1:], low.weights))


def program_hash(program: dict) -> str:
    """Return a hash of a compiled program: ops, shapes and public constants (no weights: they are inputs)."""
    import hashlib

    return hashlib.sha256(program["code"]).hexdigest()[:16]


def write_models(models: Sequence[tuple[str, fx.GraphModule]], x: torch.Tensor, folder: Path, owner: bool):
    """Write each model's program (and, for the weights' owner, its weights) to `folder`; return (specs, hashes)."""
    specs, hashes = [], []
    for name, gm in models:
        program, weights = compile_program(gm, x)
        prog = folder / f"{name}.program.npz"
        np.savez(
            prog,
            name=program["name"],
            code=np.frombuffer(program["code"], np.uint8),
            input_names=np.array(program["input_names"]),
            output_names=np.array(program["output_names"]),
        )
        spec = {"name": name, "program": str(prog), "weights": None}
        if owner:
            spec["weights"] = str(folder / f"{name}.weights.npz")
            np.savez(spec["weights"], **weights)
        specs.append(spec)
        hashes.append(program_hash(program))
    return specs, hashes


def element_counts(models: Sequence[tuple[str, fx.GraphModule]], x: torch.Tensor) -> list[tuple[int, int]]:
    """Return each model's (non-linear elements, comparisons) per sample, counted on its prepared graph."""
    from relu_opt.passes.census import census_of

    out = []
    for _, gm in models:
        c = census_of(gm, x[:1])
        out.append((c.total_relu, c.total_comparisons))
    return out


def measurements(results: list[dict], names: Sequence[str], counts: Sequence[tuple[int, int]]) -> list[Measurement]:
    """Return one Measurement per model from every party's result (by rank).

    Online: the steady-state forward (the mean after the first). Offline: what the first forward sent on
    top of it (the protocol's setup), counted once, as what each party sends (it crosses the link between
    the parties). SPU counts messages (send actions), not rounds: `rounds` and the round trips are
    estimated as the quieter party's messages (each answers at least one of the other's)."""
    out = []
    for i, name in enumerate(names):
        per = [r["models"][i] for r in results]
        walls = [max(w) for w in zip(*(p["wall_s_runs"] for p in per))]
        out.append(
            Measurement(
                name=name,
                relu_elements=counts[i][0],
                rounds=int(min(p["sends"] for p in per)),
                bytes_per_party=[p["sent"] + p["received"] for p in per],
                wall_s_runs=walls,
                conversion_s=0.0,
                encryption_s=0.0,
                logits=np.asarray(per[0]["logits"], dtype=np.float64),
                sent_per_party=[p["sent"] for p in per],
                received_per_party=[p["received"] for p in per],
                compute_s=statistics.median(walls),
                comparisons=counts[i][1],
                offline_sent_per_party=[max(0, p["first"]["sent"] - p["sent"]) for p in per],
                offline_received_per_party=[],  # between the parties: one's receipts are the other's sends
                round_trips=float(min(p["sends"] for p in per)),
                offline_round_trips=float(max(0, min(p["first"]["sends"] - p["sends"] for p in per))),
                sends_per_party=[p["sends"] for p in per],
                linear_sent_per_party=[p["linear_sent"] for p in per],
            )
        )
    return out


def _job(rank: int, world_size: int, protocol: str, dealer: str, specs, folder: Path, **kw) -> SpuJob:
    return SpuJob(
        rank=rank,
        world_size=world_size,
        protocol=protocol,
        dealer=dealer,
        models=specs,
        result=str(folder / f"party{rank}.json"),
        spu_log=str(folder / f"party{rank}.spu.log"),
        **kw,
    )


def measure(
    models: Sequence[tuple[str, fx.GraphModule]],
    x: torch.Tensor,
    protocol: str,
    dealer: str = "none",
    parties: int = 2,
    timeout: float = 300,
    batch: int | None = None,
) -> list[Measurement]:
    """Return each model's Measurement from one run of `parties` SPU processes on localhost.

    The samples go through in batches of `batch` (all at once by default); every forward after the
    first counts toward the steady state. Programs, weights and samples go to a private 0700 folder that
    is removed on every exit path."""
    batch = batch or len(x)
    xb = x[:batch]
    with private_dir("spu-bench") as tmp:
        work = Path(tmp)
        specs, _ = write_models(models, xb, work, owner=True)
        np.save(work / "inputs.npy", x.detach().float().numpy())
        port = free_port()
        members = []
        for rank in range(parties):
            job = _job(
                rank, parties, protocol, dealer, specs if rank == 0 else [{**s, "weights": None} for s in specs],
                work, master_addr="127.0.0.1", master_port=port, batch=batch, timeout=timeout, grace=5,
                inputs=str(work / "inputs.npy") if rank == 1 else None,
            )  # fmt: skip
            path = work / f"party{rank}.job.json"
            path.write_text(json.dumps(asdict(job)))
            members.append(Member(f"party {rank}", path, Path(job.result), work / f"party{rank}.log"))
        results = run_members(members, PARTY_MODULE, timeout)
    return measurements(results, [n for n, _ in models], element_counts(models, xb))


def run_host(
    models: Sequence[tuple[str, fx.GraphModule]],
    x: torch.Tensor,
    host: HostRole,
    protocol: str,
    dealer: str,
    versions: dict[str, str],
    timeout: float = 300,
    batch: int | None = None,
) -> PartyRun:
    """Run this process as party `host.rank` of an SPU run on separate hosts; return every party's
    measurements. Every party checks at rendezvous that all run the same programs, protocol and versions."""
    from relu_opt.backends import rendezvous as rdv
    from relu_opt.backends.spu.party import start_watchdog

    batch = batch or len(x)
    xb = x[:batch]
    with private_dir("spu-party") as tmp:
        work = Path(tmp)
        specs, hashes = write_models(models, xb, work, owner=host.rank == 0)
        if host.rank == 1:  # the data owner's samples; the others never read them
            np.save(work / "inputs.npy", x.detach().float().numpy())
        job = {
            "command": "bench",
            "backend": "spu",
            "protocol": protocol,
            "dealer": dealer,
            "programs": {n: h for (n, _), h in zip(models, hashes)},
            "input_shape": list(xb.shape),
            "batch": batch,
        }
        pj = _job(
            host.rank, host.world_size, protocol, dealer, specs, work, master_addr=host.master_addr,
            master_port=host.master_port, batch=batch, timeout=timeout, ifname=host.ifname,
            fingerprint=rdv.fingerprint(host.world_size, job, versions),
            inputs=str(work / "inputs.npy") if host.rank == 1 else None,
        )  # fmt: skip
        start_watchdog(replace(pj, grace=10))
        result = run_party(pj)
    counts = element_counts(models, xb)
    return PartyRun(measurements(result["parties"], [n for n, _ in models], counts), result["interface"])
