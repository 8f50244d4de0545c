"""Parties on separate hosts: interface choice, rendezvous errors, traffic per direction, the latency
model, and (as root with ip and tc) two network namespaces joined by a bandwidth-shaped link."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relu_opt.backends import Network, Pricing, load_link
from relu_opt.backends import rendezvous as rdv
from relu_opt.backends.crypten.convert import crypten_onnx
from relu_opt.backends.crypten.launch import free_port
from relu_opt.backends.crypten.traffic import TrafficCounter
from relu_opt.models import create_model
from relu_opt.passes.pi import prepare_for_pi

ROOT = Path(__file__).parent.parent
X = torch.randn(1, 1, 28, 28)


def _shaped_link():
    spec = importlib.util.spec_from_file_location("shaped_link", ROOT / "benchmarks" / "shaped_link.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeComm:
    """The communicator methods CrypTen calls, doing nothing, for a party of `world_size`."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world_size

    def all_reduce(self, x, batched=False):
        return x

    def broadcast(self, x, src, batched=False):
        return x

    def send(self, x, dst):
        pass

    def recv(self, x, src=None):
        return x


@pytest.mark.parametrize("parties", [2, 3])
def test_traffic_is_booked_per_direction(parties):
    comm = FakeComm(0, parties)
    traffic = TrafficCounter(comm)
    comm.all_reduce(torch.zeros(1000, dtype=torch.long))  # 8000 bytes, ring all-reduce
    comm.all_reduce([torch.zeros(500, dtype=torch.long), torch.zeros(500, dtype=torch.long)], batched=True)
    ring = 2 * (parties - 1) / parties * 8000
    assert traffic.sent == traffic.received == 2 * int(ring)
    comm.broadcast(torch.zeros(10, dtype=torch.long), 0)  # this party is the source
    comm.broadcast(torch.zeros(10, dtype=torch.long), 1)
    comm.send(torch.zeros(3, dtype=torch.int32), 1)
    assert traffic.sent == 2 * int(ring) + (parties - 1) * 80 + 12
    assert traffic.received == 2 * int(ring) + 80
    traffic.reset()
    assert traffic.sent == traffic.received == 0


def test_full_duplex_link_charges_the_busiest_direction_not_the_sum():
    net = Network("x", rtt_s=0.01, bandwidth_Bps=1e6)
    # party 0 sends 2 MB and receives 1 MB while party 1 does the opposite: 2 s on a full-duplex link
    assert net.transfer_s([2e6, 1e6], [1e6, 2e6]) == pytest.approx(2.0)
    assert net.latency(0.5, 10, [2e6, 1e6], [1e6, 2e6]) == pytest.approx(0.5 + 0.1 + 2.0)


def test_link_option_reads_numbers_or_a_link_measurement(tmp_path):
    assert load_link("40,100") == Network("link", 0.04, 100e6)
    f = tmp_path / "link.json"
    f.write_text(json.dumps({"rtt_ms": 2.0, "bandwidth_MBps": 5.5, "one_way_MBps": {}}))
    assert load_link(str(f)) == Network("link", 0.002, 5.5e6)
    with pytest.raises(ValueError, match="RTT_MS,MB_PER_S"):
        load_link("fast")
    with pytest.raises(ValueError, match="relu-opt link --json"):
        load_link(str(tmp_path / "missing.json"))


def _hash(model):
    return rdv.structure_hash(crypten_onnx(prepare_for_pi(model.eval(), X), X))


def test_structure_hash_ignores_weights_but_not_architecture():
    torch.manual_seed(1)
    a = _hash(create_model("small_cnn", in_channels=1))
    torch.manual_seed(2)
    b = _hash(create_model("small_cnn", in_channels=1))  # party 1 without --weights: other values
    c = _hash(create_model("small_cnn", in_channels=1, num_classes=5))
    assert a == b != c


def test_fingerprint_mismatches_are_one_line_and_name_the_fix():
    versions = Pricing().engine().versions()
    fp = rdv.fingerprint(2, {"command": "bench", "models": {"original": "aa", "floor": "bb"}, "runs": 3}, versions)
    assert rdv.mismatch(fp, json.loads(json.dumps(fp)), 0, 1) is None
    other = {**fp, "world_size": 3}
    assert "--world-size 3" in rdv.mismatch(fp, other, 0, 1)
    other = {**fp, "versions": {**fp["versions"], "crypten": "0.3.0"}}
    assert "party 1 runs crypten 0.3.0" in rdv.mismatch(fp, other, 0, 1)
    other = {**fp, "job": {**fp["job"], "models": {"original": "cc", "floor": "bb"}}}
    assert "model 'original' differs" in rdv.mismatch(fp, other, 0, 1)
    other = {**fp, "job": {**fp["job"], "models": {"original": "aa", "optimized": "dd", "floor": "bb"}}}
    assert "--optimized" in rdv.mismatch(fp, other, 0, 1)
    other = {**fp, "job": {**fp["job"], "runs": 1}}
    assert "runs = 1" in rdv.mismatch(fp, other, 0, 1)
    fp["job"]["dealer"] = "third-party"
    other = {**fp, "job": {**fp["job"], "dealer": "party0"}}
    assert rdv.mismatch(fp, other, 0, rdv.DEALER) == (
        "the dealer has --dealer party0 and party 0 has --dealer third-party; give every process the same "
        "--dealer (with party0, start no --role dealer)"
    )
    for why in [rdv.mismatch(fp, o, 0, 1) for o in ({**fp, "world_size": 3},)]:
        assert "\n" not in why


def test_interface_follows_the_route():
    assert rdv.route_to("127.0.0.1").ifname == "lo"
    assert rdv.route_to("localhost").is_local
    with pytest.raises(rdv.RendezvousError, match="--ifname nosuchif0 is not an interface"):
        rdv.bind_interface("127.0.0.1", "nosuchif0")


def test_busy_port_and_missing_party_0_are_clean_errors():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(rdv.RendezvousError, match=f"--master-port {port} is already in use"):
            rdv.open_store(0, "127.0.0.1", port, 2)
    with pytest.raises(rdv.RendezvousError, match="could not reach party 0 at 127.0.0.1:.* start party 0 first"):
        rdv.open_store(1, "127.0.0.1", free_port(), 1)
    with pytest.raises(rdv.RendezvousError):  # party 0 must host the store on one of its own addresses
        rdv.open_store(0, "192.0.2.1", free_port(), 1)


def test_a_rank_given_twice_is_refused():
    port = free_port()
    store = rdv.open_store(0, "127.0.0.1", port, 5)  # party 0's store, as party 0 opens it
    fp = rdv.fingerprint(2, {"command": "link"}, {"relu-opt": "0"})
    store.set(f"{rdv.PREFIX}fp/0", json.dumps(fp))
    store.set(f"{rdv.PREFIX}checked", "1")
    rdv.check_in(rdv.open_store(1, "127.0.0.1", port, 5), 1, fp, 5)
    with pytest.raises(rdv.RendezvousError, match="another party already joined as --rank 1"):
        rdv.check_in(rdv.open_store(1, "127.0.0.1", port, 5), 1, fp, 5)


def _two_parties(args_of, timeout=180, dealer=False):
    """Run `relu-opt ARGS` as party 0 and 1 (and the dealer, with `dealer`) on localhost; return each
    process's (exit code, stdout, stderr)."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    roles = [["--rank", "0"], ["--rank", "1"]] + ([["--role", "dealer"]] if dealer else [])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relu_opt.cli", *args_of(i), *role, "--master-port", port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, role in enumerate(roles)
    ]
    return [(p.returncode, *p.communicate(timeout=timeout)) for p in procs if p.wait(timeout=timeout) is not None]


@pytest.mark.slow
@pytest.mark.parties
def test_world_size_mismatch_stops_both_parties_with_one_line():
    results = _two_parties(lambda r: ["link", "--master-addr", "127.0.0.1", "--world-size", str(2 + r)], 60)
    for code, _, err in results:
        assert code == 2, err
        assert "party 1 was started with --world-size 3" in err or "party 0 was started with --world-size 2" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parties
def test_a_dealer_that_disagrees_stops_every_process_with_one_line():
    common = ["bench", "small_cnn", "--input-shape", "1,1,28,28", "--samples", "1", "--timeout", "60"]
    results = _two_parties(lambda i: [*common, "--world-size", "3" if i == 2 else "2"], 120, dealer=True)
    assert len(results) == 3
    for code, _, err in results:
        assert code == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the dealer was started with --world-size 3" in results[0][2]  # party 0 names the culprit


@pytest.mark.slow
@pytest.mark.parties
def test_different_models_stop_before_any_encrypted_work():
    common = ["bench", "small_cnn", "--input-shape", "1,1,28,28", "--world-size", "2", "--timeout", "60"]
    results = _two_parties(lambda r: [*common, "--num-classes", str(10 - 5 * r)], 120)
    for code, out, err in results:
        assert code == 2, err
        assert "model 'original' differs between party" in err and "Traceback" not in err
        assert "CrypTen, 2 parties" not in out


@pytest.mark.slow
@pytest.mark.parties
def test_two_parties_bench_one_query_at_a_time_and_must_agree_on_the_batch(tmp_path):
    common = ["bench", "small_cnn", "--input-shape", "1,1,28,28", "--world-size", "2", "--samples", "3"]
    results = _two_parties(lambda r: [*common, "--batch", str(1 + r), "--timeout", "60"], 120)
    for code, _, err in results:
        assert code == 2, err
        assert "has batch = " in err and "start both alike" in err and "Traceback" not in err
    args = [*common, "--batch", "1", "--runs", "1", "--warmup", "0", "--timeout", "120"]
    results = _two_parties(lambda r: [*args, "--json", str(tmp_path / f"{r}.json")], 240, dealer=True)
    for code, out, err in results[:2]:
        assert code == 0, err
        assert "batch 1 of 3 samples" in out
    d = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert d[0]["batch"] == d[1]["batch"] == 1 and d[0]["samples"] == 3
    assert d[0]["models"][0]["rounds"] == 3 * 9 + 4  # one query: the same rounds as any batch


@pytest.mark.slow
@pytest.mark.parties
def test_link_measures_the_local_link(tmp_path):
    results = _two_parties(lambda r: ["link", "--master-addr", "127.0.0.1", "--json", str(tmp_path / f"{r}.json")])
    for code, out, err in results:
        assert code == 0, err
        assert "MB/s per direction" in out
    m = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert m[0] == m[1] and m[0]["interface"] == "lo"
    assert set(m[0]["duplex_MBps"]) == {"0->1", "1->0"} and m[0]["bandwidth_MBps"] > 1 and m[0]["rtt_ms"] > 0


SHAPED_MBIT = 50


@pytest.mark.slow
@pytest.mark.parties
@pytest.mark.multihost
@pytest.mark.skipif(_shaped_link().available() is not None, reason="needs root with ip and tc")
def test_three_namespaces_on_a_shaped_link_match_the_latency_model(tmp_path):
    """Party 0, party 1 and the dealer each on a host of their own (network namespaces on a bridge), links
    shaped to 50 Mbit/s: the latency model with the dealer's traffic on the same link predicts the wall."""
    sl = _shaped_link()
    try:
        res = sl.measure_rate(SHAPED_MBIT, tmp_path, runs=2, nice=-5 if os.geteuid() == 0 else 0)
    finally:
        assert not any(ns.startswith("ro") and len(ns) == 12 for ns in _my_namespaces()), "namespaces left"
    rate = SHAPED_MBIT * 1e6 / 8 / 1e6  # MB/s each way
    link = res["link"]
    assert 0.85 * rate < link["bandwidth_MBps"] < 1.02 * rate  # measured, not assumed; TCP/IP costs a few %
    assert link["interface"].startswith("ro")  # the veth end, not lo
    for rank, (r, out) in enumerate(zip(res["bench"], res["stdout"])):
        assert "CrypTen, 2 parties, dealer third-party, batch 4" in out and f"party {rank} over ro" in out
        assert r["hosts"]["rank"] == rank and r["hosts"]["interface"].startswith("ro")
    assert "the dealer served the run over ro" in res["stdout"][2] and res["dealer"]["models"] == []
    assert res["bench"][0]["models"] == res["bench"][1]["models"]
    orig = next(m for m in res["bench"][0]["models"] if m["name"] == "original")
    assert orig["offline_requests"] == 31 and orig["offline_bytes"] > 1e6  # the dealer's triples crossed a link
    transfer = (max(orig["sent_per_party"]) + orig["offline_bytes"]) / (link["bandwidth_MBps"] * 1e6)
    assert transfer > 0.7 * orig["wall_s_median"]  # a model whose transfer dominates
    assert orig["predicted_total_s"] == pytest.approx(orig["wall_s_median"], rel=0.15)
    assert orig["predicted_s"] < 0.85 * orig["wall_s_median"]  # online alone leaves the dealer's part out


def _my_namespaces():
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    tag = f"ro{os.getpid() % 100000:05d}"
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(tag)]


def _delayed_link():
    spec = importlib.util.spec_from_file_location("delayed_link", ROOT / "benchmarks" / "delayed_link.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parties
@pytest.mark.multihost
@pytest.mark.skipif(_delayed_link().available() is not None, reason="needs root with ip, tc and ethtool")
def test_a_round_costs_the_round_trips_the_model_counts_on_a_delayed_link(tmp_path):
    """On hosts 20 ms apart (a user-space delaying hub): Gloo's collectives take the round trips the
    CrypTen backend books for them, and the latency model predicts the measured wall time of a bench with
    the dealer on a third host within 15%, where one round trip per round would be far below it."""
    from relu_opt.backends.crypten.traffic import REQUEST_ROUND_TRIPS, ROUND_TRIPS

    dl = _delayed_link()
    for world in (2, 3):
        measured = dl.collective_round_trips(10, world)
        assert 15 < measured["rtt_ms"] < 30
        for name in ("all_reduce", "all_gather", "broadcast"):
            assert measured[name] == pytest.approx(ROUND_TRIPS[name](world), abs=0.3), (world, name)
    res = dl.bench_on_delay(10, ["small_cnn", "--input-shape", "1,1,28,28"], tmp_path, runs=1)
    rtt = res["link"]["rtt_ms"] / 1e3
    for m in res["bench"]["models"]:  # original and floor
        assert m["round_trips"] == 2 * m["rounds"] and m["offline_round_trips"] == REQUEST_ROUND_TRIPS * m["rounds"]
        assert m["predicted_total_s"] == pytest.approx(m["wall_s_median"], rel=0.15), m["name"]
        one_per_round = m["compute_s"] + (m["rounds"] + m["offline_requests"]) * rtt
        assert one_per_round < 0.5 * m["wall_s_median"]  # the old model's round-trip term
    mine = f"dh{os.getpid() % 10000:04d}"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [ns for ns in names if ns.startswith(mine)]  # every namespace removed


@pytest.mark.slow
@pytest.mark.parties
@pytest.mark.multihost
@pytest.mark.skipif(importlib.util.find_spec("spu") is None, reason="SecretFlow SPU is not installed")
@pytest.mark.skipif(_shaped_link().available() is not None, reason="needs root with ip and tc")
def test_spu_parties_on_two_namespaces(tmp_path):
    """The SPU backend between two hosts (network namespaces on a bridge): each party started by the same
    command with its rank, meeting through the rendezvous, then over SPU's own link on the veth pair."""
    sl = _shaped_link()
    argv = ["bench", "small_cnn", "--input-shape", "1,1,28,28", "--samples", "2", "--batch", "1"]
    argv += ["--backend", "spu", "--timeout", "300", "--json", str(tmp_path / "{rank}.json")]
    try:
        with sl.Hosts(None, n=2) as hosts:
            before = hosts.tx_bytes(0)
            res = hosts.run_parties(argv, timeout=420)
            sent = hosts.tx_bytes(0) - before
    finally:
        assert not any(ns.startswith("ro") and len(ns) == 12 for ns in _my_namespaces()), "namespaces left"
    for rank, r in enumerate(res):
        assert r.returncode == 0, r.stdout[-2000:]
        assert "SPU CHEETAH, 2 parties, no dealer, batch 1 of 2 samples" in r.stdout
        assert f"party {rank} over ro" in r.stdout
    d = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert d[0]["models"] == d[1]["models"] and d[0]["backend"] == "spu"
    orig = d[0]["models"][0]
    # party 0's veth end carried at least what SPU counted party 0 sending: per model, the first forward
    # (setup + steady state) and one more (2 samples, one at a time)
    counted = sum(2 * m["sent_per_party"][0] + m["offline_sent_per_party"][0] for m in d[0]["models"])
    assert sent >= counted > 0 and orig["offline_bytes"] > 5e6


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.skipif(_shaped_link().available() is not None, reason="needs root with ip and tc")
def test_training_on_two_hosts_is_one_job(tmp_path):
    """Data-parallel training across two hosts (network namespaces on a bridge), each started by the same
    torchrun command with its --node-rank: the weights one process trains, written once, by node 0."""
    from tests.test_distributed import MLP

    sl = _shaped_link()
    (tmp_path / "mlp.py").write_text(MLP)
    train = ["train", f"{tmp_path / 'mlp.py'}:MLP", "--data", "digits", "--epochs", "3", "--lr", "0.05"]
    one = subprocess.run([sys.executable, "-m", "relu_opt", *train, "-o", tmp_path / "one.pt"], capture_output=True)
    assert one.returncode == 0, one.stderr
    port, env = str(29400 + os.getpid() % 500), {k: v for k, v in os.environ.items() if k not in sl._HIDDEN}
    env["OMP_NUM_THREADS"] = "1"
    try:
        with sl.Hosts(None, n=2) as hosts:
            procs = []
            for node, ns in enumerate(hosts.ns):
                launch = ["torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1"]
                launch += ["--master-addr", sl.ADDRS[0], "--master-port", port]
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", *launch, "-m", "relu_opt", *map(str, train)]
                procs.append(subprocess.Popen([*cmd, "-o", str(tmp_path / "two.pt")], env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
                time.sleep(0.2)
            res = [p.communicate(timeout=300) for p in procs]
    finally:
        assert not any(ns.startswith("ro") and len(ns) == 12 for ns in _my_namespaces()), "namespaces left"
    for p, (_, err) in zip(procs, res):
        assert p.returncode == 0, err[-2000:]
    assert "val accuracy" in res[0][0] and "val accuracy" not in res[1][0]  # only rank 0 prints
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # gloo over the veth pair: one job
