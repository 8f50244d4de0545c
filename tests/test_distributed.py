"""One job on several processes (relu_opt.distributed, gloo on CPU): the same batches as one process, files
written once by rank 0, the same plan from optimize, and a killed rank that stops the job with one line from
which the same command resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from relu_opt import atomic, distributed
from relu_opt.checked_io import load_torch

MLP = textwrap.dedent(
    """
    from torch import nn

    class MLP(nn.Module):
        # no BatchNorm: two ranks then compute exactly the gradients one process computes
        default_input_shape = (1, 1, 8, 8)

        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, num_classes))

        def forward(self, x):
            return self.net(x)
    """
)


def _argv(*args) -> list[str]:
    return [sys.executable, "-m", "relu_opt", *map(str, args)]


def _run(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(*args), capture_output=True, text=True, timeout=timeout)


def _mlp(tmp_path: Path) -> str:
    (tmp_path / "mlp.py").write_text(MLP)
    return f"{tmp_path / 'mlp.py'}:MLP"


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    atomic.save_torch({"w": torch.ones(2)}, tmp_path / "b.pt")
    assert list(tmp_path.iterdir()) == []  # the attack on the rule: rank 1 writing would leave files here
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_a_global_batch_is_split_as_distributed_sampler_splits_it(monkeypatch):
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(x, y))
    assert [p[1].tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    # each rank's mean loss times its weight, averaged over the ranks, is the whole batch's mean
    assert sum(w * float(xs.mean()) for xs, _, w in parts) / 3 == pytest.approx(4.5)
    assert distributed.shard(x[:2], y[:2])[2] == 1.0  # fewer samples than ranks: each trains the whole batch


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    model = _mlp(tmp_path)
    args = ["train", model, "--data", "digits", "--epochs", "3", "--lr", "0.05"]
    one = _run(*args, "-o", tmp_path / "one" / "w.pt")
    two = _run(*args, "-o", tmp_path / "two" / "w.pt", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = torch.load(tmp_path / "one" / "w.pt"), torch.load(tmp_path / "two" / "w.pt")
    # the same global batches, half on each rank, gradients averaged by DDP: the weights of one process
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert two.stdout.count("val accuracy") == 1 and "rank 1" not in two.stdout + two.stderr  # rank 0 prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["w.pt", "w.pt.ckpt"]  # no leftovers


@pytest.mark.slow
def test_optimize_on_two_processes_keeps_the_sites_one_process_keeps(tmp_path):
    weights = tmp_path / "w.pt"
    trained = _run("train", "small_cnn", "--data", "digits", "--epochs", "3", "-o", weights)
    assert trained.returncode == 0, trained.stderr
    args = ["optimize", "small_cnn", "--data", "digits", "--weights", weights, "--budget", "600", "--epochs", "2"]
    args += ["--rank-samples", "512", "--selector", "count"]
    one = _run(*args, "-o", tmp_path / "one")
    two = _run(*args, "-o", tmp_path / "two", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    folders = [tmp_path / d / "budget_600" for d in ("one", "two")]
    plans = [json.loads((f / "plan.json").read_text()) for f in folders]
    assert plans[0]["sites"] == plans[1]["sites"]  # taylor's scores summed over the ranks: the same selection
    masks = [{k: v for k, v in torch.load(f / "model.pt").items() if k.endswith(".mask")} for f in folders]
    assert masks[0] and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])  # the same kept channels
    res = [json.loads((f / "report.json").read_text())["result"] for f in folders]
    assert abs(res[0]["val_accuracy_after"] - res[1]["val_accuracy_after"]) < 2.0 and res[1]["elements_after"] <= 600
    assert two.stdout.count("wrote") == one.stdout.count("wrote")  # printed once


def _pid_of_rank(rank: int, parent: int) -> int | None:
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == parent:
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"RANK={rank}".encode() in env
            and b"relu_opt" in cmd
            and f"TORCHELASTIC_RUN_ID=relu-opt-{parent}".encode() in env
        ):
            return int(p.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_with_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "w.pt"
    args = ["train", "resnet20", "--data", "digits", "--epochs", "4", "--max-train", "1200", "--batch-size", "16"]
    args += ["-o", out, "--nproc", "2"]
    proc = subprocess.Popen(_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, ckpt = time.monotonic() + 240, tmp_path / "w.pt.ckpt"
    while not ckpt.is_file():  # the first epoch is saved: kill rank 1 in the second
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    victim = _pid_of_rank(1, proc.pid)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    stopped = time.monotonic() - killed
    lines = [line for line in stderr.splitlines() if line.strip() and "━" not in line]
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert "error: rank 1 of 2 stopped" in lines[0] and "during train; state saved" in lines[0]
    assert "rerun with --resume" in lines[0]
    assert stopped < 30, stopped  # not a timing assert on speed: the bound on a hang
    state = load_torch(ckpt)
    assert 1 <= state["epoch"] < 4 and state["step"] > 0  # saved mid-epoch by rank 0
    again = _run(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"resumed from epoch {state['epoch'] + 1}" in again.stdout and out.is_file()
    assert load_torch(ckpt)["epoch"] == 4


@pytest.mark.slow
def test_a_frontier_spreads_its_budgets_over_the_ranks(tmp_path):
    weights = tmp_path / "w.pt"
    trained = _run("train", "small_cnn", "--data", "digits", "--epochs", "3", "-o", weights)
    assert trained.returncode == 0, trained.stderr
    args = ["optimize", "small_cnn", "--data", "digits", "--weights", weights, "--budgets", "900,300"]
    args += ["--epochs", "1", "--rank-samples", "512", "--selector", "count"]
    one = _run(*args, "-o", tmp_path / "one")
    two = _run(*args, "-o", tmp_path / "two", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    for budget in ("budget_900", "budget_300"):  # each trained by one rank alone: what one process trains
        res = [json.loads((tmp_path / d / budget / "report.json").read_text())["result"] for d in ("one", "two")]
        kept = [[(s["site"], s["kept"]) for s in r["sites"]] for r in res]
        assert kept[0] == kept[1]  # the scores themselves agree to float rounding (summed over the ranks)
        assert [s["score"] for s in res[1]["sites"]] == pytest.approx([s["score"] for s in res[0]["sites"]], rel=1e-4)
        assert res[0]["val_accuracy_after"] == pytest.approx(res[1]["val_accuracy_after"], abs=1.0)
    assert (tmp_path / "two" / "pareto.md").is_file() and two.stdout.count("pareto.md") == 1
    assert len(list((tmp_path / "two" / ".work").glob("finetune_*.ckpt"))) == 2  # rank 1's budget resumes too


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_a_stop_signal_on_nproc_is_one_line_and_resumes(tmp_path, sig):
    out = tmp_path / "w.pt"
    args = ["train", "small_cnn", "--data", "digits", "--epochs", "3", "--batch-size", "4", "-o", out, "--nproc", "2"]
    # a session of its own, as a terminal's Ctrl-C reaches the launcher and every rank; SIGINT at its default
    proc = subprocess.Popen(
        _argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "w.pt.ckpt").is_file():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig and len(lines) == 1, stderr
    assert lines[0].startswith("interrupted in epoch") and "rerun with --resume" in lines[0]
    again = _run(*args, "--resume")
    assert again.returncode == 0 and "resumed from epoch" in again.stdout, again.stderr
