"""Pricing: which backend, dealer, party count and network a plan is priced for, and where its cost model
is cached. One object goes to the selector, the optimizer, the reports and the bench, so what is
selected is priced by the cost model of exactly what is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relu_opt.backends.base import DEFAULT_BACKEND, Backend, Dealer
from relu_opt.backends.network import Network, parse_network
from relu_opt.errors import ConfigError


@dataclass(frozen=True)
class Pricing:
    """What prices a plan: backend, its protocol (None = the backend's default), dealer (None = the
    backend's honest default), parties, the network the latency selector prices (lan, wan or
    RTT_MS,MB_PER_S) and the cost-model cache (None: the default)."""

    backend: str = DEFAULT_BACKEND
    dealer: str | None = None
    parties: int = 2
    network: str = "wan"
    cache: str | None = None
    protocol: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.parties, int) or isinstance(self.parties, bool) or self.parties < 2:
            raise ConfigError(f"--parties {self.parties!r} must be a whole number of at least 2")
        if self.cache is not None:
            from relu_opt.validation import check_output_dir

            check_output_dir(self.cache, "--cache-dir")
        engine = self.engine()  # an unknown backend fails here, with the choices
        if self.protocol is not None and self.protocol not in engine.protocols:
            if not engine.protocols:
                raise ConfigError(f"--protocol is not for --backend {self.backend} (it has one protocol); leave it out")
            raise ConfigError(
                f"--protocol {self.protocol} is not a protocol of --backend {self.backend}; choose "
                + ", ".join(engine.protocols)
            )
        self.dealer_info()
        self.net()
        engine.validate(self)

    @property
    def protocol_name(self) -> str | None:
        """Return the protocol measured with: the given one or the backend's default (None for one-protocol engines)."""
        return self.protocol or self.engine().default_protocol

    def engine(self) -> Backend:
        """Return the Backend object."""
        from relu_opt.backends import get_backend

        return get_backend(self.backend)

    def dealer_info(self) -> Dealer:
        """Return the Dealer this pricing measures with."""
        return self.engine().dealer(self.dealer, self.protocol_name)

    @property
    def dealer_name(self) -> str:
        return self.dealer_info().name

    @property
    def insecure(self) -> str | None:
        """Return the INSECURE label when the dealer breaks the threat model, else None."""
        return self.dealer_info().label

    def net(self) -> Network:
        """Return the Network the latency selector prices."""
        try:
            return parse_network("network", self.network)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def cache_dir(self) -> Path:
        from relu_opt.cache import cache_dir

        return Path(self.cache) if self.cache else cache_dir()

    def key(self) -> dict:
        """Return what identifies these prices (not the cache folder): for keys of cached work."""
        key = {"backend": self.backend, "dealer": self.dealer_name, "parties": self.parties}
        return key | ({"protocol": self.protocol_name} if self.protocol_name else {})

    def describe(self) -> str:
        """Return one line naming what prices a plan, e.g. "crypten, 2 parties, dealer third-party"."""
        dealer = "no dealer" if self.dealer_name == "none" else f"dealer {self.dealer_name}"
        text = f"{self.engine().describe(self)}, {self.parties} parties, {dealer}"
        return text + (f" ({self.insecure})" if self.insecure else "")

    def cost_model(self, measure: bool = True, timeout: float = 300, note: Callable[[str], None] | None = None):
        """Return the cost model for these prices: the cached one, else (with `measure`) measured once
        under the backend with real parties and cached; None when none is cached and `measure` is off. Of
        several ranks (relu_opt.distributed), rank 0 loads or measures it and hands it to the others."""
        from relu_opt import distributed

        return distributed.on_main(lambda: self._cost_model(measure, timeout, note))

    def _cost_model(self, measure: bool, timeout: float, note: Callable[[str], None] | None):
        engine = self.engine()
        cached = engine.load_cost_model(self, note)
        if not measure:
            return None if cached is None else cached.frozen()
        if cached is not None:
            return cached
        from relu_opt.validation import check_output_dir

        check_output_dir(self.cache_dir(), "--cache-dir" if self.cache else "the cache folder ($RELU_OPT_CACHE)")
        if note is not None:
            note(f"note: measuring the {engine.title} cost model once ({self.describe()}; cached for later runs)")
        return engine.calibrate(self, timeout=timeout)
