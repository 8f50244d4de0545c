"""Parties on separate hosts: pick the interface that reaches party 0, meet through one TCPStore, and
check that every party (and the dealer, when there is one) runs the same job before any encrypted work
starts.

Party 0 hosts the store on --master-addr:--master-port; torch.distributed's env:// rendezvous later
reuses that same server (multi-tenant TCPStore), so one port carries the fingerprints, the Gloo
handshake and the final exchange of results. The dealer checks in as rank = world size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import onnx

from relu_opt.errors import BackendError, last_line

if TYPE_CHECKING:
    from torch.distributed import Store, TCPStore

PREFIX = "relu-opt/"
DEALER = "dealer"  # the dealer's name in the store (its torch.distributed rank is the world size)


class RendezvousError(BackendError):
    """The parties could not meet: party 0 unreachable, port in use, or the parties disagree."""


@dataclass(frozen=True)
class Route:
    """How this host reaches an address: the interface and this host's address on it."""

    address: str  # the peer address, resolved to an IP
    ifname: str
    local_ip: str
    is_local: bool  # the address belongs to this host


def _resolve(addr: str) -> str:
    try:
        infos = socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        msg = f"--master-addr '{addr}' does not resolve to an IPv4 address; give party 0's IP"
        raise RendezvousError(msg) from None
    return infos[0][4][0]


def _interface_of(ip: str) -> str | None:
    """Return the interface that holds the address `ip` on this host, or None."""
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        for line in out.splitlines():  # "2: eth0    inet 10.0.0.2/24 brd ... scope global eth0 ..."
            parts = line.split()
            if len(parts) > 3 and parts[2] == "inet" and parts[3].split("/")[0] == ip:
                return parts[1].split("@")[0]
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def route_to(addr: str) -> Route:
    """Return the Route this host takes to `addr` (the kernel's choice, as `ip route get` shows it)."""
    ip = _resolve(addr)
    if ip.startswith("127."):
        return Route(ip, _interface_of(ip) or "lo", ip, True)
    owner = _interface_of(ip)
    if owner is not None:  # party 0's own address: bind to the interface that holds it, not to lo
        return Route(ip, owner, ip, True)
    dev = src = None
    if shutil.which("ip"):
        res = subprocess.run(["ip", "-o", "route", "get", ip], capture_output=True, text=True)
        words = res.stdout.split()
        for key, val in zip(words, words[1:]):
            if key == "dev" and dev is None:
                dev = val
            elif key == "src" and src is None:
                src = val
        if res.returncode != 0:
            raise RendezvousError(
                f"no route from this host to --master-addr {addr} ({res.stderr.strip() or 'unreachable'}); "
                "check the address and this host's network"
            )
    if src is None:  # no `ip`: ask the kernel through an unconnected UDP socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((ip, 9))
            except OSError as exc:
                raise RendezvousError(f"no route from this host to --master-addr {addr} ({exc.strerror})") from None
            src = s.getsockname()[0]
    dev = dev or _interface_of(src)
    if dev is None:
        raise RendezvousError(f"cannot tell which interface reaches --master-addr {addr}; pass --ifname")
    return Route(ip, dev, src, False)


def bind_interface(master_addr: str, ifname: str | None = None) -> str:
    """Make this process's Gloo sockets use the interface that reaches `master_addr` (or `ifname`);
    returns the interface name. Sets GLOO_SOCKET_IFNAME for this process only."""
    if ifname:
        have = {name for _, name in socket.if_nameindex()}
        for name in ifname.split(","):  # Gloo takes a comma-separated list
            if name not in have:
                raise RendezvousError(f"--ifname {name} is not an interface of this host; see `ip link`")
        chosen = ifname
    else:
        chosen = route_to(master_addr).ifname
    os.environ["GLOO_SOCKET_IFNAME"] = chosen
    return chosen


def structure_hash(onnx_bytes: bytes) -> str:
    """Return a hash of an ONNX graph's structure: ops, wiring, shapes and integer constants (the
    public plan), not its float weights, which only party 0 holds."""
    mp = onnx.load_from_string(onnx_bytes)
    h = hashlib.sha256()
    g = mp.graph
    for init in sorted(g.initializer, key=lambda t: t.name):
        h.update(f"{init.name}:{init.data_type}:{list(init.dims)}".encode())
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            h.update(onnx.numpy_helper.to_array(init).tobytes())
    for node in g.node:
        h.update(f"{node.op_type}:{list(node.input)}:{list(node.output)}".encode())
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                h.update(f"{a.name}:{a.t.data_type}:{list(a.t.dims)}".encode())
            else:
                h.update(f"{a.name}:{onnx.helper.get_attribute_value(a)}".encode())
    for v in list(g.input) + list(g.output):
        h.update(str(v).encode())
    return h.hexdigest()[:16]


def fingerprint(world_size: int, job: dict, versions: dict[str, str]) -> dict:
    """Return what every process must agree on: versions, world size (computing parties) and the job
    (models, shapes, runs, dealer)."""
    return {"world_size": world_size, "versions": versions, "job": job}


def mismatch(mine: dict, theirs: dict, my_rank: int | str, their_rank: int | str) -> str | None:
    """Return a one-line description of how two fingerprints differ, or None when they agree."""
    me, them = _name(my_rank), _name(their_rank)
    if mine["world_size"] != theirs["world_size"]:
        return (
            f"{them} was started with --world-size {theirs['world_size']} and {me} "
            f"with {mine['world_size']}; give every party the same --world-size"
        )
    for k, v in mine["versions"].items():
        if theirs["versions"].get(k) != v:
            return (
                f"{them} runs {k} {theirs['versions'].get(k)} and {me} runs {v}; "
                "install the same versions on every host"
            )
    a, b = mine["job"], theirs["job"]
    if a.get("command") != b.get("command"):
        return f"{them} runs `{b.get('command')}` and {me} runs `{a.get('command')}`"
    ma, mb = a.get("models", {}), b.get("models", {})
    if list(ma) != list(mb):
        return (
            f"{them} runs the models {', '.join(mb)} and {me} runs {', '.join(ma)}; "
            "give both the same --optimized folder (or none)"
        )
    for name in ma:
        if ma[name] != mb[name]:
            return (
                f"model '{name}' differs between {them} and {me} (structure "
                f"{mb[name]} vs {ma[name]}); run both with the same MODEL, --optimized folder and --input-shape"
            )
    if a.get("dealer") != b.get("dealer"):
        return (
            f"{them} has --dealer {b.get('dealer')} and {me} has --dealer {a.get('dealer')}; give every process the "
            "same --dealer (with party0, start no --role dealer)"
        )
    hints = {"batch": "--batch (or --samples)", "input_shape": "--samples and --input-shape", "runs": "--runs"}
    for k in sorted(set(a) | set(b)):
        if k not in ("models", "dealer_process") and a.get(k) != b.get(k):
            what = f" ({hints[k]})" if k in hints else ""
            return f"{them} has {k} = {b.get(k)} and {me} has {a.get(k)}{what}; start both alike"
    return None


def _is_addr_in_use(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "address already in use" in text or f"errno: {errno.EADDRINUSE}" in text or "eaddrinuse" in text


def open_store(rank: int | str, master_addr: str, master_port: int, timeout: float) -> TCPStore:
    """Return the TCPStore of this run: hosted by party 0 (multi-tenant, so torch.distributed reuses
    it), a client for every other party and the dealer. Raises RendezvousError for a busy port or an
    unreachable party 0."""
    from torch.distributed import TCPStore

    wait = timedelta(seconds=timeout)
    if rank == 0:
        if not route_to(master_addr).is_local:
            raise RendezvousError(
                f"--master-addr {master_addr} is not an address of this host, but party 0 hosts the "
                "rendezvous there; give party 0 its own address"
            )
        try:
            return TCPStore(master_addr, master_port, None, True, wait, wait_for_workers=False, multi_tenant=True)
        except Exception as exc:
            if _is_addr_in_use(exc):
                raise RendezvousError(
                    f"--master-port {master_port} is already in use on this host; pick a free port for every party"
                ) from None
            raise RendezvousError(f"party 0 cannot listen on {master_addr}:{master_port}: {last_line(exc)}") from None
    # wait for party 0's port ourselves: torch's own retries print C++ stack traces when they give up
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        try:
            with socket.create_connection((master_addr, master_port), timeout=max(0.1, min(2.0, timeout))):
                break
        except OSError as exc:
            last = exc.strerror or ("no answer" if isinstance(exc, TimeoutError) else type(exc).__name__)
        if time.monotonic() > deadline:
            raise RendezvousError(
                f"could not reach party 0 at {master_addr}:{master_port} within {timeout:g}s ({last}); "
                "start party 0 first, and check --master-addr, --master-port and the firewall"
            )
        time.sleep(0.2)
    try:
        return TCPStore(master_addr, master_port, None, False, wait)
    except Exception as exc:
        raise RendezvousError(f"party 0 at {master_addr}:{master_port} did not answer: {last_line(exc)}") from None


def _name(member: int | str) -> str:
    """Return how messages name a member of the run: "party N" or "the dealer"."""
    return "the dealer" if member == DEALER else f"party {member}"


def check_in(store: Store, rank: int | str, fp: dict, timeout: float) -> None:
    """Publish this process's fingerprint and compare it with the others' (party 0 sees every party's and,
    when its job has a dealer process, the dealer's; the others see party 0's); raises RendezvousError on
    a duplicate rank or dealer, a missing member or any disagreement. `rank` is DEALER for the dealer."""
    world_size = fp["world_size"]
    if rank != DEALER and not 0 <= rank < world_size:
        raise RendezvousError(f"--rank {rank} is outside 0..{world_size - 1} for --world-size {world_size}")
    if store.add(f"{PREFIX}rank/{rank}", 1) > 1:
        if rank == DEALER:
            raise RendezvousError("another dealer already joined this run; start one dealer (--role dealer)")
        raise RendezvousError(f"another party already joined as --rank {rank}; give each party its own rank")
    store.set(f"{PREFIX}fp/{rank}", json.dumps(fp))
    others = _others(fp) if rank == 0 else [0]
    for r in others:
        key = f"{PREFIX}fp/{r}"
        if not _poll(store, key, timeout):
            how = "--role dealer" if r == DEALER else f"--rank {r}"
            raise RendezvousError(
                f"{_name(r)} did not join {fp['job'].get('command', 'the run')} within {timeout:g}s; "
                f"start it with {how} and the same --master-addr and --master-port"
            )
        why = mismatch(fp, json.loads(store.get(key)), rank, r)
        if why:
            store.set(f"{PREFIX}error/{rank}", why)
            if rank == 0:
                _linger(store, len(others), min(timeout, 10))
            else:
                store.add(f"{PREFIX}done", 1)
            raise RendezvousError(why)
    if rank == 0 and others:
        store.set(f"{PREFIX}checked", "1")
    elif rank != 0:
        try:
            _wait_verdict(store, timeout)
        finally:
            with contextlib.suppress(Exception):  # party 0 keeps the store up until every member has read it
                store.add(f"{PREFIX}done", 1)


def _poll(store, key: str, timeout: float) -> bool:
    """Return whether `key` appears in the store within `timeout` (polled: torch's own wait prints C++
    warnings when it times out)."""
    deadline = time.monotonic() + timeout
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _others(fp: dict) -> list[int | str]:
    """Return the members party 0 waits for: the other parties, and the dealer when the job has one."""
    return [*range(1, fp["world_size"]), *([DEALER] if fp["job"].get("dealer_process") else [])]


def _linger(store, others: int, timeout: float) -> None:
    """Keep party 0's store up until every other member has left the check (read party 0's verdict, or
    found its own disagreement), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while store.add(f"{PREFIX}done", 0) < others and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_verdict(store, timeout: float) -> None:
    """Wait until party 0 has compared every fingerprint (or reported why not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if store.check([f"{PREFIX}checked"]):
                return
            if store.check([f"{PREFIX}error/0"]):
                raise RendezvousError(store.get(f"{PREFIX}error/0").decode())
        except RendezvousError:
            raise
        except Exception:
            raise RendezvousError(
                "party 0 left before confirming the others (it found a disagreement or failed; its own message "
                "names it)"
            ) from None
        time.sleep(0.05)
    raise RendezvousError(
        f"party 0 did not confirm the others within {timeout:g}s: a party or the dealer did not join "
        "(party 0's message names which)"
    )


def share_results(store: Store, rank: int, world_size: int, result: dict, timeout: float) -> list[dict]:
    """Publish this party's result, return every party's (by rank), and keep party 0's store up until
    every party has read them."""
    store.set(f"{PREFIX}result/{rank}", json.dumps(result))
    keys = [f"{PREFIX}result/{r}" for r in range(world_size)]
    store.wait(keys, timedelta(seconds=timeout))
    results = [json.loads(store.get(k)) for k in keys]
    store.add(f"{PREFIX}read", 1)
    if rank == 0:
        deadline = time.monotonic() + timeout
        while store.add(f"{PREFIX}read", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    return results


def store_alive(master_addr: str, master_port: int) -> bool:
    """Return whether party 0's store still accepts connections (touching a dead one makes torch
    print a C++ stack trace)."""
    try:
        with socket.create_connection((master_addr, master_port), timeout=2):
            return True
    except OSError:
        return False


def report_failure(store: Store, rank: int | str, message: str) -> None:
    """Best effort: leave this party's error in the store for the others to name."""
    with contextlib.suppress(Exception):
        store.set(f"{PREFIX}error/{rank}", message)


def peer_failure(store: Store, rank: int | str, world_size: int) -> str | None:
    """Return another member's reported error (a party's or the dealer's), if one is in the store."""
    for r in [*range(world_size), DEALER]:
        if r == rank:
            continue
        with contextlib.suppress(Exception):
            if store.check([f"{PREFIX}error/{r}"]):
                return store.get(f"{PREFIX}error/{r}").decode()
    return None
