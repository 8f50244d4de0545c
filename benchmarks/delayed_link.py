"""Check the latency model's round-trip term on a delayed link between parties and dealer on separate hosts.

This kernel has no netem, so delay comes from user space: N host namespaces (10.78.0.1 party 0,
10.78.0.2 party 1, 10.78.0.3 the dealer, ...) each joined by a veth pair to one relay namespace, where a
hub copies every Ethernet frame to the port that owns its destination (flooding broadcasts and unknown
addresses) after holding it for --delay-ms (each direction, so the round-trip time is about twice that).
Checksum and segmentation offloads are off (ethtool), since relayed frames must carry real checksums. The
idea is the one of ../shared/tools/delayline.py, generalised to a hub of N ports.

What it measures, per delay:
- each torch.distributed Gloo collective CrypTen uses, in round trips of the link (a tiny tensor, 2 and 3
  processes): how many round trips one counted round costs;
- `relu-opt link`, then `relu-opt bench MODEL --samples 1 --batch 1 --link link.json` for each model, the
  parties and the dealer each on its own host: predicted (online, and with the dealer's traffic) against
  the measured wall time.

Needs root, `ip`, `tc` and `ethtool`. Writes benchmarks/results/delayed_link.{json,md}.

    sudo python benchmarks/delayed_link.py --delays 10 20 --models small_cnn
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ETH_P_ALL = 0x0003
PREFIX = "10.78.0."
# variables that would hide the bug this checks (processes must find their interface themselves)
_HIDDEN = ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def available() -> str | None:
    """Return why delayed hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, raw sockets)"
    for tool in ("ip", "tc", "ethtool"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install iproute2 ethtool)"
    try:
        with DelayedHosts(2, 1.0):
            pass
    except RuntimeError as exc:
        return str(exc)
    return None


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def hub(ports: list[str], delay_s: float) -> None:
    """Relay frames between `ports` (interface names), each held `delay_s`, like a learning switch."""
    socks = []
    for name in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((name, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
        socks.append(s)
    owner: dict[bytes, int] = {}  # MAC address -> port
    queues = [[] for _ in ports]
    conds = [threading.Condition() for _ in ports]
    seq = [0]

    def sender(i: int) -> None:
        q, cv = queues[i], conds[i]
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, _, frame = q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    cv.wait(wait)
                    continue
                heapq.heappop(q)
            socks[i].send(frame)

    def receiver(i: int) -> None:
        while True:
            frame, addr = socks[i].recvfrom(65536)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            owner[frame[6:12]] = i
            dst = owner.get(frame[0:6])
            targets = [dst] if dst is not None and dst != i else [j for j in range(len(ports)) if j != i]
            due = time.monotonic() + delay_s
            for j in targets:
                with conds[j]:
                    seq[0] += 1
                    heapq.heappush(queues[j], (due, seq[0], frame))
                    conds[j].notify()

    for i in range(len(ports)):
        threading.Thread(target=sender, args=(i,), daemon=True).start()
    for i in range(1, len(ports)):
        threading.Thread(target=receiver, args=(i,), daemon=True).start()
    receiver(0)


class DelayedHosts:
    """N host namespaces on a delaying hub (one relay namespace); optionally each host's end shaped by tbf
    to `mbit`. Names are unique per instance; everything is removed on exit, whatever happened."""

    def __init__(self, n: int, delay_ms: float, mbit: float | None = None) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(16**3):03x}"
        self.ns = [f"dh{tag}{i}" for i in range(n)]
        self.dev = [f"dh{tag}h{i}" for i in range(n)]
        self.port = [f"dh{tag}p{i}" for i in range(n)]
        self.relay_ns = f"dh{tag}r"
        self.addrs = [f"{PREFIX}{i + 1}" for i in range(n)]
        self.delay_ms, self.mbit = delay_ms, mbit
        self.relay: subprocess.Popen | None = None

    def __enter__(self) -> DelayedHosts:
        off = ["tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"]
        try:
            _sh("ip", "netns", "add", self.relay_ns)
            _sh("ip", "-n", self.relay_ns, "link", "set", "lo", "up")
            for ns, dev, port, addr in zip(self.ns, self.dev, self.port, self.addrs):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.relay_ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "-n", ns, "link", "set", dev, "mtu", "9000", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _sh("ip", "-n", self.relay_ns, "link", "set", port, "mtu", "65000", "promisc", "on", "up")
                _sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, *off)
                _sh("ip", "netns", "exec", self.relay_ns, "ethtool", "-K", port, *off)
                if self.mbit:
                    tbf = ["tbf", "rate", f"{self.mbit:g}mbit", "burst", "64kb", "latency", "400ms"]
                    _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf)
            hub_cmd = [sys.executable, __file__, "--hub", str(self.delay_ms), *self.port]
            self.relay = subprocess.Popen(
                ["ip", "netns", "exec", self.relay_ns, *hub_cmd],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            time.sleep(0.3)
            if self.relay.poll() is not None:
                raise RuntimeError("the delaying hub did not start (raw sockets need root)")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.relay is not None and self.relay.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.relay.pid, signal.SIGKILL)
            self.relay.wait()
        for ns in [*self.ns, self.relay_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def run(self, commands: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
        """Run commands[i] (argv after `python`) on host i at once, with a clean environment; return each
        process's result (stdout and stderr together)."""
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN}
        env.setdefault("OMP_NUM_THREADS", "1")
        procs = []
        with tempfile.TemporaryDirectory(prefix="relu-opt-delayed-") as tmp:
            try:
                for i, argv in enumerate(commands):
                    out = open(Path(tmp) / f"{i}.out", "w+")  # noqa: SIM115 (closed below)
                    cmd = ["ip", "netns", "exec", self.ns[i], sys.executable, *argv]
                    procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), out))
                    time.sleep(0.2)  # the host that listens first, as a user would start it
                deadline = time.monotonic() + timeout
                while any(p.poll() is None for p, _ in procs):  # one that fails stops the others
                    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
                        break
                    time.sleep(0.2)
                results = []
                for p, out in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                    out.seek(0)
                    results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), ""))
                return results
            finally:
                for p, out in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                    out.close()

    def relu_opt(self, argvs: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
        """Run `relu-opt ARGVS[i] --master-addr <host 0> --master-port P` on host i."""
        port = str(29400 + random.randrange(500))
        tail = ["--master-addr", self.addrs[0], "--master-port", port]
        return self.run([["-m", "relu_opt.cli", *argv, *tail] for argv in argvs], timeout)


COLLECTIVES = r"""
import os, sys, json, time, torch, torch.distributed as dist
rank, world, addr, port, ifname = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port, GLOO_SOCKET_IFNAME=ifname)
dist.init_process_group("gloo", rank=rank, world_size=world)
t = torch.zeros(4, dtype=torch.long)
out = {}
def timed(name, fn, n=8):
    fn()
    ts = []
    for _ in range(n):
        dist.barrier(); s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    out[name] = min(ts)
def pingpong():
    if rank == 0:
        dist.send(t, 1); dist.recv(t, 1)
    elif rank == 1:
        dist.recv(t, 0); dist.send(t, 0)
timed("pingpong", pingpong)
timed("all_reduce", lambda: dist.all_reduce(t))
def two():
    for w in (dist.all_reduce(t, async_op=True), dist.all_reduce(t.clone(), async_op=True)):
        w.wait()
timed("all_reduce, two at once", two)
timed("all_gather", lambda: dist.all_gather([torch.zeros_like(t) for _ in range(world)], t))
timed("broadcast", lambda: dist.broadcast(t, 0))
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


def collective_round_trips(delay_ms: float, world: int) -> dict[str, float]:
    """Return each collective's time on a delayed link in round trips (its time / a ping-pong's)."""
    with DelayedHosts(world, delay_ms) as hosts:
        port = str(29900 + random.randrange(90))
        cmds = [["-c", COLLECTIVES, str(r), str(world), hosts.addrs[0], port, hosts.dev[r]] for r in range(world)]
        res = hosts.run(cmds, 120)
    line = next((ln for ln in res[0].stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the collectives probe failed: {res[0].stdout[-800:]}")
    times = json.loads(line[len("RESULT ") :])
    rtt = times["pingpong"]
    return {"rtt_ms": rtt * 1e3, **{k: round(v / rtt, 2) for k, v in times.items() if k != "pingpong"}}


def bench_on_delay(
    delay_ms: float,
    model: list[str],
    workdir: Path,
    runs: int = 3,
    dealer: bool = True,
    mbit: float | None = None,
) -> dict:
    """Return `relu-opt link` and party 0's `relu-opt bench MODEL --samples 1 --batch 1 --link ...` on
    delayed hosts (links also shaped to `mbit`; the dealer on a third host when `dealer`, else --dealer
    party0)."""
    link_json, bench_json = workdir / f"link_{delay_ms:g}.json", workdir / f"bench_{delay_ms:g}.json"
    with DelayedHosts(3 if dealer else 2, delay_ms, mbit) as hosts:
        link = hosts.relu_opt([["link", "--json", str(link_json), "--rank", str(r)] for r in (0, 1)], 300)
        if any(r.returncode for r in link):
            raise RuntimeError(f"relu-opt link failed: {link[0].stdout[-800:]}")
        argv = ["bench", *model, "--samples", "1", "--batch", "1", "--runs", str(runs), "--warmup", "1"]
        argv += ["--link", str(link_json), "--timeout", "900", "--world-size", "2"]
        if not dealer:
            argv += ["--dealer", "party0"]
        parties = [[*argv, "--rank", "0", "--json", str(bench_json)], [*argv, "--rank", "1"]]
        bench = hosts.relu_opt(parties + ([[*argv, "--role", "dealer"]] if dealer else []), 1200)
        if any(r.returncode for r in bench):
            raise RuntimeError(f"relu-opt bench failed: {[r.stdout[-600:] for r in bench]}")
    return {"link": json.loads(link_json.read_text()), "bench": json.loads(bench_json.read_text())}


def _rows(delay_ms: float, mbit: float | None, label: str, res: dict) -> list[dict]:
    link = res["link"]
    rows = []
    for m in res["bench"]["models"]:
        rows.append(
            {
                "delay_ms": delay_ms,
                "mbit": mbit,
                "model": f"{label} {m['name']}",
                "dealer": res["bench"]["dealer"],
                "rtt_ms": link["rtt_ms"],
                "MBps": link["bandwidth_MBps"],
                "rounds": m["rounds"],
                "round_trips": m.get("round_trips"),
                "requests": m["offline_requests"],
                "offline_round_trips": m.get("offline_round_trips"),
                "compute_s": m["compute_s"],
                "wall_s": m["wall_s_median"],
                "predicted_s": m["predicted_s"],
                "predicted_total_s": m["predicted_total_s"],
            }
        )
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--hub":
        hub(sys.argv[3:], float(sys.argv[2]) / 1e3)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delays", type=float, nargs="+", default=[10, 20], help="one-way delay in ms")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["small_cnn --input-shape 1,1,28,28"],
        help="bench arguments per model, e.g. 'resnet20 --pretrained --optimized OUT --data fashion-mnist'",
    )
    ap.add_argument("--labels", nargs="+", default=None, help="a name per --models entry")
    ap.add_argument("--mbit", type=float, default=None, help="also shape every host's link to this rate")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-collectives", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "delayed_link")
    args = ap.parse_args()
    why = available()
    if why:
        sys.exit(f"delayed_link: {why}")
    labels = args.labels or [m.split()[0] for m in args.models]
    results: dict = {"cpus": os.cpu_count(), "collectives": [], "rows": []}
    path = Path(f"{args.out}.json")
    with contextlib.suppress(OSError, ValueError):
        results = {**results, **json.loads(path.read_text())}
    with tempfile.TemporaryDirectory(prefix="relu-opt-delayed-") as tmp:
        for delay in args.delays:
            if not args.no_collectives and args.mbit is None:
                for world in (2, 3):
                    row = {"delay_ms": delay, "processes": world, **collective_round_trips(delay, world)}
                    results["collectives"] = [
                        r for r in results["collectives"] if (r["delay_ms"], r["processes"]) != (delay, world)
                    ] + [row]
                    print(json.dumps(row), flush=True)
            for spec, label in zip(args.models, labels):
                res = bench_on_delay(delay, spec.split(), Path(tmp), args.runs, mbit=args.mbit)
                rows = _rows(delay, args.mbit, label, res)
                keys = {(r["delay_ms"], r.get("mbit"), r["model"]) for r in rows}
                results["rows"] = [r for r in results["rows"] if (r["delay_ms"], r.get("mbit"), r["model"]) not in keys]
                results["rows"] += rows
                for r in rows:
                    print(json.dumps(r), flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2) + "\n")  # after every model: a long run resumes
    Path(f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    """Return the tables of a results dict."""
    lines = [
        "Collectives on a delayed link, in round trips of the link (time / a ping-pong's, tiny tensors):",
        "",
        "| one-way delay | processes | RTT ms | all_reduce | two all_reduce at once | all_gather | broadcast |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(results["collectives"], key=lambda r: (r["delay_ms"], r["processes"])):
        lines.append(
            f"| {c['delay_ms']:g} ms | {c['processes']} | {c['rtt_ms']:.1f} | {c['all_reduce']:.2f} | "
            f"{c['all_reduce, two at once']:.2f} | {c['all_gather']:.2f} | {c['broadcast']:.2f} |"
        )
    lines += [
        "",
        "`relu-opt bench MODEL --samples 1 --batch 1 --link link.json`, parties and dealer on separate delayed"
        " hosts; predicted online = compute + round trips x RTT + bytes / bandwidth; + offline adds the dealer's"
        " round trips and bytes:",
        "",
        "| one-way delay | tbf | model | dealer | link RTT ms, MB/s | rounds | round trips | dealer requests |"
        " dealer round trips | compute s | measured wall s | predicted online s | predicted + offline s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["rows"], key=lambda r: (r.get("mbit") or 0, r["delay_ms"], r["model"])):
        predicted = r["predicted_total_s"] if r["dealer"] != "party0" else r["predicted_s"]
        rate = f"{r['mbit']:g} Mbit/s" if r.get("mbit") else "-"
        lines.append(
            f"| {r['delay_ms']:g} ms | {rate} | {r['model']} | {r['dealer']} | {r['rtt_ms']:.1f}, {r['MBps']:.0f} | "
            f"{r['rounds']} | {r['round_trips']} | {r['requests']} | {r['offline_round_trips']} | "
            f"{r['compute_s']:.2f} | {r['wall_s']:.3f} | {r['predicted_s']:.3f} | {r['predicted_total_s']:.3f} | "
            f"{predicted / r['wall_s'] - 1:+.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
