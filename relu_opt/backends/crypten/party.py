"""One CrypTen process: a party (converts the models, runs encrypted forwards, writes its measurements)
or the dealer (CrypTen's TTPServer, which hands out the parties' correlated randomness).

Run as `python -m relu_opt.backends.crypten.party JOB.json`; the launcher starts one per party and one
dealer, or a user starts one per host. Party 0 owns the model weights; the data-owner party (1) owns
the input. Which provider deals the Beaver triples is `job.dealer`:
- "third-party" (CrypTen's TTP): a dealer process of its own (rank = world size) shares a seed with each
  party and sends party 0 its share of every product; no computing party knows a triple.
- "party0" (CrypTen's TFP, its default): party 0 draws every triple in the clear, so it reads every
  value the parties open: the client's input included. Insecure; kept to compare with old figures.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from relu_opt import atomic
from relu_opt.backends.processes import watchdog
from relu_opt.errors import BackendError, first_line

MODEL_OWNER = 0
DATA_OWNER = 1
PROVIDERS = {"third-party": "TTP", "party0": "TFP"}  # dealer name -> CrypTen tuple provider
_WAITING: dict[str, float] = {}  # "dealer": since when this party waits for the dealer's answer
DEALER_WAIT_S = 10.0  # one answer of the dealer: a triple of 30 MB still arrives in 3 s at 10 MB/s


@dataclass
class PartyJob:
    """Everything one party needs; the same for every party but `rank` and `result`."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    models: list[dict]  # {"name", "onnx"}
    input_shape: list[int]
    result: str
    inputs: str | None = None  # torch file with the samples; read by the data owner only
    warmup: int = 1
    runs: int = 3
    batch: int | None = None  # samples per encrypted forward; None: all at once. Timed on the first batch
    timeout: float = 300.0
    threads: int = 1
    extra_env: dict = field(default_factory=dict)
    ifname: str | None = None  # the interface Gloo binds to; default: the one that routes to master_addr
    fingerprint: dict | None = None  # parties on separate hosts: check it at rendezvous, share results
    dealer: str = "third-party"  # a key of PROVIDERS
    role: str = "party"  # or "dealer": this process is the dealer (its rank is world_size)
    grace: float = 0.0  # seconds the watchdog waits past `timeout`, so the launcher's own error comes first

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartyJob:
        return cls(**json.loads(Path(path).read_text()))


def start_watchdog(job: PartyJob) -> None:
    """Exit the process when it outlives `job.timeout` (+ `job.grace`) or its parent (no orphans, no
    hangs), or when one answer of the dealer takes longer than DEALER_WAIT_S or a quarter of
    `job.timeout`, whichever is more (the dealer hung or its link is down); touch the heartbeat file
    meanwhile, so a launcher can tell a frozen process from one that waits."""

    def dealer_hung() -> str | None:
        since = _WAITING.get("dealer")
        if since is not None and time.monotonic() - since > max(DEALER_WAIT_S, job.timeout / 4):
            return (
                f"{who(job)} waited {time.monotonic() - since:.0f}s for one answer of the dealer; the dealer "
                "hung or its link is down"
            )
        return None

    watchdog(job.result, job.rank, who(job), job.timeout, job.grace, dealer_hung)


def who(job: PartyJob) -> str:
    return "the dealer" if job.role == "dealer" else f"party {job.rank}"


def write_error(result: str, rank: int, message: str) -> None:
    atomic.write_json(result, {"rank": rank, "ok": False, "error": message})


def private_weights(data: bytes, rank: int) -> bytes:
    """Return the graph as a party other than the model owner sees it: float weights zeroed.

    The architecture and public index buffers are shared; the weights reach the other parties only as
    secret shares from party 0 (model.encrypt(src=0))."""
    if rank == MODEL_OWNER:
        return data
    mp = onnx.load_from_string(data)
    for init in mp.graph.initializer:
        arr = numpy_helper.to_array(init)
        if np.issubdtype(arr.dtype, np.floating):
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
    return mp.SerializeToString()


def run(job: PartyJob) -> dict:
    """Run `job` as its process: a party runs every model under CrypTen and returns its measurements (with
    every party's under "parties" when `job.fingerprint` is set); the dealer serves triples until party 0
    ends the run and returns what it sent and received."""
    from relu_opt.backends import rendezvous as rdv

    me = rdv.DEALER if job.role == "dealer" else job.rank
    iface = job.ifname or job.extra_env.get("GLOO_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME")
    iface = rdv.bind_interface(job.master_addr, iface)
    store = None
    if job.fingerprint is not None:
        store = rdv.open_store(me, job.master_addr, job.master_port, job.timeout)
        rdv.check_in(store, me, job.fingerprint, job.timeout)
    try:
        result = _serve(job) if job.role == "dealer" else _run(job)
    except Exception as exc:
        if store is None:
            raise
        why = str(exc) if isinstance(exc, BackendError) else _failure(job, exc)
        if me == 0 or rdv.store_alive(job.master_addr, job.master_port):
            rdv.report_failure(store, me, why)
            time.sleep(0.5)  # a member that failed first leaves its reason: name that, not the lost link
            why = rdv.peer_failure(store, me, job.world_size) or why
        raise BackendError(why) from exc
    result["interface"] = iface
    if store is not None and job.role != "dealer":
        result["parties"] = rdv.share_results(store, job.rank, job.world_size, dict(result), job.timeout)
    return result


def _failure(job: PartyJob, exc: BaseException) -> str:
    """Return one line for a process's failure; a link that another process dropped is named as such."""
    text = str(exc)
    lost = re.search(r"(Connection (?:closed|reset) by peer|Read error|Broken pipe)[^\[]*\[([^\]]+)\]:(\d+)", text)
    if lost:
        return (
            f"{who(job)} lost its connection to the process at {lost[2]} (party 0, another party or the dealer "
            "stopped, or its host went away; that process's own message says why)"
        )
    return f"{who(job)} failed: {type(exc).__name__}: {first_line(exc)}"


def init_crypten(job: PartyJob, rank: int):
    """Return crypten, initialised as `rank` of this job with its dealer's provider."""
    warnings.filterwarnings("ignore", category=UserWarning, module="crypten")
    warnings.filterwarnings("ignore", message="CrypTen is already initialized", category=RuntimeWarning)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(job.world_size),  # the computing parties; a dealer joins as rank world_size
            "MASTER_ADDR": job.master_addr,
            "MASTER_PORT": str(job.master_port),
            "RENDEZVOUS": "env://",
            "DISTRIBUTED_BACKEND": "gloo",
            **job.extra_env,
        }
    )
    torch.set_num_threads(max(1, job.threads))
    from relu_opt.backends.crypten.compat import import_crypten

    crypten = import_crypten()
    crypten.cfg.mpc.provider = PROVIDERS[job.dealer]
    crypten.cfg.communicator.verbose = True  # the communicator only counts rounds and bytes then
    if crypten.mpc.ttp_required() and rank < job.world_size:
        _watch_dealer_seed()
    crypten.init()
    return crypten


def _watch_dealer_seed() -> None:
    """Name the dealer when a party waits for the seed it shares with it (inside crypten.init)."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    init = TTPClient._init

    def waiting_init():
        _WAITING["dealer"] = time.monotonic()
        try:
            init()
        finally:
            _WAITING.pop("dealer", None)

    TTPClient._init = staticmethod(waiting_init)


def _serve(job: PartyJob) -> dict:
    """Be the dealer: CrypTen's TTPServer, until party 0 sends "terminate"; return its traffic."""
    crypten = init_crypten(job, job.world_size)
    from crypten.mpc.provider import TTPServer

    from relu_opt.backends.crypten.traffic import TrafficCounter

    comm = crypten.communicator.get()
    traffic = TrafficCounter(comm)
    ended = {"terminate": False}
    receive = comm.recv_obj

    def recv_obj(*args, **kwargs):
        message = receive(*args, **kwargs)
        ended["terminate"] = message == "terminate"
        return message

    comm.recv_obj = recv_obj
    TTPServer()  # returns on "terminate", or when the link to a party breaks (it logs and returns)
    if not ended["terminate"]:
        raise BackendError("the dealer lost party 0 before the run ended (a party failed or its link broke)")
    crypten.uninit()
    return {"rank": job.rank, "role": "dealer", "ok": True, "sent": traffic.sent, "received": traffic.received}


def _watch_dealer() -> None:
    """Name the dealer when party 0's request to it fails or waits (CrypTen asks for every triple on demand)."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = TTPClient.get()
    request = client.ttp_request

    def ttp_request(*args, **kwargs):
        _WAITING["dealer"] = time.monotonic()
        try:
            return request(*args, **kwargs)
        except RuntimeError as exc:
            raise BackendError(
                f"party 0 lost the dealer ({first_line(exc)}); check that the dealer (--role dealer) is running"
            ) from exc
        finally:
            _WAITING.pop("dealer", None)

    client.ttp_request = ttp_request


def _run(job: PartyJob) -> dict:
    crypten = init_crypten(job, job.rank)
    if crypten.mpc.ttp_required() and job.rank == 0:
        _watch_dealer()
    comm = crypten.communicator.get()
    from relu_opt.backends.crypten.traffic import TrafficCounter

    traffic = TrafficCounter(comm)
    if job.rank == DATA_OWNER % job.world_size and job.inputs:
        x = torch.load(job.inputs, weights_only=True)
    else:
        x = torch.zeros(job.input_shape)
    out = []
    for spec in job.models:
        data = private_weights(Path(spec["onnx"]).read_bytes(), job.rank)
        t0 = time.perf_counter()
        model = crypten.nn.from_onnx(io.BytesIO(data))
        model.encrypt(src=MODEL_OWNER)
        model.eval()
        t1 = time.perf_counter()
        # every party splits the same shape, so the batches line up (the others' zeros are placeholders)
        x_enc = [crypten.cryptensor(c, src=DATA_OWNER % job.world_size) for c in x.split(job.batch or len(x))]
        t2 = time.perf_counter()
        runs: dict[str, list] = {k: [] for k in ("wall", "rounds", "bytes", "sent", "received", "comm_s")}
        runs.update({k: [] for k in ("offline_sent", "offline_received", "requests")})
        runs.update({k: [] for k in ("round_trips", "offline_round_trips")})
        with crypten.no_grad():
            for i in range(job.warmup + job.runs):
                comm.barrier()
                comm.reset_communication_stats()
                traffic.reset()
                start = time.perf_counter()
                y = model(x_enc[0])
                wall = time.perf_counter() - start
                stats = comm.get_communication_stats()
                if i >= job.warmup:
                    runs["wall"].append(wall)
                    runs["rounds"].append(int(stats["rounds"]) - traffic.dealer_rounds)  # the parties' own
                    runs["bytes"].append(int(stats["bytes"] - traffic.dealer_bytes))
                    runs["sent"].append(traffic.sent)
                    runs["received"].append(traffic.received)
                    runs["comm_s"].append(traffic.comm_s)
                    runs["offline_sent"].append(traffic.offline_sent)
                    runs["offline_received"].append(traffic.offline_received)
                    runs["requests"].append(traffic.requests)
                    runs["round_trips"].append(traffic.round_trips)
                    runs["offline_round_trips"].append(traffic.offline_round_trips)
            rest = [model(xe) for xe in x_enc[1:]]  # untimed: the other batches' outputs, for accuracy
        logits = torch.cat([y.get_plain_text()] + [r.get_plain_text() for r in rest])
        out.append(
            {
                "name": spec["name"],
                **{k: v for k, v in runs.items() if k != "wall"},
                "wall_s_runs": runs["wall"],
                "conversion_s": t1 - t0,
                "encryption_s": t2 - t1,
                "logits": logits.tolist(),
            }
        )
    crypten.uninit()
    return {"rank": job.rank, "ok": True, "models": out}


def main(argv: list[str] | None = None) -> int:
    """Entry point of one party process; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    job = PartyJob.load(argv[0])
    start_watchdog(job)
    try:
        atomic.write_json(job.result, run(job))
    except BaseException as exc:  # any failure must reach the launcher as a message, not a hang
        from relu_opt.errors import ReluOptError

        if isinstance(exc, ReluOptError):
            write_error(job.result, job.rank, str(exc))
        else:
            write_error(job.result, job.rank, f"{who(job)} failed: {type(exc).__name__}: {first_line(exc)}")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
