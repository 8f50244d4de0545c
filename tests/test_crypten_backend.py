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
from relu_opt.crypto_backend.bench import bench, fixed_point_warnings, measure
from relu_opt.crypto_backend.convert import check_supported, crypten_onnx, prepare_for_pi
from relu_opt.crypto_backend.cost_model import calibrate
from relu_opt.errors import CryptenError
from relu_opt.export import to_onnx_bytes
from relu_opt.graph import propagate_shapes, trace
from relu_opt.models import create_model
from relu_opt.passes.replace import relu_nodes, replace_sites

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


def test_two_party_forward_matches_plaintext():
    model = _trained_like(create_model("small_cnn", in_channels=1))
    labels = torch.tensor([3, 7])
    r = bench(model, X, labels, parties=2, runs=1, warmup=0, timeout=120)
    orig, floor = r.models
    assert (orig.name, floor.name) == ("original", "floor")
    assert orig.relu_elements == 16 * 28 * 28 + 32 * 14 * 14 + 64 * 7 * 7
    assert orig.rounds == 3 * 9 + 4  # three ReLU sites, three convs and the head
    assert floor.relu_elements == 0 and floor.rounds == 4
    assert orig.top1_agreement == 1.0 and floor.top1_agreement == 1.0
    scale = model(X).abs().max().item()
    assert orig.max_abs_err < 1e-2 * scale
    assert orig.accuracy == orig.plain_accuracy
    assert r.ratios["floor"]["rounds"] == pytest.approx(4 / 31)
    assert len(orig.bytes_per_party) == 2 and orig.lan_s > orig.wall_s_median
    d = r.to_dict()
    assert {"parties", "batch", "models", "ratios"} <= set(d)
    assert {
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


def test_cost_model_predicts_measured_rounds_and_bytes():
    cost = calibrate(2, timeout=120)
    assert cost.rounds_per_op["relu"] == pytest.approx(9, abs=0.01)
    assert cost.bytes_per_element["relu"] == pytest.approx(464, rel=0.01)
    model = _trained_like(create_model("resnet20", in_channels=1))
    poly_half = _channel_masked(model, 2, lambda c: Poly(torch.randn(3, c) * 0.1))
    for m in measure(
        [("small", create_model("small_cnn", in_channels=1)), ("poly_half", poly_half)],
        X,
        runs=1,
        warmup=0,
        timeout=300,
    ):
        assert cost.rounds(m.features) == pytest.approx(m.rounds, abs=1)
        assert cost.bytes(m.features) == pytest.approx(m.bytes_per_party[0], rel=0.03)


def test_polynomials_export_without_relu_and_unsupported_ops_are_named():
    model = _channel_masked(
        _trained_like(create_model("small_cnn", in_channels=1)), None, lambda c: Poly(torch.randn(3, c))
    )
    mp = onnx.load_from_string(crypten_onnx(prepare_for_pi(model, X[:1]), X[:1]))
    ops = {n.op_type for n in mp.graph.node}
    assert "Relu" not in ops and "Pow" in ops and "Identity" not in ops

    class Odd(nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2.0)

    bad = onnx.load_from_string(to_onnx_bytes(Odd(), X[:1]))
    with pytest.raises(CryptenError, match=r"CrypTen cannot run ONNX op 'Resize' \(node '.*Resize.*'\)"):
        check_supported(bad)


def test_fixed_point_warning_names_the_site():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1e4)
    warnings = fixed_point_warnings(trace(model), torch.ones(1, 4))
    assert warnings[0].startswith("site '_0' reaches |x| = 4e+04") and "fixed-point limit" in warnings[0]
    assert fixed_point_warnings(trace(model), torch.ones(1, 4) * 1e-6) == []


def _children_running(pattern: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pattern in cmd:
                pids.append(int(d.name))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _party_pid(rank: int, deadline: float, parent: int) -> tuple[int, str]:
    """Return the pid and job folder of party `rank` started by `parent` (other benches may run too)."""
    while time.monotonic() < deadline:
        for pid in _children_running("relu_opt.crypto_backend.party"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                mine = _parent(pid) == parent
            except (OSError, ValueError, IndexError):
                continue
            if mine and f"party{rank}.job.json" in cmd:
                job = next(a for a in cmd.split("\0") if a.endswith(f"party{rank}.job.json"))
                return pid, str(Path(job).parent)
        time.sleep(0.05)
    raise AssertionError(f"party {rank} never started")


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_failed_party_stops_the_bench(how, tmp_path):
    timeout = 25
    env = {**os.environ, "RELU_OPT_CACHE": str(tmp_path)}
    # Warm the cost-model cache so the parties below are the bench's own.
    subprocess.run(
        [sys.executable, "-c", "from relu_opt.crypto_backend.cost_model import calibrate; calibrate(2)"],
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
    pid, workdir = _party_pid(1, start + 60, proc.pid)
    time.sleep(2)
    os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        _, stderr = proc.communicate(timeout=timeout + 30)
    finally:
        if how == "hang":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    if how == "kill":
        assert "party 1 was killed by signal 9" in stderr
    else:
        assert f"did not finish within --timeout {timeout}s" in stderr
    assert time.monotonic() - start < timeout + 60
    time.sleep(1)
    assert _children_running(workdir) == []


def test_one_party_per_host_mode(tmp_path):
    from relu_opt.crypto_backend.launch import free_port

    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relu_opt.cli",
                "bench",
                "small_cnn",
                "--input-shape",
                "1,1,28,28",
                "--rank",
                str(rank),
                "--world-size",
                "2",
                "--master-port",
                str(port),
                "--runs",
                "1",
                "--json",
                str(tmp_path / f"p{rank}.json"),
                "--timeout",
                "120",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    results = [json.loads((tmp_path / f"p{r}.json").read_text()) for r in (0, 1)]
    assert [m["name"] for m in results[0]["models"]] == ["original", "floor"]
    assert results[0]["models"][0]["rounds"] == [31] and results[1]["models"][0]["rounds"] == [31]
