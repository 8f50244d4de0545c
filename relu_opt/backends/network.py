"""Networks a private inference runs over, and the latency model every backend's figures rest on.

latency = compute + round trips x RTT + the busiest direction of any party's traffic / bandwidth per
direction (a full-duplex link). Round trips, not rounds: a round of the engine may wait for several
round trips of the link (a 2-party Gloo all-reduce waits for two; each backend counts them). The offline
part (a dealer's correlated randomness) is priced on the same link: its bytes, and the round trips the
parties wait for its answers while they compute.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relu_opt.errors import ConfigError


@dataclass(frozen=True)
class Network:
    """A network profile: round-trip time, and bandwidth in each direction of a full-duplex link."""

    name: str
    rtt_s: float
    bandwidth_Bps: float  # per direction

    def transfer_s(self, sent: Sequence[float], received: Sequence[float]) -> float:
        """Return the seconds the link needs to carry every party's traffic: both directions carry data
        at once, so the busiest direction of any party sets the time (not the sum of both)."""
        return max([*sent, *received, 0.0]) / self.bandwidth_Bps

    def latency(self, compute_s: float, round_trips: float, sent: Sequence[float], received: Sequence[float]) -> float:
        """Return compute time + round trips x RTT + transfer time, in seconds (bytes per party per direction)."""
        return compute_s + round_trips * self.rtt_s + self.transfer_s(sent, received)

    def communication_s(self, round_trips: float, nbytes: float) -> float:
        """Return the seconds of `round_trips` and of a byte count per party with both directions added
        (half goes each way on a full-duplex link), without compute: what a cost model prices."""
        return self.latency(0.0, round_trips, [nbytes / 2], [nbytes / 2])

    def with_offline_s(self, online_s: float, offline_bytes: float, round_trips: float) -> float:
        """Return an online latency plus the offline traffic on the same link: `offline_bytes` in the
        direction that carries them (from the dealer) and the round trips waited for its answers."""
        return online_s + round_trips * self.rtt_s + offline_bytes / self.bandwidth_Bps

    def to_dict(self) -> dict:
        """Return the JSON form reports use."""
        return {"rtt_ms": self.rtt_s * 1e3, "bandwidth_MBps": self.bandwidth_Bps / 1e6}


LAN = Network("lan", 0.5e-3, 1e9)
WAN = Network("wan", 40e-3, 100e6)
NAMED = {"lan": LAN, "wan": WAN}


def parse_network(name: str, text: str) -> Network:
    """Return a Network from 'RTT_MS,MB_PER_S' (e.g. '40,100'), or from 'lan' / 'wan'; ValueError with the
    accepted forms otherwise (a negative, zero bandwidth or non-finite value included)."""
    if not isinstance(text, str):
        raise ConfigError(f"--{name} {text!r} must be RTT_MS,MB_PER_S, e.g. 40,100, or lan / wan")
    if text in NAMED:
        return NAMED[text]
    try:
        rtt, bw = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--{name} '{text}' must be RTT_MS,MB_PER_S, e.g. 40,100, or lan / wan") from None
    if not (rtt >= 0 and bw > 0) or rtt == float("inf") or bw == float("inf"):
        raise ConfigError(f"--{name} '{text}' needs a round-trip time >= 0 and a bandwidth > 0, e.g. 40,100")
    return Network(name, rtt / 1e3, bw * 1e6)


def load_link(text: str) -> Network:
    """Return the Network of `--link`: 'RTT_MS,MB_PER_S' or a JSON file `relu-opt link --json` wrote."""
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        try:
            d = json.loads(path.read_text())
            net = Network("link", float(d["rtt_ms"]) / 1e3, float(d["bandwidth_MBps"]) * 1e6)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"--link {text} is not a JSON file written by `relu-opt link --json`; give it or RTT_MS,MB_PER_S"
            ) from None
        if not (0 <= net.rtt_s < float("inf") and 0 < net.bandwidth_Bps < float("inf")):
            raise ConfigError(f"--link {text} holds a negative RTT or a bandwidth <= 0; measure it again")
        return net
    return parse_network("link", text)
