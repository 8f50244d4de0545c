"""Start CrypTen parties (and the dealer) as processes on this machine and collect their results
(relu_opt/backends/processes.py starts and watches them)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from relu_opt.backends.crypten.party import PROVIDERS, PartyJob
from relu_opt.backends.processes import Member, free_port, run_members

__all__ = ["free_port", "launch_local"]


def launch_local(
    job: PartyJob, workdir: str | os.PathLike, timeout: float, module: str = "relu_opt.backends.crypten.party"
) -> list[dict]:
    """Run `job.world_size` parties on localhost (env:// rendezvous on a free port), and the dealer as
    one more process when `job.dealer` has one, each as `python -m MODULE JOB.json`; return each party's
    result (by rank). Raises BackendError when a party or the dealer fails or the run outlasts `timeout`
    seconds; every process is gone when it returns or raises."""
    workdir = Path(workdir)
    port = free_port()
    dealer = PROVIDERS[job.dealer] == "TTP"
    roles = [("party", r) for r in range(job.world_size)] + ([("dealer", job.world_size)] if dealer else [])
    threads = max(1, (os.cpu_count() or 1) // job.world_size)
    members = []
    for role, rank in roles:
        stem = "dealer" if role == "dealer" else f"party{rank}"
        result, log = workdir / f"{stem}.json", workdir / f"{stem}.log"
        pj = replace(
            job,
            rank=rank,
            role=role,
            master_addr="127.0.0.1",
            master_port=port,
            result=str(result),
            timeout=timeout,
            grace=5,
            threads=threads,
        )
        job_path = workdir / f"{stem}.job.json"
        job_path.write_text(json.dumps(asdict(pj)))
        name = "the dealer" if role == "dealer" else f"party {rank}"
        members.append(Member(name, job_path, result, log, is_party=role == "party"))
    return run_members(members, module, timeout)
