"""One job on several processes: torch.distributed set up from torchrun's environment, and the few rules that
keep the processes (ranks) one job.

Every rank runs the same program (`torchrun --nproc-per-node N -m relu_opt optimize ...`, or `--nproc N`).
Training is data-parallel: each global batch, drawn from the same seeded stream as a single process draws it,
is split over the ranks (DistributedSampler's rank::world split), so the same seed and global batch give the
same batches at any world size. What touches the outside happens on rank 0 only and its result is broadcast
(`on_main`): files are written (relu_opt.atomic) and cache files read there, cost models are measured there,
reports and benches run there, and the fine-tuning guard decides there. A rank that dies makes the next
collective fail on the others; `RankLost` names it, and training saves its state first, so the same command
resumes. With one process every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from relu_opt.errors import ConfigError, ReluOptError, first_line

T = TypeVar("T")
_solo = {"depth": 0, "alone": 0}  # inside rank 0's on_main work or a rank's own work: no collectives
_lost_probe = {"n": 0}
_PROBE_WAIT_S = 3.0  # how long survivors wait for each other to say they are alive


class RankLost(ReluOptError):
    """Another rank of the job stopped (killed, crashed or its host gone); the job stops with it."""


def world_size() -> int:
    """Return the number of processes in the job (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Return this process's rank (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Return whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def writes() -> bool:
    """Return whether this process writes files: rank 0, or any rank doing work of its own (`alone`)."""
    return is_main() or _solo["alone"] > 0


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within, this rank works by itself (no collectives) and writes its own files: independent work spread
    over the ranks, such as a frontier's budgets."""
    _solo["depth"] += 1
    _solo["alone"] += 1
    try:
        yield
    finally:
        _solo["depth"] -= 1
        _solo["alone"] -= 1


def active() -> bool:
    """Return whether collectives are due now: several ranks, and not inside rank 0's solo work."""
    return world_size() > 1 and _solo["depth"] == 0


def parts() -> int:
    """Return how many ranks a batch is split over now (1 inside rank 0's solo work or alone)."""
    return world_size() if active() else 1


def launched() -> bool:
    """Return whether this process was started by torchrun (or --nproc) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "cpu") -> None:
    """Join the job torchrun described in the environment (gloo on CPU, NCCL on GPUs; "cuda" then names this
    rank's GPU, LOCAL_RANK). Idempotent; a no-op in a single process."""
    import torch.distributed as dist

    if not launched():
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} but this host has no CUDA device; use --device cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    master = os.environ.get("MASTER_ADDR")
    if master and not device.startswith("cuda") and "GLOO_SOCKET_IFNAME" not in os.environ:
        from relu_opt.backends.rendezvous import route_to

        # gloo binds where the hostname resolves, often a loopback address: on several hosts, the interface
        # that reaches the master instead (GLOO_SOCKET_IFNAME set by the user wins)
        with contextlib.suppress(Exception):
            os.environ["GLOO_SOCKET_IFNAME"] = route_to(master).ifname
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
            per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_host))


def _peer_failure(exc: BaseException) -> bool:
    """Return whether `exc` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    if world_size() < 2 or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "gloo", "NCCL", "timed out")
    )


def lost_ranks(wait: float = _PROBE_WAIT_S) -> list[int]:
    """Return the ranks that do not answer: each survivor says it is alive in the job's store and waits up to
    `wait` seconds for the others (a killed rank never answers)."""
    import torch.distributed as dist

    _lost_probe["n"] += 1
    prefix = f"relu_opt/alive/{_lost_probe['n']}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{prefix}{rank()}", "1")
        missing = _missing(store, [f"{prefix}{r}" for r in range(world_size())], wait)
        return [r for r in range(world_size()) if f"{prefix}{r}" in missing]
    except Exception:  # the store lives on rank 0's host (or torchrun's agent there): that is what went
        return [0]


def _missing(store, keys: list[str], wait: float) -> set[str]:
    """Return which of `keys` the job's store still lacks after waiting up to `wait` seconds for them all."""
    deadline = time.monotonic() + wait
    while True:
        missing = {k for k in keys if not store.check([k])}
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def error_line(message: str, quiet: bool = False, wait: float = _PROBE_WAIT_S) -> str | None:
    """Return the line this rank prints for its error, or None: rank 0 prints (and posts) its own; another rank
    stays silent when rank 0 has said something (every rank fails alike in most errors, or with the same
    cause), and else names itself (an error of its own stops it before rank 0 can know of it); `quiet`: a
    stop every rank got (a signal), which only rank 0 reports."""
    if world_size() < 2:
        return message
    if quiet and not is_main():
        return None
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        if is_main():
            store.set("relu_opt/error", message)
            return message
        if not _missing(store, ["relu_opt/error"], wait):
            return None
    except Exception:  # no store (rank 0's host is gone): say it here
        pass
    return message if is_main() else f"rank {rank()}: {message}"


def rank_lost(exc: BaseException) -> RankLost | None:
    """Return the RankLost that `exc` means (a collective failed because a rank went away), else None."""
    if isinstance(exc, RankLost):
        return exc
    if not _peer_failure(exc):
        return None
    hold_signals()
    lost = [r for r in lost_ranks() if r != rank()]
    who = f"rank {', '.join(map(str, lost))}" if lost else "another rank"
    first = first_line(exc)
    reason = "connection to it closed" if "Connection" in first or "pipe" in first else first[:120]
    return RankLost(f"{who} of {world_size()} stopped ({reason})")


def hold_signals() -> None:
    """Ignore SIGTERM, SIGHUP and SIGINT for the rest of this process: once a rank is lost the job ends, and
    torchrun's stop signal must not cut short the checkpoint being saved or add a second message."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to hold
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Turn a collective's failure caused by a lost rank into RankLost (one line naming the rank)."""
    try:
        yield
    except RuntimeError as exc:
        lost = rank_lost(exc)
        if lost is None:
            raise
        raise lost from None


def broadcast(obj: T) -> T:
    """Return rank 0's `obj` on every rank (pickled)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    with collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """Return every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size()
    with collective():
        dist.all_gather_object(out, obj)
    return out


def all_sum(values: Sequence[float]) -> list[float]:
    """Return the element-wise sum of `values` over the ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    import torch.distributed as dist

    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor(list(values), dtype=torch.float64, device=on)
    with collective():
        dist.all_reduce(t)
    return t.cpu().tolist()


def sum_tensors(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (on the device the backend reduces on)."""
    if not active():
        return
    import torch.distributed as dist

    with collective():
        for t in tensors:
            dist.all_reduce(t)


def sync_state(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of `module` (BatchNorm statistics drift apart in DDP)."""
    if not active():
        return
    import torch.distributed as dist

    with collective():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def average_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks, in place (what DDP does during backward)."""
    grads = [p.grad for p in params if p.grad is not None]
    sum_tensors(grads)
    for g in grads:
        g.div_(parts())


def shard(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """Return this rank's part of a global batch (every world_size-th sample from its rank, as
    DistributedSampler splits) and the weight that makes the ranks' mean gradients that of the whole batch.
    A batch smaller than the world is trained whole by every rank (weight 1)."""
    n, w = len(x), parts()
    if w == 1 or n < w:
        return x, y, 1.0
    xs, ys = x[rank() :: w], y[rank() :: w]
    return xs, ys, len(xs) * w / n


def mine(items: Sequence[T]) -> list[tuple[int, T]]:
    """Return the (index, item) pairs this rank takes when independent work is spread over the ranks."""
    w, r = (parts(), rank() if active() else 0)
    return [(i, it) for i, it in enumerate(items) if i % w == r]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result (or raise its error) on every rank. Nested calls run
    directly; the other ranks wait meanwhile (measuring a cost model, writing a report, an MPC bench)."""
    if not active():
        return fn()
    out: tuple
    if is_main():
        _solo["depth"] += 1
        try:
            out = ("ok", fn())
        except BaseException as exc:  # the others must hear of it too, or they wait forever
            out = ("err", _portable(exc))
        finally:
            _solo["depth"] -= 1
    else:
        out = ("", None)
    kind, value = broadcast(out)
    if kind == "err":
        raise value
    return value


def _portable(exc: BaseException) -> BaseException:
    """Return `exc`, or a ReluOptError with its message when it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return ReluOptError(first_line(exc))


def spawn(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m relu_opt ARGV` as `nproc` ranks on this host with torchrun's launcher (elastic agent);
    return the exit code of rank 0 (or of the first rank that failed)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be 1 or more")
    from relu_opt.backends.processes import free_port

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # rank 0's lines reach a log file as they are printed
    for name in list(logging.root.manager.loggerDict):  # the ranks say what happened (each logger has a level)
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        run_id=f"relu-opt-{os.getpid()}",
        max_restarts=0,
        # how often the agent looks at the ranks (the job outlives its end by up to this). A lost rank is
        # noticed by the others' next collective at once, so rank 0 names it before the agent stops the job
        monitor_interval=2,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "relu_opt", *argv)
    except SignalException as exc:  # Ctrl-C or a stop signal: the ranks saved and rank 0 said so
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failures = exc.failures
        lost, why = exc.get_first_failure()
        if lost != 0 and why.exitcode < 0 and getattr(failures.get(0), "exitcode", 0) != 2:
            # rank 0 was stopped by the agent before a collective told it (it said "interrupted")
            print(f"rank {lost} of {nproc} died ({why.signal_name()}); the job was stopped", file=sys.stderr)
        code = (failures.get(0) or why).exitcode
        return code if code > 0 else 128 - code if code < 0 else 1
    return 0
