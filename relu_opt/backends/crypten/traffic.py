"""Count what one CrypTen party sends and receives, per direction, online (to the other parties) and
offline (to and from the dealer) apart.

CrypTen's own counter (`comm.get_communication_stats()`) adds both directions of an all-reduce into one
number, so `bytes / bandwidth` charges a full-duplex link twice; and under the TTP provider it also
counts party 0's requests to the dealer as rounds. This counter wraps the communicator's collectives and
books each one as the Gloo algorithm moves it: for P parties a ring all-reduce of N bytes sends and
receives 2(P-1)/P x N per party (N each way for two parties), an all-gather (P-1) x N, a broadcast N
per receiver, and so on. A call whose peer is the dealer (rank P) is booked offline, and what CrypTen
counted for it is kept apart, so the online rounds and bytes are the parties' own.

It also books the round trips of the link each call waits for, which is what a round costs in latency.
Measured on a delayed link (benchmarks/delayed_link.py, results/delayed_link.md), in round trips of the
link: Gloo's all-reduce takes P of them (2.00 with 2 processes, 3.00 with 3: a receiver tells the sender
it is ready before data moves), an all-gather P - 1 (1.01, 2.00), a broadcast 1 (0.99, 1.00). CrypTen
counts one round per all-reduce, so a 2-party round costs two round trips. A request to the dealer
(party 0 sends it as two messages, the dealer answers with two, then broadcasts the triple, each receive
posted only once the message before it arrived) costs four.
"""

from __future__ import annotations

import functools
import pickle
import time

import torch


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.nelement() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x if t is not None)
    return 0


# Where each call names its peer: (position, keyword) of dst/src.
_PEER = {
    "send": (1, "dst"),
    "isend": (1, "dst"),
    "recv": (1, "src"),
    "irecv": (1, "src"),
    "broadcast": (1, "src"),
    "reduce": (1, "dst"),
    "gather": (1, "dst"),
    "scatter": (1, "src"),
    "send_obj": (1, "dst"),
    "recv_obj": (0, "src"),
    "broadcast_obj": (1, "src"),
}


ROUND_TRIPS = {
    "all_reduce": lambda p: p,
    "all_gather": lambda p: p - 1,
    "broadcast": lambda p: 1,
    "reduce": lambda p: 1,
    "gather": lambda p: 1,
    "scatter": lambda p: 1,
    "send": lambda p: 0.5,
    "isend": lambda p: 0.5,
    "recv": lambda p: 0.5,
    "irecv": lambda p: 0.5,
    "broadcast_obj": lambda p: 2,
}
REQUEST_ROUND_TRIPS = 4  # one request to the dealer; measured 4.15 to 4.3 per request on a delayed link


class TrafficCounter:
    """Bytes this party sent and received online and offline, the link's round trips it waited for online
    and offline, dealer requests, seconds inside communication, and what CrypTen's own counter booked for
    the dealer, since `reset()`."""

    METHODS = (
        "send",
        "recv",
        "isend",
        "irecv",
        "all_reduce",
        "all_gather",
        "broadcast",
        "reduce",
        "gather",
        "scatter",
        "send_obj",
        "recv_obj",
        "broadcast_obj",
        "barrier",
    )

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()  # the computing parties; the dealer's rank is this
        self.reset()
        for name in self.METHODS:
            original = getattr(comm, name, None)
            if original is not None:
                setattr(comm, name, self._wrap(name, original))

    def reset(self) -> None:
        """Start counting from zero."""
        self.sent = self.received = 0
        self.offline_sent = self.offline_received = 0
        self.requests = 0
        self.round_trips = self.offline_round_trips = 0.0
        self.comm_s = 0.0
        self.dealer_rounds = 0  # what CrypTen's counter booked for calls to and from the dealer
        self.dealer_bytes = 0.0

    def _peer(self, name: str, args: tuple, kwargs: dict):
        pos, key = _PEER.get(name, (None, None))
        if pos is None:
            return None
        return args[pos] if len(args) > pos else kwargs.get(key)

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            dealer = self._peer(name, args, kwargs) == self.world_size
            before = (getattr(self.comm, "comm_rounds", 0), getattr(self.comm, "comm_bytes", 0))
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.comm_s += time.perf_counter() - start
            sent, received = self._book(name, args, kwargs, result)
            if dealer:
                self.offline_sent += int(sent)
                self.offline_received += int(received)
                if name == "send_obj":  # one request message per triple asked for
                    self.requests += 1
                    self.offline_round_trips += REQUEST_ROUND_TRIPS
                self.dealer_rounds += getattr(self.comm, "comm_rounds", 0) - before[0]
                self.dealer_bytes += getattr(self.comm, "comm_bytes", 0) - before[1]
            else:
                self.sent += int(sent)
                self.received += int(received)
                if name != "barrier" and self.world_size > 1:
                    self.round_trips += ROUND_TRIPS.get(name, lambda p: 1)(self.world_size)
            return result

        return counted

    def _book(self, name: str, args: tuple, kwargs: dict, result) -> tuple[float, float]:
        """Return (bytes sent, bytes received) by this party for one call."""
        p, me = self.world_size, self.rank
        if p < 2 or name == "barrier":
            return 0, 0
        first = args[0] if args else None
        if name in ("send", "isend"):
            return _nbytes(first), 0
        if name in ("recv", "irecv"):
            return 0, _nbytes(first)
        if name == "all_reduce":
            n = 2 * (p - 1) / p * _nbytes(first)
            return n, n
        if name == "all_gather":
            n = (p - 1) * _nbytes(first)
            return n, n
        src = self._peer(name, args, kwargs)
        if name == "broadcast":
            n = _nbytes(first)
            return ((p - 1) * n, 0) if src == me else (0, n)
        if name in ("reduce", "gather"):
            n = _nbytes(first)
            return (0, (p - 1) * n) if src == me else (n, 0)
        if name == "scatter":
            if src == me:
                return sum(_nbytes(t) for i, t in enumerate(first) if i != me), 0
            return 0, _nbytes(result)
        if name == "send_obj":
            return len(pickle.dumps(first)) + 4, 0
        if name == "recv_obj":
            return 0, len(pickle.dumps(result)) + 4
        if name == "broadcast_obj":
            n = len(pickle.dumps(result)) + 4
            return ((p - 1) * n, 0) if src == me else (0, n)
        return 0, 0
