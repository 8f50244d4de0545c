"""What party 0 can learn of the client's input from its own view: a reconstruction attack.

Party 0 runs the bench's own party code while every value it draws (the provider's random ring
elements), receives (each message and broadcast) and opens (each Beaver reveal) is recorded; then, for
every opened tensor of the input's shape and every recorded tensor of that shape, the attack decodes
opened + recorded (and opened alone) from CrypTen's fixed point and keeps the candidate closest to the
input. With party 0 as the dealer (CrypTen's TFP) it draws each triple's `a` in the clear and opens
x - a, so one candidate is the input itself; with a dealer of its own (TTP) party 0 holds only a
random share of `a`, and no candidate comes close.

Run as `python -m relu_opt.backends.crypten.privacy JOB.json` by `attack_input`, never by a bench.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from relu_opt import atomic
from relu_opt.backends.crypten import party
from relu_opt.private_tmp import private_dir

PRECISION_BITS = 16  # CrypTen's default fixed-point encoding


@dataclass(frozen=True)
class ViewAttack:
    """The best reconstruction of the input from party 0's view, and how far it is from the input."""

    dealer: str
    error: float  # max abs difference between the best candidate and the input (inf: no candidate)
    candidates: int  # how many candidates the attack tried
    recorded: int  # tensors of the input's shape party 0 drew, received or opened
    guess: list[float]

    @property
    def recovered(self) -> bool:
        """Whether the input was rebuilt to within fixed-point rounding."""
        return self.error < 1e-3


class _View:
    """Records the tensors of `shape` that this party draws, receives and opens."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.drawn: list[torch.Tensor] = []
        self.received: list[torch.Tensor] = []
        self.opened: list[torch.Tensor] = []

    def keep(self, into: list, value) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if torch.is_tensor(v) and tuple(v.shape) == self.shape and v.dtype == torch.long:
                into.append(v.detach().clone())

    def install(self) -> None:
        """Wrap the providers' random draws, the communicator's receives and the Beaver reveals."""
        import crypten.communicator as comm
        import crypten.mpc.provider.tfp_provider as tfp
        import crypten.mpc.provider.ttp_provider as ttp
        from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

        for module in (tfp, ttp):
            for name in ("generate_random_ring_element", "generate_kbit_random_tensor"):
                setattr(module, name, self._recording(getattr(module, name), self.drawn))
        reveal = ArithmeticSharedTensor.reveal_batch
        ArithmeticSharedTensor.reveal_batch = staticmethod(self._recording(reveal, self.opened))
        self._comm = comm

    def watch_comm(self) -> None:
        """Wrap what the communicator hands this party (after crypten.init made it)."""
        c = self._comm.get()
        for name in ("recv", "broadcast", "recv_obj", "all_reduce"):
            setattr(c, name, self._recording(getattr(c, name), self.received))

    def _recording(self, fn, into: list):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.keep(into, out)
            return out

        return recorded

    def to_json(self) -> dict:
        return {k: [t.tolist() for t in getattr(self, k)] for k in ("drawn", "received", "opened")}


def reconstruct(view: dict, secret: torch.Tensor) -> tuple[float, int, int, torch.Tensor | None]:
    """Return (error, candidates tried, tensors recorded, best guess) of the attack on a recorded view."""
    shape = tuple(secret.shape)
    opened = [torch.tensor(v, dtype=torch.long).reshape(shape) for v in view["opened"]]
    known = [torch.tensor(v, dtype=torch.long).reshape(shape) for v in view["drawn"] + view["received"]]
    best, guess, tried = float("inf"), None, 0
    for e in opened:
        for cand in [e, *(e + k for k in known), *(e - k for k in known)]:
            tried += 1
            decoded = cand.double() / 2**PRECISION_BITS
            err = float((decoded - secret.double()).abs().max())
            if err < best:
                best, guess = err, decoded
    return best, tried, len(opened) + len(known), guess


def attack_input(
    models: Sequence[tuple[str, fx.GraphModule]], x: torch.Tensor, dealer: str, timeout: float = 180
) -> ViewAttack:
    """Run the prepared models as the bench does (2 parties, and the dealer when `dealer` has one) on the
    client's input `x`, record party 0's view, and return the best reconstruction of `x` from it."""
    from relu_opt.backends.crypten.launch import launch_local
    from relu_opt.backends.crypten.measure import write_models

    with private_dir("privacy") as tmp:
        work = Path(tmp)
        specs, _, _ = write_models(models, x, work)
        torch.save(x.clone(), work / "inputs.pt")
        job = party.PartyJob(0, 2, "127.0.0.1", 0, specs, list(x.shape), "", str(work / "inputs.pt"))
        job = party.PartyJob(**{**job.__dict__, "warmup": 0, "runs": 1, "timeout": timeout, "dealer": dealer})
        results = launch_local(job, work, timeout, module=__name__)
    error, tried, recorded, guess = reconstruct(results[0]["view"], x)
    return ViewAttack(dealer, error, tried, recorded, [] if guess is None else guess.reshape(-1).tolist())


def main(argv: list[str] | None = None) -> int:
    """Entry point of one process of the attack: party 0 records its view, the others run as in a bench."""
    argv = sys.argv[1:] if argv is None else argv
    job = party.PartyJob.load(argv[0])
    party.start_watchdog(job)
    try:
        view = None
        if job.role == "party" and job.rank == 0:
            from relu_opt.backends.crypten.compat import import_crypten

            import_crypten()
            view = _View(job.input_shape)
            view.install()
            original_init = party.init_crypten

            def init_and_watch(*args, **kwargs):
                crypten = original_init(*args, **kwargs)
                view.watch_comm()
                return crypten

            party.init_crypten = init_and_watch
        result = party.run(job)
        if view is not None:
            result["view"] = view.to_json()
        atomic.write_json(job.result, result)
    except BaseException as exc:
        party.write_error(job.result, job.rank, f"{party.who(job)} failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
