"""Measure the link between parties (round-trip time and bandwidth per direction) over a torch.distributed
Gloo group, so a latency prediction rests on the user's own network."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from relu_opt.backends import rendezvous as rdv
from relu_opt.backends.network import Network
from relu_opt.errors import BackendError, last_line

PINGS = 30
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class LinkMeasurement:
    """RTT and bandwidth (MB/s per direction) between party 0 and each other party."""

    rtt_ms: float  # fastest of small ping-pongs (the link's own delay), the slowest peer
    one_way_MBps: dict[str, float]  # "0->1": one direction alone
    duplex_MBps: dict[str, float]  # "0->1": while the other direction carries as much at once
    probe_bytes: int  # size of the largest tensor sent
    interface: str
    rtt_median_ms: float = 0.0  # median ping-pong: adds this host's scheduling delays under load

    @property
    def bandwidth_MBps(self) -> float:
        """Return the per-direction bandwidth the latency model uses: the slowest direction alone. (The
        rates with both directions busy show whether the link is full duplex; on a shaped link with a
        deep queue one TCP flow can starve the other's acknowledgements, so they vary more.)"""
        return min(self.one_way_MBps.values())

    def network(self, name: str = "link") -> Network:
        """Return this link as a Network profile."""
        return Network(name, self.rtt_ms / 1e3, self.bandwidth_MBps * 1e6)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict; `bench --link FILE` reads it back."""
        return {**asdict(self), "bandwidth_MBps": self.bandwidth_MBps}


def _pingpong(dist, peer: int, initiator: bool, n: int) -> list[float]:
    token = torch.zeros(1, dtype=torch.uint8)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        if initiator:
            dist.send(token, peer)
            dist.recv(token, peer)
        else:
            dist.recv(token, peer)
            dist.send(token, peer)
        times.append(time.perf_counter() - start)
    return times


def _one_way(dist, peer: int, sender: bool, nbytes: int) -> None:
    """The sender pushes `nbytes`; the receiver acknowledges once all arrived."""
    token = torch.zeros(1, dtype=torch.uint8)
    if sender:
        dist.send(torch.zeros(nbytes, dtype=torch.uint8), peer)
        dist.recv(token, peer)
    else:
        dist.recv(torch.empty(nbytes, dtype=torch.uint8), peer)
        dist.send(token, peer)


def _duplex(dist, peer: int, nbytes: int) -> float:
    """Both sides send `nbytes` at once; returns this side's seconds until the peer's bytes arrived."""
    out, into = torch.zeros(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    start = time.perf_counter()
    reqs = [dist.isend(out, peer), dist.irecv(into, peer)]
    reqs[1].wait()
    elapsed = time.perf_counter() - start
    reqs[0].wait()
    return elapsed


def _measure_pair(dist, me: int, peer: int, budget_s: float) -> tuple[float, ...]:
    """Run the probes between party 0 (`me` == 0) and `peer`; on party 0 return (min rtt, median rtt,
    one-way 0->peer, one-way peer->0, duplex 0->peer, duplex peer->0, bytes) in seconds and bytes/s."""
    lead = me == 0
    other = peer if lead else 0
    _pingpong(dist, other, lead, 5)
    pings = _pingpong(dist, other, lead, PINGS)
    rtt, rtt_median = min(pings), statistics.median(pings)
    # party 0 picks the probe size: grow it until one transfer takes a good fraction of the budget
    size = 256 << 10
    size_t = torch.zeros(1, dtype=torch.int64)
    while True:
        if lead:
            start = time.perf_counter()
            _one_way(dist, other, True, size)
            t = time.perf_counter() - start
            grow = t < budget_s and size < MAX_BYTES
            size_t[0] = size * 4 if grow else 0
            dist.send(size_t, other)
        else:
            _one_way(dist, other, False, size)
            dist.recv(size_t, other)
            grow = int(size_t[0]) != 0
        if not grow:
            break
        size *= 4
    forward, backward, dup_in, dup_out = [], [], [], []
    for _ in range(3):
        for direction in (0, 1):  # 0: party 0 sends, 1: the peer sends
            start = time.perf_counter()
            _one_way(dist, other, sender=(direction == 0) == lead, nbytes=size)
            t = time.perf_counter() - start
            if lead:
                (forward if direction == 0 else backward).append(t)
        t = _duplex(dist, other, size)
        got = torch.tensor([t], dtype=torch.float64)
        if lead:
            dist.recv(got, other)  # the peer's time for party 0's bytes
            dup_in.append(t)
            dup_out.append(float(got[0]))
        else:
            dist.send(got, other)
    if not lead:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, size

    def rate(times: list[float]) -> float:
        return size / max(min(times) - rtt, 1e-9)

    return rtt, rtt_median, rate(forward), rate(backward), size / min(dup_out), size / min(dup_in), size


def measure_link(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    timeout: float = 120,
    ifname: str | None = None,
    versions: dict[str, str] | None = None,
    budget_s: float = 0.3,
) -> LinkMeasurement:
    """Return the LinkMeasurement between party 0 and every other party, measured by all parties at
    once (each runs this with its own `rank`)."""
    import torch.distributed as dist

    iface = rdv.bind_interface(master_addr, ifname)
    store = rdv.open_store(rank, master_addr, master_port, timeout)
    rdv.check_in(store, rank, rdv.fingerprint(world_size, {"command": "link"}, versions or {}), timeout)
    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    except Exception as exc:
        raise BackendError(f"party {rank} could not open the Gloo group over {iface}: {last_line(exc)}") from None
    try:
        rtts, medians, one_way, duplex, probe = [], [], {}, {}, 0
        for peer in range(1, world_size):
            dist.barrier()
            if rank in (0, peer):
                rtt, median, fwd, bwd, dout, din, size = _measure_pair(dist, rank, peer, budget_s)
                if rank == 0:
                    rtts.append(rtt)
                    medians.append(median)
                    one_way[f"0->{peer}"], one_way[f"{peer}->0"] = fwd / 1e6, bwd / 1e6
                    duplex[f"0->{peer}"], duplex[f"{peer}->0"] = dout / 1e6, din / 1e6
                    probe = max(probe, size)
        if rank == 0:
            result = LinkMeasurement(max(rtts) * 1e3, one_way, duplex, probe, iface, max(medians) * 1e3)
            store.set(f"{rdv.PREFIX}link", json.dumps(result.to_dict()))
        dist.barrier()
        d = json.loads(store.get(f"{rdv.PREFIX}link"))
        rdv.share_results(store, rank, world_size, {"rank": rank}, timeout)
    finally:
        dist.destroy_process_group()
    return LinkMeasurement(
        d["rtt_ms"], d["one_way_MBps"], d["duplex_MBps"], d["probe_bytes"], iface, d["rtt_median_ms"]
    )
