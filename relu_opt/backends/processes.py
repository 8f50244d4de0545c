"""Start a backend's party processes (and dealer) on this machine and collect their results, failing fast:
the first process to fail (one killed by a signal before the others it took down) is named. Shared by
every backend; what each process runs is the backend's own module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relu_opt.errors import BackendError

_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def outside_job_env() -> dict[str, str]:
    """Return this environment without a torchrun job's variables: parties started by rank 0 of a
    data-parallel job set up their own torch.distributed group, and would otherwise join the job's."""
    return {k: v for k, v in os.environ.items() if k not in _JOB_VARS and not k.startswith("TORCHELASTIC_")}


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port free now on `host`, an address of this machine (default localhost)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def heartbeat_path(result: str) -> Path | None:
    """Return the file the process writing `result` touches every half second while it lives."""
    return Path(result + ".alive") if result else None


def watchdog(
    result: str, rank: int, who: str, timeout: float, grace: float = 0.0, check: Callable[[], str | None] = lambda: None
) -> None:
    """Exit this process (code 2, its error in `result`) when it outlives `timeout` + `grace` seconds or when
    `check` returns a message, and (code 3) when its parent is gone: no orphans, no hangs. Meanwhile touch
    the heartbeat file, so a launcher can tell a frozen process from one that waits."""
    parent, deadline, beat = os.getppid(), time.monotonic() + timeout + grace, heartbeat_path(result)

    def fail(msg: str) -> None:
        from relu_opt import atomic

        with contextlib.suppress(OSError):  # the result's folder may be gone already
            atomic.write_json(result, {"rank": rank, "ok": False, "error": msg})
        print(f"error: {msg}", file=sys.stderr, flush=True)
        os._exit(2)

    def watch():
        while True:
            if beat is not None:
                with contextlib.suppress(OSError):
                    beat.touch()
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)
            msg = check()
            if msg:
                fail(msg)
            if time.monotonic() > deadline:
                fail(f"{who} did not finish within --timeout {timeout:g}s")

    threading.Thread(target=watch, daemon=True).start()


@dataclass(frozen=True)
class Member:
    """One process to start: who it is (for errors), `python -m MODULE JOB`, its result and log files."""

    name: str
    job: Path
    result: Path
    log: Path
    is_party: bool = True


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


def run_members(members: list[Member], module: str, timeout: float, stale: float | None = None) -> list[dict]:
    """Start each member as `python -m MODULE JOB` in a process group of its own and wait for all; return
    the parties' results (in order). Raises BackendError when one fails, stops beating for `stale` seconds
    or the run outlasts `timeout`; every process is gone when it returns or raises."""
    procs: list[subprocess.Popen] = []
    others = "parties" if all(m.is_party for m in members) else "processes"
    try:
        for m in members:
            m.result.unlink(missing_ok=True)
            with open(m.log, "w") as logf:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, str(m.job)],
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so it can be killed whole
                        env=outside_job_env(),
                    )
                )
        deadline = time.monotonic() + timeout
        stale, started = stale or max(10.0, timeout / 4), time.time()
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first = min(failed, key=lambda i: (codes[i] >= 0, i))  # killed by a signal: the cause
                m = members[first]
                why = _error_of(m.result, m.log, m.name, codes[first])
                raise BackendError(f"{why}; the other {others} were stopped")
            frozen = _frozen([m.result for m in members], codes, stale, started)
            if frozen is not None:
                raise BackendError(
                    f"{members[frozen].name} stopped responding (no sign of life for more than {stale:g}s: it hung "
                    f"or was frozen); the other {others} were stopped"
                )
            if time.monotonic() > deadline:
                waiting = [members[i].name for i, c in enumerate(codes) if c is None]
                raise BackendError(
                    f"{', '.join(waiting)} did not finish within --timeout {timeout:g}s and were stopped"
                )
            time.sleep(0.1)
    finally:
        _stop(procs)
    return [json.loads(m.result.read_text()) for m in members if m.is_party]
