"""Start CrypTen parties (and the dealer) as processes on this machine and collect their results, failing
fast: the first process to fail (one killed by a signal before the others it took down) is named."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from relu_opt.backends.crypten.party import PROVIDERS, PartyJob, heartbeat_path
from relu_opt.errors import BackendError


def free_port() -> int:
    """Return a TCP port on localhost that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:])


def _error_of(result: Path, log: Path, who: str, code: int) -> str:
    try:
        data = json.loads(result.read_text())
        if not data.get("ok", True):
            return data["error"]
    except (OSError, ValueError):
        pass
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    tail = _tail(log)
    return f"{who} {how}" + (f": {tail}" if tail else "")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _frozen(results: list[Path], codes: list[int | None], stale: float, started: float) -> int | None:
    """Return the index of a running process whose last heartbeat (or, before its first, the launch at
    `started`) is older than `stale` seconds, or None. A process that waits on the others still beats; one
    that is stopped or hung in its own code does not."""
    now = time.time()
    for i, (result, code) in enumerate(zip(results, codes)):
        if code is None:
            try:
                last, allowed = heartbeat_path(str(result)).stat().st_mtime, stale
            except OSError:  # before its first beat: imports take a while on a loaded machine
                last, allowed = started, max(stale, 30.0)
            if now - last > allowed:
                return i
    return None


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
    members = [("party", r) for r in range(job.world_size)] + ([("dealer", job.world_size)] if dealer else [])
    threads = max(1, (os.cpu_count() or 1) // job.world_size)
    procs, paths, names = [], [], []
    try:
        for role, rank in members:
            stem = "dealer" if role == "dealer" else f"party{rank}"
            result, log = workdir / f"{stem}.json", workdir / f"{stem}.log"
            result.unlink(missing_ok=True)
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
            with open(log, "w") as logf:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, str(job_path)],
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so it can be killed whole
                    )
                )
            paths.append((result, log))
            names.append("the dealer" if role == "dealer" else f"party {rank}")
        deadline = time.monotonic() + timeout
        stale, started = max(10.0, timeout / 4), time.time()
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            others = "processes" if dealer else "parties"
            if failed:
                first = min(failed, key=lambda i: (codes[i] >= 0, i))  # killed by a signal: the cause
                why = _error_of(*paths[first], names[first], codes[first])
                raise BackendError(f"{why}; the other {others} were stopped")
            frozen = _frozen([p for p, _ in paths], codes, stale, started)
            if frozen is not None:
                raise BackendError(
                    f"{names[frozen]} stopped responding (no sign of life for more than {stale:g}s: it hung or "
                    f"was frozen); the other {others} were stopped"
                )
            if time.monotonic() > deadline:
                waiting = [names[i] for i, c in enumerate(codes) if c is None]
                raise BackendError(
                    f"{', '.join(waiting)} did not finish within --timeout {timeout:g}s and were stopped"
                )
            time.sleep(0.1)
    finally:
        _stop(procs)
    return [json.loads(r.read_text()) for (r, _), (role, _) in zip(paths, members) if role == "party"]
