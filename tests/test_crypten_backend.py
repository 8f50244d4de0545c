"""Encrypted inference with real CrypTen parties on localhost."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from relu_opt.activations import MaskedReLU, Poly
from relu_opt.backends.crypten.calibration import calibrate
from relu_opt.backends.crypten.convert import check_supported, crypten_onnx, prepare
from relu_opt.backends.crypten.measure import fixed_point_warnings
from relu_opt.encrypted import bench
from relu_opt.errors import BackendError
from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.onnx_export import to_onnx_bytes
from relu_opt.passes.pi import prepare_for_pi
from relu_opt.passes.replace import relu_nodes, replace_sites
from relu_opt.private_tmp import private_root
from tests.crypten_helpers import measure_models as measure

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _trained_like(model):
    """Give BatchNorm layers non-trivial statistics, as a trained model has."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def _channel_masked(model, keep_every: int | None, replacement=None):
    """Every ReLU site keeps channels 0, k, 2k, ... (none when k is None); the rest get `replacement(C)`
    (identity when None)."""
    gm = propagate_shapes(trace(model), X[:1])
    new = {}
    for n in relu_nodes(gm):
        c = n.meta["tensor_meta"].shape[1]
        mask = torch.zeros(c, 1, 1)
        if keep_every:
            mask[::keep_every] = 1
        new[n.name] = MaskedReLU(mask, replacement(c) if replacement else None)
    return replace_sites(gm, new)


@pytest.mark.slow
@pytest.mark.parties
def test_two_party_forward_matches_plaintext():
    model = _trained_like(create_model("small_cnn", in_channels=1))
    labels = torch.tensor([3, 7])
    r = bench(model, X, labels, runs=1, warmup=0, timeout=120)
    orig, floor = r.models
    assert (orig.name, floor.name) == ("original", "floor")
    assert orig.relu_elements == 16 * 28 * 28 + 32 * 14 * 14 + 64 * 7 * 7
    assert orig.rounds == 3 * 9 + 4  # three ReLU sites, three convs and the head
    assert floor.relu_elements == 0 and floor.rounds == 4
    assert orig.top1_agreement == 1.0 and floor.top1_agreement == 1.0
    scale = model(X).abs().max().item()
    assert orig.max_abs_err < 1e-2 * scale
    assert orig.accuracy == orig.plain_accuracy
    wan = r.networks["wan"]
    assert r.ratios["floor"]["rounds"] == pytest.approx(4 / 31)
    # the default dealer is a process of its own: party 0 asks it for one triple per round, party 1 never
    assert (r.dealer, r.insecure) == ("third-party", None)
    assert orig.offline_requests == 31 and orig.offline_received_per_party[1] == 0
    assert orig.offline_received_per_party[0] > 8 * orig.relu_elements * len(X)  # triples at least this big
    # a 2-party round waits for two round trips of the link, a request to the dealer for four
    assert (orig.round_trips, orig.offline_round_trips) == (2 * 31, 4 * 31)
    assert orig.wan_total_s == pytest.approx(
        orig.wan_s + 4 * 31 * wan["rtt_ms"] / 1e3 + orig.offline_bytes / (wan["bandwidth_MBps"] * 1e6)
    )
    assert len(orig.bytes_per_party) == 2 and 0 < orig.compute_s < orig.wall_s_median
    # two parties: each all-reduce of N bytes moves N each way; CrypTen's count adds both directions
    assert orig.sent_per_party == orig.received_per_party == [b // 2 for b in orig.bytes_per_party]
    assert orig.wan_s == pytest.approx(
        orig.compute_s + 2 * 31 * wan["rtt_ms"] / 1e3 + max(orig.sent_per_party) / (wan["bandwidth_MBps"] * 1e6)
    )
    d = r.to_dict()
    assert {"parties", "batch", "models", "ratios"} <= set(d)
    assert (d["dealer"], d["insecure"]) == ("third-party", None)
    assert {
        "offline_bytes",
        "offline_requests",
        "wan_total_s",
        "name",
        "relu_elements",
        "rounds",
        "bytes_per_party",
        "wall_s_median",
        "wall_s_runs",
        "max_abs_err",
        "top1_agreement",
        "lan_s",
        "wan_s",
    } <= set(d["models"][0])


@pytest.mark.slow
@pytest.mark.parties
def test_batches_of_one_cost_one_query_and_cover_every_sample():
    model = _trained_like(create_model("small_cnn", in_channels=1))
    x = torch.cat([X, X.flip(0), X * 0.5])  # 6 samples
    labels = torch.tensor([3, 7, 7, 3, 3, 7])
    one = bench(model, x, labels, runs=1, warmup=0, timeout=120, batch=1)
    whole = bench(model, x[:2], runs=1, warmup=0, timeout=120)
    assert (one.batch, one.samples, one.to_dict()["samples"]) == (1, 6, 6)
    for q, w in zip(one.models, whole.models):
        assert q.rounds == w.rounds  # rounds do not depend on the batch
        # bytes grow with the batch, but not in proportion: each forward also opens the masked weights
        assert w.bytes_per_party[0] / 2 < q.bytes_per_party[0] < w.bytes_per_party[0]
    orig = one.models[0]
    assert orig.top1_agreement == 1.0 and orig.accuracy == orig.plain_accuracy  # over all 6 samples
    assert orig.predicted_rounds is None  # no cost model given


@pytest.mark.slow
@pytest.mark.parties
def test_partial_relu_pays_only_for_kept_elements():
    model = _trained_like(create_model("resnet20", in_channels=1))
    half = _channel_masked(model, 2)
    full, halved, floor = measure(
        [("full", model), ("half", half), ("floor", _channel_masked(model, None))], X, runs=1, warmup=0, timeout=300
    )
    assert halved.relu_elements * 2 == full.relu_elements == 144_256
    relu_bytes = full.bytes_per_party[0] - floor.bytes_per_party[0]
    half_bytes = halved.bytes_per_party[0] - floor.bytes_per_party[0]
    assert half_bytes / relu_bytes == pytest.approx(0.5, abs=0.02)
    assert halved.rounds == full.rounds  # same number of ReLU layers, each on fewer elements


@pytest.mark.slow
@pytest.mark.parties
def test_cost_model_predicts_measured_rounds_and_bytes():
    cost = calibrate(2, timeout=120)
    assert cost.rounds_per_op["relu"] == pytest.approx(9, abs=0.01)
    assert cost.bytes_per_element["relu"] == pytest.approx(464, rel=0.01)
    assert cost.requests_per_op["relu"] == pytest.approx(9, abs=0.01)  # one triple from the dealer per round
    model = _trained_like(create_model("resnet20", in_channels=1))
    poly_half = _channel_masked(model, 2, lambda c: Poly(torch.randn(3, c) * 0.1))
    models = [("small", create_model("small_cnn", in_channels=1)), ("poly_half", poly_half)]
    for (_, net), m in zip(models, measure(models, X, runs=1, warmup=0, timeout=300)):
        predicted = cost.cost(prepare(net, X[:1]), batch=len(X))
        assert predicted.rounds == pytest.approx(m.rounds, abs=1)
        assert predicted.bytes == pytest.approx(m.bytes_per_party[0], rel=0.03)
        assert predicted.requests == pytest.approx(m.offline_requests, abs=1)
        assert predicted.round_trips == pytest.approx(m.round_trips, abs=2)
        assert predicted.offline_bytes == pytest.approx(
            sum(m.offline_sent_per_party) + sum(m.offline_received_per_party), rel=0.05
        )


def test_polynomials_export_without_relu_and_unsupported_ops_are_named():
    model = _channel_masked(
        _trained_like(create_model("small_cnn", in_channels=1)), None, lambda c: Poly(torch.randn(3, c))
    )
    mp = onnx.load_from_string(crypten_onnx(prepare_for_pi(model, X[:1]), X[:1]))
    ops = {n.op_type for n in mp.graph.node}
    assert "Relu" not in ops and ("Pow" in ops or "Mul" in ops) and "Identity" not in ops  # Horner: Mul

    class Odd(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2.0)

    bad = onnx.load_from_string(to_onnx_bytes(Odd(), X[:1]))
    with pytest.raises(BackendError, match=r"CrypTen cannot run ONNX op 'Resize' \(node '.*Resize.*'\)"):
        check_supported(bad)


def test_fixed_point_warning_names_the_site():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1e4)
    warnings = fixed_point_warnings(trace(model), torch.ones(1, 4))
    assert warnings[0].startswith("site '_0' reaches |x| = 4e+04") and "fixed-point limit" in warnings[0]
    assert fixed_point_warnings(trace(model), torch.ones(1, 4) * 1e-6) == []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children_of(parent: int, pattern: str) -> list[int]:
    """Return the processes whose parent is `parent` and whose command line holds `pattern`: only the
    test's own bench's parties, never another bench's on the same machine."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name may hold spaces
        if ppid == parent and pattern in _cmdline(int(d.name)):
            pids.append(int(d.name))
    return pids


def _party_pids(parent: int, deadline: float) -> dict[int | str, int]:
    """Wait until `parent` has started both parties and the dealer; return {rank or "dealer": pid}."""
    while time.monotonic() < deadline:
        found = {}
        for pid in _children_of(parent, "relu_opt.backends.crypten.party"):
            for member, stem in ((0, "party0"), (1, "party1"), ("dealer", "dealer")):
                if f"{stem}.job.json" in _cmdline(pid):
                    found[member] = pid
        if len(found) == 3:
            return found
        time.sleep(0.05)
    raise AssertionError("the bench never started both parties and the dealer")


@pytest.mark.slow
@pytest.mark.parties
@pytest.mark.parametrize("member", [1, "dealer"])
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_failed_party_or_dealer_stops_the_bench(how, member, tmp_path):
    timeout = 25
    env = {**os.environ, "RELU_OPT_CACHE": str(tmp_path)}
    # Warm the cost-model cache so the processes below are the bench's own.
    subprocess.run(
        [sys.executable, "-c", "from relu_opt.backends.crypten.calibration import calibrate; calibrate(2)"],
        env=env,
        check=True,
        capture_output=True,
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relu_opt.cli", "bench", "resnet20", "--runs", "50", "--timeout", str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    members = _party_pids(proc.pid, start + 60)
    pid = members[member]
    stem = "dealer" if member == "dealer" else f"party{member}"
    while not list(private_root().glob(f"bench-{proc.pid}-*/{stem}.json.alive")):  # its watchdog runs
        assert time.monotonic() < start + 90
        time.sleep(0.1)
    time.sleep(1)
    os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        _, stderr = proc.communicate(timeout=timeout + 30)
    finally:
        if how == "hang":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    who = "the dealer" if member == "dealer" else f"party {member}"
    if how == "kill":
        assert f"{who} was killed by signal 9" in stderr
    else:  # the frozen process is named (party 0 may notice first that the dealer does not answer)
        assert f"{who} stopped responding" in stderr or (
            member == "dealer" and "for one answer of the dealer; the dealer hung" in stderr
        ), stderr
    assert len(stderr.strip().splitlines()) <= 2  # the bench's own progress line and the error
    assert time.monotonic() - start < timeout + 60
    time.sleep(1)
    assert [p for p in members.values() if "relu_opt.backends.crypten.party" in _cmdline(p)] == []
    assert list(private_root().glob(f"bench-{proc.pid}-*")) == []  # the ONNX weights and inputs are gone


@pytest.mark.slow
@pytest.mark.parties
def test_one_party_per_host_mode(tmp_path):
    from relu_opt.backends.crypten.launch import free_port

    port = free_port()
    common = ["bench", "small_cnn", "--input-shape", "1,1,28,28", "--world-size", "2", "--master-port", str(port)]
    common += ["--runs", "1", "--timeout", "120"]
    roles = [["--rank", "0"], ["--rank", "1"], ["--role", "dealer"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relu_opt.cli", *common, *role, "--json", str(tmp_path / f"p{i}.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, role in enumerate(roles)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(out)
    assert "the dealer served the run over lo" in outs[2]
    dealer = json.loads((tmp_path / "p2.json").read_text())  # the dealer sees no measurement
    assert dealer["models"] == [] and dealer["hosts"] == {"role": "dealer", "rank": 2, "interface": "lo"}
    results = [json.loads((tmp_path / f"p{r}.json").read_text()) for r in (0, 1)]
    for rank, (r, out) in enumerate(zip(results, outs)):
        assert "CrypTen, 2 parties, dealer third-party, batch 2" in out and f"party {rank} over lo" in out
        assert [m["name"] for m in r["models"]] == ["original", "floor"]
        assert r["models"][0]["rounds"] == 31 and r["models"][1]["rounds"] == 4
        assert r["hosts"] == {"role": "party", "rank": rank, "interface": "lo"}
    # the parties share their measurements at the end, so both report the same numbers
    assert results[0]["models"] == results[1]["models"]
    orig = results[0]["models"][0]
    assert orig["sent_per_party"] == [b // 2 for b in orig["bytes_per_party"]]
    # party 0 asks the dealer for one triple per round; party 1 never talks to it during a forward
    assert orig["offline_requests"] == 31 and orig["offline_sent_per_party"][1] == 0
    assert orig["offline_received_per_party"][0] > 0 == orig["offline_received_per_party"][1]


@pytest.mark.slow
@pytest.mark.parties
@pytest.mark.parametrize("how", ["term", "kill"])
def test_stopped_bench_leaves_no_weights_or_inputs(how, tmp_path):
    """SIGTERM: the bench stops its parties and removes its private folder on the way out. SIGKILL: the
    parties notice their parent is gone and exit, and the next use clears the folder it left."""
    from relu_opt.private_tmp import clear_stale

    env = {**os.environ, "RELU_OPT_CACHE": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relu_opt.cli", "bench", "small_cnn", "--runs", "50", "--timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    parties = _party_pids(proc.pid, start + 60)
    private = list(private_root().glob(f"bench-{proc.pid}-*"))
    assert len(private) == 1 and (private[0].stat().st_mode & 0o777) == 0o700
    assert {p.suffix for p in private[0].iterdir()} >= {".onnx", ".pt"}  # the weights and the inputs
    os.kill(proc.pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    deadline = time.monotonic() + 15
    while any("relu_opt.backends.crypten.party" in _cmdline(p) for p in parties.values()):
        assert time.monotonic() < deadline, "parties outlived the bench"
        time.sleep(0.1)
    if how == "term":
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
        assert "stopped by signal 15" in stderr
        assert not private[0].exists()
    else:
        assert proc.returncode == -signal.SIGKILL
        assert private[0].exists()  # nothing runs on SIGKILL ...
        assert private[0] in clear_stale()  # ... so the next use removes it
        assert not private[0].exists()
