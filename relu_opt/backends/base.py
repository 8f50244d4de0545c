"""The one interface every private-inference engine implements, and the records that cross it.

Modelled on ONNX Runtime's execution providers: a backend says how it prepares a graph, what it cannot
run (with the fix, before any party starts), how it launches real parties and dealers, what it measures
(rounds, bytes per party per direction, online and offline) and how it prices a graph. Callers hold a
Backend object and never the engine's names.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from relu_opt.errors import ConfigError

if TYPE_CHECKING:
    from relu_opt.backends.pricing import Pricing

INSECURE_LABEL = "INSECURE: party 0 can read the input"


def package_version(name: str, missing: str = "missing") -> str:
    """Return the installed version of package `name`, or `missing`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return missing


DEFAULT_BACKEND = "crypten"  # what every command runs on unless told otherwise


@dataclass(frozen=True)
class Dealer:
    """Who hands out a backend's correlated randomness (Beaver triples and the like).

    Threat model: party 0 owns the weights, party 1 the input, both semi-honest. A dealer that is one of
    them breaks the input's secrecy; `insecure` says so and every figure measured with it carries
    INSECURE_LABEL."""

    name: str
    description: str
    extra_process: bool = False  # a process (or host) of its own besides the computing parties
    insecure: bool = False

    @property
    def label(self) -> str | None:
        return INSECURE_LABEL if self.insecure else None


@dataclass(frozen=True)
class Cost:
    """One forward as a cost model predicts it: online rounds (the engine's count), the round trips of the
    link they wait for (what latency pays), bytes per party (the engine's count, both directions added),
    and the offline part: a dealer's bytes, the requests made to it and the round trips they wait for."""

    rounds: float = 0.0
    bytes: float = 0.0
    offline_bytes: float = 0.0
    requests: float = 0.0
    round_trips: float = 0.0
    offline_round_trips: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))


class CostModel(ABC):
    """Prices a prepared graph (shape-propagated, as the backend's `prepare` returns it) under one backend,
    dealer and party count."""

    parties: int

    @abstractmethod
    def node_cost(self, gm: fx.GraphModule, node: fx.Node, batch: int = 1) -> Cost:
        """Return what one node of a prepared graph costs at `batch`."""

    def cost(self, gm: fx.GraphModule, batch: int = 1) -> Cost:
        """Return what a whole prepared graph costs at `batch`."""
        total = Cost()
        for node in gm.graph.nodes:
            total = total + self.node_cost(gm, node, batch)
        return total

    @abstractmethod
    def element_bytes(self, kind: str) -> float:
        """Return the bytes per party one element of a non-linear `kind` costs when it is kept."""

    @abstractmethod
    def to_dict(self) -> dict:
        """Return the JSON form the cache holds."""

    def linear_bytes(self, gm: fx.GraphModule, batch: int = 1) -> float | None:
        """Return the modeled bytes of the linear layers alone, or None where the model does not tell them apart."""
        return None

    def frozen(self) -> CostModel:
        """Return this cost model unable to measure anything more (for a caller that must not start parties)."""
        return self


@dataclass(frozen=True)
class Measurement:
    """One model's encrypted forward as the parties measured it (`batch` samples at once).

    Online: what the computing parties exchange with each other. Offline: what they exchange with the
    dealer (for a dealer inside a party, nothing crosses a link, and nothing is counted)."""

    name: str
    relu_elements: int  # non-linear elements per sample, counted on the graph the engine ran
    rounds: int  # online rounds (or messages, for engines that count those), party to party
    bytes_per_party: list[int]  # the engine's own online count per party (both directions added)
    wall_s_runs: list[float]
    conversion_s: float
    encryption_s: float
    logits: np.ndarray
    sent_per_party: list[int] = field(default_factory=list)  # online bytes each party sends per forward
    received_per_party: list[int] = field(default_factory=list)  # online bytes each party receives
    compute_s: float = 0.0  # median over runs of the slowest party's time outside communication
    comparisons: int = 0  # secure comparisons per sample (ReLU, ReLU6, max-pool, ...)
    offline_sent_per_party: list[int] = field(default_factory=list)  # bytes each party sends the dealer
    offline_received_per_party: list[int] = field(default_factory=list)  # bytes each party gets from it
    offline_requests: int = 0  # requests to the dealer per forward
    round_trips: float = 0.0  # round trips of the link the parties wait for online (a round may cost several)
    offline_round_trips: float = 0.0  # round trips waited for the dealer's answers (or a protocol's setup)
    sends_per_party: list[int] = field(default_factory=list)  # messages each party sends (engines that count them)
    linear_sent_per_party: list[int] = field(default_factory=list)  # of sent_per_party: in linear layers

    @property
    def wall_s_median(self) -> float:
        return statistics.median(self.wall_s_runs)


@dataclass(frozen=True)
class HostRole:
    """One process of a run whose parties are on separate hosts."""

    role: str  # "party" or "dealer"
    rank: int  # the party's rank; the dealer's is the number of parties
    world_size: int  # computing parties
    master_addr: str
    master_port: int
    ifname: str | None = None

    @property
    def is_dealer(self) -> bool:
        return self.role == "dealer"

    @classmethod
    def from_options(
        cls,
        role: str | None,
        rank: int | None,
        world_size: int | None = None,
        parties: int = 2,
        master_addr: str | None = None,
        master_port: int | None = None,
        ifname: str | None = None,
    ) -> HostRole | None:
        """Return the HostRole of a separate-hosts run from role and rank (None: neither, a local run);
        raise ConfigError on a combination that does not fit, or host options a local run would ignore."""
        from relu_opt import validation
        from relu_opt.errors import ConfigError

        if role is None and rank is None:
            given = [
                n
                for n, v in (
                    ("--world-size", world_size),
                    ("--master-addr", master_addr),
                    ("--master-port", master_port),
                    ("--ifname", ifname),
                )
                if v is not None
            ]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for parties on separate hosts (with "
                    "--rank or --role dealer); leave them out for a local bench, or use --parties"
                )
            return None
        if world_size is not None and parties not in (2, world_size):
            raise ConfigError(
                f"--parties {parties} and --world-size {world_size} disagree; on separate hosts give --world-size"
            )
        world_size = world_size or parties
        validation.check_choice("--role", role or "party", ("party", "dealer"))
        validation.check_int("--world-size", world_size, 2)
        validation.check_int("--master-port", master_port, 1, 65535)
        if master_addr is not None and not master_addr.strip():
            raise ConfigError("--master-addr is empty; give party 0's address, e.g. --master-addr 10.0.0.1")
        addr, port = master_addr or "127.0.0.1", master_port or 29500
        if role == "dealer":
            if rank is not None:
                raise ConfigError("--role dealer takes no --rank (the dealer is not a party); leave --rank out")
            return cls("dealer", world_size, world_size, addr, port, ifname)
        if rank is None:
            raise ConfigError("--role party needs --rank N (0 owns the model, 1 the input)")
        validation.check_int("--rank", rank, 0, world_size - 1)
        return cls("party", rank, world_size, addr, port, ifname)


@dataclass(frozen=True)
class PartyRun:
    """What a process of a separate-hosts run ends with: every party's measurements (shared at the end;
    the dealer gets none) and the interface it used."""

    measurements: list[Measurement]
    interface: str


class Backend(ABC):
    """A private-inference engine behind one interface."""

    name: str = ""  # how users pick it: --backend NAME
    title: str = ""  # how reports name it
    dealers: dict[str, Dealer] = {}
    default_dealer: str = ""
    protocols: tuple[str, ...] = ()  # what --protocol chooses among; () for an engine with one protocol
    default_samples: int = 8  # test samples `relu-opt run` benches unless told
    default_protocol: str | None = None

    def dealer(self, name: str | None = None, protocol: str | None = None) -> Dealer:
        """Return the Dealer `name` under `protocol` (the honest default when None); ConfigError naming the
        choices."""
        name = self.default_dealer if name is None else name
        if name not in self.dealers:
            raise ConfigError(
                f"--dealer '{name}' is not a dealer of the {self.name} backend; choose "
                + ", ".join(f"{k} ({d.description})" for k, d in self.dealers.items())
            )
        return self.dealers[name]

    def validate(self, pricing: Pricing) -> None:
        """Raise ConfigError when `pricing` (parties, protocol) does not fit this engine or it is not installed."""
        return None

    def describe(self, pricing: Pricing) -> str:
        """Return how reports name the engine and protocol `pricing` measures with."""
        return self.title

    # ---- graphs ---------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(
        self, model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), public_coeffs: bool = False
    ) -> fx.GraphModule:
        """Return the eval-mode, shape-propagated GraphModule this engine runs for `model`."""

    def floor(self, prepared: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
        """Return the linear floor of a prepared graph: every non-linear op an identity."""
        from relu_opt.passes.pi import linear_floor

        return linear_floor(prepared, example)

    @abstractmethod
    def check(self, prepared: fx.GraphModule, example: torch.Tensor) -> None:
        """Raise BackendError naming the first op this engine cannot run, with the fix."""

    def warnings(self, prepared: fx.GraphModule, x: torch.Tensor) -> list[str]:
        """Return warnings about running `prepared` on `x` (e.g. values near the fixed-point range)."""
        return []

    # ---- parties --------------------------------------------------------------------------------------
    @abstractmethod
    def measure(
        self,
        models: Sequence[tuple[str, fx.GraphModule]],
        x: torch.Tensor,
        pricing: Pricing,
        runs: int = 3,
        warmup: int = 1,
        timeout: float = 300,
        batch: int | None = None,
    ) -> list[Measurement]:
        """Run prepared models as real parties (and dealer) on this machine; return one Measurement each."""

    @abstractmethod
    def run_host(
        self,
        models: Sequence[tuple[str, fx.GraphModule]],
        x: torch.Tensor,
        pricing: Pricing,
        host: HostRole,
        runs: int = 3,
        warmup: int = 1,
        timeout: float = 300,
        batch: int | None = None,
    ) -> PartyRun:
        """Run this process as one party (or the dealer) of a run whose parties are on separate hosts."""

    def measure_link(self, host: HostRole, timeout: float = 120):
        """Return a LinkMeasurement between party 0 and the other parties over this engine's transport."""
        from relu_opt.backends.link import measure_link

        return measure_link(
            host.rank, host.world_size, host.master_addr, host.master_port, timeout, host.ifname, self.versions()
        )

    # ---- prices ---------------------------------------------------------------------------------------
    @abstractmethod
    def load_cost_model(self, pricing: Pricing, note=None) -> CostModel | None:
        """Return the cost model cached for `pricing`, or None (nothing is measured); a damaged cache file is
        removed, and `note` (a callable taking one line) told."""

    @abstractmethod
    def calibrate(self, pricing: Pricing, timeout: float = 300, refresh: bool = False) -> CostModel:
        """Return the cost model for `pricing`, measuring the calibration suite once and caching it."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Return the versions every party must share (relu-opt, torch, the engine)."""
