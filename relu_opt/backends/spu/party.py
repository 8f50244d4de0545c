"""One SPU party: meets the others through relu-opt's rendezvous, joins SPU's own link (libspu.link,
brpc), secret-shares what it owns, runs each compiled model and writes what SPU's profile counted.

Run as `python -m relu_opt.backends.spu.party JOB.json` (the local launcher starts one per party), or
called in-process by `relu-opt bench --rank N` on separate hosts. Party 0 owns the weights, party 1 the
input; a third ABY3 party owns nothing. Nothing is opened but the logits, which party 0 reconstructs.

Each model gets a fresh SPU runtime, so its first forward pays its own setup (Cheetah's OT and HE keys,
the correlated randomness a protocol precomputes): that forward is reported apart as setup, and the
later forwards' mean as the steady state.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from relu_opt import atomic
from relu_opt.backends import rendezvous as rdv
from relu_opt.backends.processes import free_port, watchdog
from relu_opt.errors import BackendError, first_line

MODEL_OWNER, DATA_OWNER = 0, 1
PROTOCOLS = {"cheetah": "CHEETAH", "semi2k": "SEMI2K", "aby3": "ABY3"}  # --protocol -> SPU's ProtocolKind
LINEAR_PPHLO = ("pphlo.convolution", "pphlo.dot", "pphlo.dot_general")  # HE (Cheetah) or local+trunc
_OP = re.compile(
    r"- (\S+), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) recv bytes (\d+), "
    r"send actions (\d+), recv actions (\d+)"
)
_TOTAL = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")


@dataclass
class SpuJob:
    """Everything one SPU party needs; the same for every party but `rank`, `result` and `spu_log`."""

    rank: int
    world_size: int
    protocol: str  # a key of PROTOCOLS
    master_addr: str
    master_port: int
    models: list[dict]  # {"name", "program": .npz (code and names), "weights": .npz or None (party 0's)}
    result: str
    spu_log: str  # where this process's fd 1 (SPU's log) goes while SPU runs
    inputs: str | None = None  # .npy with the samples; read by the data owner only
    batch: int = 1
    timeout: float = 300.0
    dealer: str = "none"  # "party0": SPU's TrustedFirstParty beaver (SEMI2K)
    fingerprint: dict | None = None
    ifname: str | None = None
    grace: float = 0.0

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpuJob:
        return cls(**json.loads(Path(path).read_text()))


def runtime_config(protocol: str, dealer: str, profile: bool = True):
    """Return SPU's RuntimeConfig for `protocol` (64-bit ring), with per-op profiling."""
    import spu
    import spu.libspu as libspu

    cfg = libspu.RuntimeConfig(protocol=spu.parse_protocol_kind(PROTOCOLS[protocol]), field=libspu.FieldType.FM64)
    if protocol == "semi2k":
        cfg.beaver_type = libspu.RuntimeConfig.BeaverType.TrustedFirstParty  # the only one 0.9.5 runs here
    cfg.enable_pphlo_profile = profile
    return cfg


def _encode(share) -> bytes:
    chunks = [base64.b64encode(c).decode() for c in share.share_chunks]
    doc = {"meta": base64.b64encode(share.meta).decode(), "chunks": chunks}
    return json.dumps(doc).encode()


def _decode(data: bytes):
    import spu.libspu as libspu

    doc = json.loads(data)
    share = libspu.Share()
    share.meta = base64.b64decode(doc["meta"])
    share.share_chunks = [base64.b64decode(c) for c in doc["chunks"]]
    return share


def stats_of(text: str) -> dict:
    """Return the totals and the linear ops' part of one forward from SPU's profile log."""
    total = _TOTAL.findall(text)
    if not total:
        raise BackendError("SPU wrote no profile for a forward (enable_pphlo_profile); cannot count its traffic")
    sent, received, sends, recvs = (int(v) for v in total[-1])
    linear = {"sent": 0, "received": 0, "s": 0.0}
    for op, _, dur, s, r, _, _ in _OP.findall(text):
        if op in LINEAR_PPHLO:
            linear["sent"] += int(s)
            linear["received"] += int(r)
            linear["s"] += float(dur)
    return {"sent": sent, "received": received, "sends": sends, "recvs": recvs, "linear": linear}


class _Log:
    """SPU's log (this process's fd 1) redirected to a file, read forward by forward."""

    def __init__(self, path: str) -> None:
        self.path, self.offset = Path(path), 0
        sys.stdout.flush()
        self.saved = os.dup(1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.close(fd)

    def new_text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")

    def close(self) -> None:
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)


def start_watchdog(job: SpuJob) -> None:
    """Exit when the process outlives `job.timeout` (+ grace) or its parent; touch the heartbeat meanwhile."""
    watchdog(job.result, job.rank, f"party {job.rank}", job.timeout, job.grace)


def _link(job: SpuJob, store):
    """Return SPU's brpc link to the other parties; each publishes its address in the store."""
    import spu.libspu as libspu

    route = rdv.route_to(job.master_addr)  # this host's address on the interface that reaches party 0
    ip = route.local_ip
    store.set(f"{rdv.PREFIX}spu/{job.rank}", f"{ip}:{free_port(ip)}")
    keys = [f"{rdv.PREFIX}spu/{r}" for r in range(job.world_size)]
    store.wait(keys, timedelta(seconds=job.timeout))
    desc = libspu.link.Desc()
    desc.recv_timeout_ms = int(job.timeout * 1000)
    desc.connect_retry_times = 120
    desc.connect_retry_interval_ms = 500
    for r, key in enumerate(keys):
        desc.add_party(f"party{r}", store.get(key).decode())
    return libspu.link.create_brpc(desc, job.rank)


def _shares(io, lctx, job: SpuJob, owner: int, value: np.ndarray | None, vis):
    """Return this party's share of a value `owner` holds: the owner splits it and sends each party its share."""
    if job.rank == owner:
        shares = io.make_shares(np.ascontiguousarray(value), vis)
        for r in range(job.world_size):
            if r != owner:
                lctx.send(r, _encode(shares[r]))
        return shares[owner]
    return _decode(lctx.recv(owner))


def _run_model(lctx, job: SpuJob, spec: dict, x: np.ndarray | None, n: int, log: _Log) -> dict:
    import spu
    import spu.libspu as libspu

    prog = np.load(spec["program"])
    names = [str(s) for s in prog["input_names"]]
    exe = libspu.Executable(
        name=str(prog["name"]), input_names=names, output_names=[str(s) for s in prog["output_names"]],
        code=prog["code"].tobytes(),
    )  # fmt: skip
    cfg = runtime_config(job.protocol, job.dealer)
    io, secret = spu.Io(job.world_size, cfg), libspu.Visibility.VIS_SECRET
    rt = spu.Runtime(lctx, cfg)
    weights = np.load(spec["weights"]) if job.rank == MODEL_OWNER else None
    for name in names[1:]:  # the weights: party 0's
        rt.set_var(name, _shares(io, lctx, job, MODEL_OWNER, None if weights is None else weights[name], secret))
    batches = max(1, -(-n // job.batch))
    order = list(range(batches)) if batches > 1 else [0, 0]  # a second forward gives the steady state
    forwards, logits = [], {}
    log.new_text()
    for b in order:
        xb = None
        if job.rank == DATA_OWNER:
            xb = x[b * job.batch : (b + 1) * job.batch]
            if len(xb) < job.batch:
                xb = np.concatenate([xb, np.zeros((job.batch - len(xb),) + xb.shape[1:], xb.dtype)])
        rt.set_var(names[0], _shares(io, lctx, job, DATA_OWNER, xb, secret))
        t = time.perf_counter()
        rt.run(exe)
        wall = time.perf_counter() - t
        forwards.append({**stats_of(log.new_text()), "wall_s": wall})
        out = rt.get_var(exe.output_names[0])
        if job.rank == MODEL_OWNER:  # party 0 reconstructs the logits from every party's share
            parts = [out] + [_decode(lctx.recv(r)) for r in range(1, job.world_size)]
            logits[b] = np.asarray(io.reconstruct(parts)).reshape(job.batch, -1).tolist()
        else:
            lctx.send(MODEL_OWNER, _encode(out))
    steady = forwards[1:]

    def mean(values) -> int:  # not the median: Cheetah refills its OT pool every so many forwards
        return int(round(statistics.mean(values)))

    return {
        "name": spec["name"],
        "first": {k: forwards[0][k] for k in ("sent", "sends")},
        "sent": mean(f["sent"] for f in steady),
        "received": mean(f["received"] for f in steady),
        "sends": mean(f["sends"] for f in steady),
        "wall_s_runs": [f["wall_s"] for f in steady],
        "linear_sent": mean(f["linear"]["sent"] for f in steady),
        "logits": [row for b in sorted(logits) for row in logits[b]][:n] if logits else [],
    }


def run(job: SpuJob) -> dict:
    """Run this party's side of every model; return its result (with every party's when on separate hosts)."""
    store, log = None, None
    try:
        store = rdv.open_store(job.rank, job.master_addr, job.master_port, job.timeout)
        if job.fingerprint is not None:
            rdv.check_in(store, job.rank, job.fingerprint, job.timeout)
        x = np.load(job.inputs) if job.rank == DATA_OWNER and job.inputs else None
        n = int(store_n(store, job, x))
        log = _Log(job.spu_log)
        lctx = _link(job, store)
        models = [_run_model(lctx, job, spec, x, n, log) for spec in job.models]
        with contextlib.suppress(Exception):
            lctx.stop_link()
        log.close()
        log = None
        interface = job.ifname or rdv.route_to(job.master_addr).ifname
        mine = {"rank": job.rank, "ok": True, "models": models, "interface": interface}
        if job.fingerprint is not None:
            everyone = rdv.share_results(store, job.rank, job.world_size, mine, job.timeout)
            mine = {"rank": job.rank, "ok": True, "interface": interface, "parties": everyone}
        else:
            rdv.share_results(store, job.rank, job.world_size, {"rank": job.rank}, job.timeout)
        return mine
    except BaseException as exc:
        if log is not None:
            tail = log.new_text().strip().splitlines()[-1:]
            log.close()
        else:
            tail = []
        message = first_line(exc) if isinstance(exc, BackendError) else f"party {job.rank}: {first_line(exc)}"
        if tail and not isinstance(exc, BackendError | KeyboardInterrupt):
            message += f" (SPU: {tail[0][-200:]})"
        if store is not None:
            rdv.report_failure(store, job.rank, message)
        raise BackendError(message) from exc


def store_n(store, job: SpuJob, x: np.ndarray | None) -> int:
    """Return the number of samples: the data owner says it to the others (only the count is public)."""
    if job.rank == DATA_OWNER:
        store.set(f"{rdv.PREFIX}spu/n", str(len(x)))
    store.wait([f"{rdv.PREFIX}spu/n"], timedelta(seconds=job.timeout))
    return int(store.get(f"{rdv.PREFIX}spu/n"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = SpuJob.load(argv[0])
    start_watchdog(job)
    try:
        result = run(job)
    except BaseException as exc:
        message = first_line(exc)
        atomic.write_json(job.result, {"rank": job.rank, "ok": False, "error": message})
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    atomic.write_json(job.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
