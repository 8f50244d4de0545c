"""Bad inputs and faults across every command: each ends in one clear line, exit code 2 (130 for Ctrl-C),
no traceback, and nothing half-written; damaged caches are rebuilt and interrupted work resumes."""

import functools
import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from relu_opt.cache import file_digest
from relu_opt.checked_io import load_cache, load_torch, read_json
from relu_opt.cli import app
from relu_opt.data import load_dataset
from relu_opt.errors import ConfigError, CorruptFileError
from relu_opt.models import create_model
from relu_opt.private_tmp import clear_stale, private_dir, private_root
from relu_opt.training import TrainConfig, TrainingInterrupted, fit

runner = CliRunner()

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            raise RuntimeError("weights server unreachable")

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x).relu()
            return y, y

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return {"logits": self.conv(x).relu().mean((2, 3))}

    class ThreeChannel(nn.Module):
        default_input_shape = (1, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 10, 3)

        def forward(self, x):
            return self.conv(x).relu().mean((2, 3))

    class SevenClasses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 7, 3)

        def forward(self, x):
            return self.conv(x).relu().mean((2, 3))

    class Raises(nn.Module):
        default_input_shape = (1, 3, 8, 8)

        def forward(self, x):
            raise ValueError("forward is not implemented yet")

    def not_a_module():
        return 42
    """
)


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(MODELS)
    return path


def _small():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, in_channels=1)


@functools.cache
def _trained_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    fit(model, load_dataset("synthetic"), TrainConfig(epochs=2, lr=0.05, seed=seed), progress=False)
    return model.state_dict()


def _trained(seed: int = 0):
    """A small_cnn trained on the synthetic data, well above chance (fine-tuning refuses a collapse)."""
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    model.load_state_dict(_trained_state(seed))
    return model


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails(args, pattern, code=2):
    """Run the CLI in-process; assert the exit code and exactly one line, an error naming the problem."""
    r = invoke(*args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def usage_error(args, option):
    """Typer's own range checks: exit 2 with its 'Invalid value' line naming the option."""
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert f"Invalid value for '{option}'" in r.output, r.output


def nothing_in(folder: Path, keep=()) -> None:
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert left == [], left


# --- 1. inputs that do not fit the model ---------------------------------------------------------

SHAPES = [
    (["count", "resnet20", "--input-shape", "1,32"], r"'resnet20' on input shape 1,32 fails: Expected 3D .* 4D"),
    (["count", "resnet20", "--input-shape", "1,3,20000,20000"], r"needs about \d+\.\d GiB .* smaller input shape"),
    (["count", "resnet20", "--input-shape", "abc"], r"--input-shape 'abc' is not a list of integers"),
    (["count", "resnet20", "--input-shape", "0,3,32,32"], r"must have a batch dimension and positive sizes"),
    (["count", "small_cnn", "--input-shape", "1,1,2,2"], r"'small_cnn' on input shape 1,1,2,2 fails"),
    (["bench", "small_cnn", "--input-shape", "1,5"], r"on input shape 1,5 fails"),
]


@pytest.mark.parametrize("args,pattern", SHAPES, ids=[" ".join(a[:2] + a[-1:]) for a, _ in SHAPES])
def test_input_shape_that_does_not_fit(args, pattern):
    fails(args, pattern)


def test_export_with_a_bad_shape_writes_nothing(tmp_path):
    fails(["export", "resnet20", "-o", tmp_path / "m.onnx", "--input-shape", "1,32"], "fails")
    nothing_in(tmp_path)


def test_three_channel_model_on_one_channel_data(models, tmp_path):
    out = tmp_path / "out"
    fails(
        ["optimize", f"{models}:ThreeChannel", "--data", "digits", "--budget", "10", "-o", out],
        r"ThreeChannel' on input shape 1,1,8,8 fails: .*3 channels.*; give a model that takes the digits inputs",
    )
    assert not out.exists()


def test_model_with_other_class_count_than_the_data(models, tmp_path):
    fails(
        ["train", f"{models}:SevenClasses", "--data", "digits", "-o", tmp_path / "w.pt"],
        r"outputs shape \(1, 7\) but the dataset has 10 classes",
    )
    nothing_in(tmp_path, keep=("user_models.py",))


# --- 2. user model code that misbehaves -------------------------------------------------------

USER = [
    ("Broken", r"building '.*:Broken' raised RuntimeError: weights server unreachable"),
    ("Pair", r"forward returns a tuple, not one tensor"),
    ("Named", r"forward returns a dict, not one tensor"),
    ("Raises", r"fails: forward is not implemented yet"),
    ("not_a_module", r"returned int, not a torch.nn.Module"),
    ("Missing", r"has no attribute 'Missing'.*Broken"),
]


@pytest.mark.parametrize("attr,pattern", USER, ids=[a for a, _ in USER])
def test_user_model_that_misbehaves(models, attr, pattern):
    fails(["count", f"{models}:{attr}", "--input-shape", "1,3,8,8"], pattern)


def test_export_of_a_tuple_model_writes_nothing(models, tmp_path):
    out = tmp_path / "pair.onnx"
    fails(["export", f"{models}:Pair", "-o", out, "--input-shape", "1,3,8,8"], "forward returns a tuple")
    assert not out.exists()


def test_model_file_with_a_syntax_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("class Net(:\n")
    fails(["count", f"{bad}:Net"], r"importing '.*bad.py' failed: SyntaxError")


def test_model_file_that_does_not_exist(tmp_path):
    fails(["count", f"{tmp_path / 'nope.py'}:Net"], r"model file '.*nope.py' does not exist")


def test_unknown_zoo_model():
    fails(["count", "resnet21"], r"resnet21")


# --- 3. output paths, checked before any work -------------------------------------------------


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def test_output_under_a_file(a_file):
    fails(["export", "small_cnn", "-o", a_file / "m.onnx"], r"a_file' is a file, not a folder")


def test_output_file_is_a_folder(tmp_path):
    fails(["export", "small_cnn", "-o", tmp_path], r"is a folder; give a file name")


def test_optimize_output_folder_is_a_file(a_file):
    fails(["optimize", "small_cnn", "--data", "digits", "--budget", "10", "-o", a_file], r"is a file; give a folder")


def test_train_into_a_folder_fails_before_training(tmp_path):
    start = time.monotonic()
    fails(["train", "small_cnn", "--data", "digits", "-o", tmp_path], r"is a folder; give a file name")
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - start < 30  # refused at once: no epoch ran (digits trains in seconds anyway)


def test_output_where_nothing_can_be_written():
    fails(["count", "small_cnn", "--json", "/proc/relu-opt/census.json"], r"cannot write in '/proc'")


def test_json_under_a_file(a_file):
    fails(["count", "small_cnn", "--json", a_file / "c.json"], r"is a file, not a folder")


def test_rank_json_is_a_folder(tmp_path):
    fails(["rank", "small_cnn", "--data", "digits", "--json", tmp_path], r"--json '.*' is a folder")


def test_bench_json_under_a_file(a_file):
    fails(["bench", "small_cnn", "--input-shape", "1,1,28,28", "--json", a_file / "b.json"], r"is a file, not a")


def test_run_dirs_that_are_files(a_file):
    fails(["run", "--runs-dir", a_file], r"--runs-dir '.*a_file' is a file")
    fails(["run", "--cache-dir", a_file], r"--cache-dir '.*a_file' is a file")


# --- 4. corrupted files ------------------------------------------------------------------------


def _weights(tmp_path, kind):
    path = tmp_path / "w.pt"
    if kind == "truncated":
        torch.save(create_model("small_cnn").state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "text":
        path.write_text("hello")
    elif kind == "folder":
        path.mkdir()
    elif kind == "other-model":
        torch.save(create_model("resnet20").state_dict(), path)
    elif kind == "nan":
        sd = create_model("small_cnn").state_dict()
        next(v for v in sd.values() if v.is_floating_point()).fill_(float("nan"))
        torch.save(sd, path)
    return path


WEIGHTS = [
    ("truncated", r"cannot read '.*w.pt' as a weights-only torch checkpoint"),
    ("text", r"cannot read '.*w.pt'"),
    ("folder", r"--weights '.*w.pt' is a folder"),
    ("missing", r"--weights '.*w.pt' does not exist"),
    ("other-model", r"does not fit the model: missing keys"),
    ("nan", r"non-finite"),
]


@pytest.mark.parametrize("kind,pattern", WEIGHTS, ids=[k for k, _ in WEIGHTS])
def test_bad_weights_file(tmp_path, kind, pattern):
    fails(["count", "small_cnn", "--weights", _weights(tmp_path, kind)], pattern)


def _optimize_small(out: Path):
    """Optimize a seeded small_cnn on synthetic data to 100 ReLUs into `out` (a few seconds)."""
    from relu_opt.optimizer import OptimizeConfig, optimize

    model = _trained()
    cfg = OptimizeConfig(budget=100, epochs=0.5, rank_samples=64, fit_samples=64, batch_size=64)
    return optimize(model, load_dataset("synthetic"), cfg, out, base_spec="small_cnn", progress=False)


@pytest.fixture(scope="module")
def optimized_dir(tmp_path_factory):
    """A real `relu-opt optimize` folder."""
    out = tmp_path_factory.mktemp("opt") / "o"
    _optimize_small(out)
    return out


def _damaged_copy(src: Path, dest: Path, name: str, how: str) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".work"))
    target = dest / name
    if how == "truncate":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    elif how == "drop-key":
        d = json.loads(target.read_text())
        d.pop("sites")
        target.write_text(json.dumps(d))
    elif how == "list":
        target.write_text("[]")
    elif how == "delete":
        target.unlink()
    return dest


DAMAGE = [
    ("plan.json", "truncate", r"plan '.*plan.json' is not valid JSON .* rerun `relu-opt optimize`"),
    ("plan.json", "drop-key", r"plan '.*plan.json' lacks the keys sites"),
    ("plan.json", "list", r"plan '.*plan.json' holds a list, not a JSON object"),
    ("plan.json", "delete", r"has no plan.json"),
    ("model.pt", "truncate", r"optimized weights '.*model.pt' is truncated or not a torch file"),
    ("model.pt", "delete", r"optimized weights '.*model.pt' does not exist"),
]


@pytest.mark.parametrize("name,how,pattern", DAMAGE, ids=[f"{n}-{h}" for n, h, _ in DAMAGE])
def test_damaged_optimize_folder_is_named(optimized_dir, tmp_path, name, how, pattern):
    bad = _damaged_copy(optimized_dir, tmp_path / "bad", name, how)
    fails(["bench", "small_cnn", "--input-shape", "1,1,12,12", "--num-classes", "4", "--optimized", bad], pattern)


def test_damaged_report_ranking_and_checkpoint_are_redone(optimized_dir, tmp_path, capsys):
    shutil.copytree(optimized_dir, tmp_path / "o")
    report = tmp_path / "o" / "report.json"
    before = json.loads(report.read_text())["result"]
    damaged = [report, *(tmp_path / "o" / ".work").glob("rank_*.pt"), *(tmp_path / "o" / ".work").glob("*.ckpt")]
    assert len(damaged) == 3
    for path in damaged:
        path.write_bytes(path.read_bytes()[:100])
    r = _optimize_small(tmp_path / "o")
    assert capsys.readouterr().err.count("removed a damaged cache file") == 3
    assert (r.elements_after, r.accuracy_after) == (before["elements_after"], before["accuracy_after"])  # rebuilt alike
    assert r.elements_after <= 100 and json.loads(report.read_text())["result"]["elements_after"] == r.elements_after


def test_damaged_cost_model_cache_is_measured_again(tmp_path, monkeypatch):
    from relu_opt.backends.crypten import calibration as cal
    from relu_opt.backends.crypten import cost_model, measure

    calls = []

    def fake_measure(models, x, **_):
        """Stand-in for CrypTen: 1 round per op plus 8 more per ReLU op, 464 bytes per ReLU element."""
        calls.append(len(models))
        out = []
        for _, gm in models:
            f = cost_model.features(gm)
            rounds = sum(f.ops.get(c, 0) for c in cost_model.CATEGORIES) + 8 * f.ops.get("relu", 0)
            out.append(
                SimpleNamespace(
                    rounds=rounds,
                    bytes_per_party=[464 * f.elements.get("relu", 0)],
                    offline_sent_per_party=[0],
                    offline_received_per_party=[0],
                    offline_requests=0,
                    round_trips=2.0 * rounds,
                    offline_round_trips=0.0,
                )
            )
        return out

    monkeypatch.setattr(measure, "measure", fake_measure)
    path = tmp_path / f"cost_model_2p_third-party_crypten{cal._crypten_version()}_{cal.suite_key()}.json"
    path.write_text('{"parties": 2, "rounds_per_op": {"relu": 9')
    fitted = cal.calibrate(2, cache=tmp_path)
    assert calls == [len(cal.calibration_suite())]  # measured again, not read from the damaged file
    assert 8.0 < fitted.rounds_per_op["relu"] < 10.0  # the fake's 9 per ReLU op, shared with co-occurring kinds
    assert cost_model.CrypTenCostModel.from_dict(json.loads(path.read_text())) == fitted


REPORTS = [
    ("{", r"run report '.*report.json' is not valid JSON"),
    ("[1, 2]", r"holds a list, not a JSON object"),
    ('{"config": {}}', r"lacks the keys baseline, census_before"),
    (
        json.dumps(
            {k: {} for k in ("config", "baseline", "census_before", "census_after", "bench")} | {"optimized": []}
        ),
        r"run report '.*' is malformed \(KeyError",
    ),
]


@pytest.mark.parametrize("text,pattern", REPORTS, ids=["truncated", "list", "keys", "fields"])
def test_damaged_run_report(tmp_path, text, pattern):
    (tmp_path / "report.json").write_text(text)
    fails(["report", tmp_path], pattern)
    assert not (tmp_path / "report.md").exists()


def test_report_of_a_folder_without_one(tmp_path):
    fails(["report", tmp_path], r"has no report.json")


def _idx(array: torch.Tensor) -> bytes:
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return gzip.compress(header + array.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    for name, shape in (
        ("train-images-idx3-ubyte.gz", (60, 28, 28)),
        ("train-labels-idx1-ubyte.gz", (60,)),
        ("t10k-images-idx3-ubyte.gz", (20, 28, 28)),
        ("t10k-labels-idx1-ubyte.gz", (20,)),
    ):
        (folder / name).write_bytes(_idx(torch.randint(0, 10, shape)))
    return folder


@pytest.mark.parametrize("how", ["truncated", "not-gzip", "counts"])
def test_damaged_dataset_files_are_named(fashion_dir, tmp_path, how):
    assert load_dataset("fashion-mnist", fashion_dir, val_size=10).num_classes == 10  # the intact files load
    target = fashion_dir / "train-images-idx3-ubyte.gz"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif how == "not-gzip":
        target.write_text("<html>404</html>")
    else:
        target.write_bytes(_idx(torch.zeros(59, 28, 28)))
    msg = fails(["train", "small_cnn", "--data-dir", fashion_dir, "-o", tmp_path / "w.pt"], "Fashion-MNIST files")
    assert str(fashion_dir) in msg and "Aborted" not in msg
    assert not (tmp_path / "w.pt").exists()


def test_damaged_cifar_files_are_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    fails(["rank", "small_cnn", "--data", "cifar10", "--data-dir", tmp_path], r"cannot read cifar10 from")


def test_damaged_caches_are_removed_and_rebuilt(tmp_path):
    notes = []
    for name, reader, data in (
        ("cost.json", lambda p: read_json(p, ("parties",), "cost model"), b'{"parties": 2, "rou'),
        ("base.pt", lambda p: load_torch(p, "cached baseline"), b"PK\x03\x04trunc"),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        assert load_cache(path, reader, notes.append) is None
        assert not path.exists()
    assert len(notes) == 2 and all("removed a damaged cache file" in n for n in notes)
    assert "cost.json" in notes[0] and "base.pt" in notes[1]


def test_damaged_baseline_cache_is_trained_again(tmp_path):
    from relu_opt.pipeline import RunConfig, _baseline

    cfg = RunConfig(model="small_cnn", data="synthetic", baseline_epochs=1)
    data = load_dataset("synthetic")
    logs = []
    _, info = _baseline(cfg, data, tmp_path, logs.append)
    path = Path(info["source"])
    good = load_torch(path)
    path.write_bytes(path.read_bytes()[:500])
    _, info = _baseline(cfg, data, tmp_path, logs.append)
    assert info["cached"] is False and any("removed a damaged cache file" in m for m in logs)
    assert all(torch.equal(good[k], v) for k, v in load_torch(path).items())  # same seed, same weights


def test_damaged_training_checkpoint_starts_again(tmp_path):
    ckpt = tmp_path / "w.pt.ckpt"
    ckpt.write_bytes(b"\x00" * 64)
    r = invoke("train", "small_cnn", "--data", "digits", "--epochs", "1", "-o", tmp_path / "w.pt", "--resume")
    assert r.exit_code == 0, r.output
    assert "removed a damaged cache file" in r.output
    assert (tmp_path / "w.pt").is_file() and load_torch(ckpt)["epoch"] == 1


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    out = tmp_path / "w.pt"
    assert invoke("train", "small_cnn", "--data", "digits", "--epochs", "1", "-o", out).exit_code == 0
    out.unlink()
    fails(
        ["train", "small_cnn", "--data", "digits", "--epochs", "2", "-o", out, "--resume"],
        r"checkpoint '.*w.pt.ckpt' was written by a run with .*'epochs': 1.*rerun with the same --epochs",
    )
    assert not out.exists()


# --- 5. resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", [1, 7, 13])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, stop_at):
    data, cfg = load_dataset("synthetic"), TrainConfig(epochs=2, batch_size=64)
    reference = _small()
    fit(reference, data, cfg, progress=False)
    calls = {"n": 0}

    def ctrl_c(_frac):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ck"
    with pytest.raises(TrainingInterrupted, match=f"after step {(stop_at - 1) % 13}.*rerun with --resume"):
        fit(_small(), data, cfg, checkpoint=ckpt, on_step=ctrl_c, progress=False)
    resumed = _small()
    r = fit(resumed, data, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert r.resumed_from == (stop_at - 1) // 13 and len(r.history) == 2
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_ctrl_c_between_epochs_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C after epoch 1 was saved and before epoch 2 starts: the same message, and resume ends equal."""
    from rich.progress import Progress

    data, cfg = load_dataset("synthetic"), TrainConfig(epochs=2, batch_size=64)
    reference = _small()
    fit(reference, data, cfg, progress=False)
    real, calls = Progress.add_task, {"n": 0}

    def add_task(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Progress, "add_task", add_task)
    ckpt = tmp_path / "ck"
    with pytest.raises(TrainingInterrupted, match="in epoch 2 after step 0.*rerun with --resume"):
        fit(_small(), data, cfg, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(Progress, "add_task", real)
    assert load_torch(ckpt)["epoch"] == 1
    resumed = _small()
    r = fit(resumed, data, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert r.resumed_from == 1 and len(r.history) == 2
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.slow
def test_interrupted_frontier_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Ctrl-C in the second budget's fine-tuning, then the same call: no 'Tried to step' crash, the first
    budget is reused, and the result equals an uninterrupted run's."""
    from relu_opt import optimizer

    data = load_dataset("synthetic")
    cfg = optimizer.OptimizeConfig(budget=0, epochs=1, rank_samples=64, fit_samples=64, batch_size=64)
    budgets = [300, 100]
    straight = optimizer.optimize_frontier(_trained(), data, budgets, cfg, tmp_path / "a", progress=False)

    from relu_opt.optimizer import tuner

    real = tuner.anneal_schedule

    def anneal_then_stop(model, anneal):
        step, calls = real(model, anneal), []
        budget_100 = (tmp_path / "b" / "budget_300" / "report.json").is_file()  # budget 300 is done

        def on_step(frac):
            calls.append(frac)
            if budget_100 and len(calls) == 7:  # Ctrl-C at step 7 of budget 100's fine-tuning
                raise KeyboardInterrupt
            step(frac)

        return on_step

    monkeypatch.setattr(tuner, "anneal_schedule", anneal_then_stop)
    with pytest.raises(TrainingInterrupted, match="rerun the same command"):
        optimizer.optimize_frontier(_trained(), data, budgets, cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "budget_300" / "report.json").is_file()
    assert not (tmp_path / "b" / "budget_100").exists()
    monkeypatch.setattr(tuner, "anneal_schedule", real)
    resumed = optimizer.optimize_frontier(_trained(), data, budgets, cfg, tmp_path / "b", progress=False)
    for a, b in zip(straight, resumed):
        assert (a.elements_after, a.accuracy_after, a.val_accuracy_after) == (
            b.elements_after,
            b.accuracy_after,
            b.val_accuracy_after,
        )
    sa, sb = (load_torch(tmp_path / d / "budget_100" / "model.pt") for d in ("a", "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed[1].finetune["resumed_from"] == 0 and len(resumed[1].finetune["history"]) == 1


def _cli(*args):
    return [sys.executable, "-m", "relu_opt.cli", *map(str, args)]


def _wait_for(path: Path, deadline: float) -> None:
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_in_train_then_resume_writes_the_weights(tmp_path):
    out = tmp_path / "w.pt"
    # Enough work per epoch (1,024 images) that a loaded machine cannot finish all 40 before the signal lands.
    args = ["train", "small_cnn", "--data", "digits", "--epochs", "40", "--max-train", "1024", "-o", out]
    # SIGINT at its default in the child: a shell's background job (`.ci/run &`) starts with it ignored, and
    # Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(
        _cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(tmp_path / "w.pt.ckpt", time.monotonic() + 120)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "rerun with --resume" in stderr
    assert not out.exists()
    epoch = load_torch(tmp_path / "w.pt.ckpt")["epoch"]
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert load_torch(tmp_path / "w.pt.ckpt")["epoch"] == 40 > epoch


@pytest.mark.slow
def test_killed_optimize_resumes(tmp_path):
    out, weights = tmp_path / "o", tmp_path / "w.pt"
    trained = invoke("train", "small_cnn", "--data", "digits", "--epochs", "3", "-o", weights)  # for both runs
    assert trained.exit_code == 0, trained.output
    args = ["optimize", "small_cnn", "--data", "digits", "--weights", weights, "--budget", "500", "--epochs", "30"]
    args += ["-o", out]
    args += ["--rank-samples", "64", "--max-train", "256"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((out / ".work").glob("finetune_*.ckpt")):  # the first fine-tuning epoch is saved
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "budget_500" / "report.json").exists()
    ckpt = load_torch(next((out / ".work").glob("finetune_*.ckpt")))
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "budget_500" / "report.json").read_text())["result"]
    assert report["elements_after"] <= 500 and report["finetune"]["resumed_from"] == ckpt["epoch"] >= 1


# --- 6. numbers and names nobody checked ----------------------------------------------------------

D = ["--data", "digits"]
NUMBERS = [
    (["train", "small_cnn", *D, "--lr", "nan", "-o", "{tmp}/w.pt"], r"--lr nan is not a finite number"),
    (["train", "small_cnn", *D, "--lr", "-1", "-o", "{tmp}/w.pt"], r"--lr -1 must be above 0"),
    (["train", "small_cnn", *D, "--max-train", "-5", "-o", "{tmp}/w.pt"], r"--max-train -5 is out of range"),
    (["train", "small_cnn", *D, "--max-train", "0", "-o", "{tmp}/w.pt"], r"--max-train 0 is out of range"),
    (["train", "small_cnn", *D, "--device", "tpu", "-o", "{tmp}/w.pt"], r"--device 'tpu' is not known"),
    (["train", "small_cnn", "--data", "nope", "-o", "{tmp}/w.pt"], r"unknown dataset 'nope'"),
    (["rank", "small_cnn", *D, "--samples", "0"], r"--rank-samples 0 is out of range"),
    (["optimize", "small_cnn", *D, "--budget", "9", "--snl-epochs", "0", "-o", "{tmp}/o"], r"--snl-epochs 0 must be"),
    (["rank", "small_cnn", *D, "--strategy", "nope"], r"--strategy 'nope' is not known; choose one of"),
    (["rank", "small_cnn", *D, "--replace", "cube"], r"--replace 'cube' is not known"),
    (["rank", "small_cnn", *D, "--granularity", "row"], r"--granularity 'row' is not known"),
    (["rank", "small_cnn", *D, "--finetune-steps", "-1"], r"--finetune-steps -1 is out of range"),
    (["optimize", "small_cnn", *D, "--budgets", "2000,,1000", "-o", "{tmp}/o"], r"has an empty entry"),
    (["optimize", "small_cnn", *D, "--budgets", "a,b", "-o", "{tmp}/o"], r"must be integers"),
    (["optimize", "small_cnn", *D, "--budgets", "100,-2", "-o", "{tmp}/o"], r"budget -2 is negative"),
    (["optimize", "small_cnn", *D, "--budget", "-5", "-o", "{tmp}/o"], r"budget -5 is negative"),
    (["optimize", "small_cnn", *D, "--selector", "count", "-o", "{tmp}/o"], r"--selector count needs --budget"),
    (["optimize", "small_cnn", *D, "--budget", "1", "--budgets", "2,3", "-o", "{tmp}/o"], r"not both"),
    (["optimize", "small_cnn", *D, "--budget", "10", "--epochs", "-1", "-o", "{tmp}/o"], r"--epochs -1 must be at"),
    (["optimize", "small_cnn", *D, "--budget", "10", "--epochs", "inf", "-o", "{tmp}/o"], r"--epochs inf is not"),
    (["optimize", "small_cnn", *D, "--budget", "10", "--rank-samples", "0", "-o", "{tmp}/o"], r"--rank-samples 0"),
    (["optimize", "small_cnn", *D, "--budget", "10", "--strategy", "nope", "-o", "{tmp}/o"], r"--strategy 'nope'"),
    (["optimize", "small_cnn", *D, "--budget", "10", "--poly-per", "pixel", "-o", "{tmp}/o"], r"--poly-per 'pixel'"),
    (["optimize", "small_cnn", *D, "--budget", "10**9", "-o", "{tmp}/o"], None),
    (["optimize", "small_cnn", *D, "--budget", "1000000", "-o", "{tmp}/o"], r"is not below the model's"),
    (
        ["optimize", "small_cnn", *D, "--budget", "10", "--kinds", "relu,nope", "-o", "{tmp}/o"],
        r"unknown kind\(s\) nope",
    ),
    (["optimize", "small_cnn", *D, "--budget", "9", "--kind-budget", "relu=-1", "-o", "{tmp}/o"], r"relu -1 is out of"),
    (["optimize", "small_cnn", *D, "--budget", "9", "--kind-budget", "relu", "-o", "{tmp}/o"], r"must be KIND=N"),
    (["count", "small_cnn", "--num-classes", "0"], r"--num-classes 0 is out of range"),
    (["count", "small_cnn", "--leaf", "NoSuchClass"], r"--leaf 'NoSuchClass' names no module class"),
    (["export", "small_cnn", "--leaf", "Nope", "-o", "{tmp}/m.onnx"], r"--leaf 'Nope'"),
    (["bench", "small_cnn", "--timeout", "0"], r"--timeout 0 must be above 0"),
    (["bench", "small_cnn", "--lan", "1"], r"--lan '1' must be RTT_MS,MB_PER_S"),
    (["bench", "small_cnn", "--wan", "40,0"], r"--wan '40,0' needs a round-trip time >= 0 and a bandwidth > 0"),
    (["bench", "small_cnn", "--rank", "5", "--world-size", "2"], r"--rank 5 is out of range"),
    (["bench", "small_cnn", "--rank", "0", "--master-port", "70000"], r"--master-port 70000 is out of range"),
    (["bench", "small_cnn", "--master-port", "29501"], r"--master-port is for parties on separate hosts"),
    (["bench", "small_cnn", "--link", "1,-5"], r"--link '1,-5' needs a round-trip time >= 0 and a bandwidth > 0"),
    (["bench", "small_cnn", "--lan", "-1,100"], r"--lan '-1,100' needs a round-trip time >= 0"),
    (["bench", "small_cnn", "--wan", "nan,100"], r"--wan 'nan,100' needs a round-trip time >= 0"),
    (["bench", "small_cnn", "--dealer", "party1"], r"--dealer 'party1' is not a dealer of the crypten backend"),
    (["bench", "small_cnn", "--role", "dealer", "--rank", "0"], r"--role dealer takes no --rank"),
    (["bench", "small_cnn", "--role", "host"], r"--role 'host'"),
    (["bench", "small_cnn", "--role", "party"], r"--role party needs --rank N"),
    (["bench", "small_cnn", "--role", "dealer", "--dealer", "party0"], r"--dealer party0 has no dealer process"),
    (["bench", "small_cnn", "--role", "dealer", "--weights", "{tmp}/w.pt"], r"the dealer needs no weights"),
    (["bench", "small_cnn", "--dealer", ""], r"--dealer '' is not a dealer of the crypten backend"),
    (["bench", "small_cnn", "--world-size", "2"], r"--world-size is for parties on separate hosts"),
    (["bench", "small_cnn", "--parties", "3", "--rank", "0", "--world-size", "2"], r"--parties 3 and --world-size 2"),
    (["bench", "small_cnn", "--link", "{tmp}/none.json"], r"--link .*none.json is not a JSON file"),
    (["link", "--rank", "2", "--master-addr", "127.0.0.1"], r"--rank 2 is out of range; .* at most 1"),
    (["link", "--rank", "0", "--master-addr", "127.0.0.1", "--timeout", "-1"], r"--timeout -1 must be above 0"),
    (["run", "--baseline-epochs", "0"], r"--baseline-epochs 0 is out of range"),
    (["run", "--epochs", "-1"], r"--epochs -1 must be at least 0"),
    (["run", "--budgets", "1,,2"], r"has an empty entry"),
    (["run", "--strategy", "nope"], r"--strategy 'nope'"),
    (["run", "--weights", "{tmp}/none.pt"], r"--weights '.*none.pt' does not exist"),
]


@pytest.mark.parametrize("args,pattern", NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in NUMBERS])
def test_numbers_and_names_are_checked(tmp_path, args, pattern):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if pattern is None:
        usage_error(args, "--budget")
    else:
        fails(args, pattern)
    assert list(tmp_path.iterdir()) == []  # a refused command leaves nothing (no empty out/.work)


USAGE = [
    (["train", "small_cnn", "--epochs", "-1", "-o", "w.pt"], "--epochs"),
    (["bench", "small_cnn", "--samples", "0"], "--samples"),
    (["bench", "small_cnn", "--parties", "1"], "--parties"),
    (["export", "small_cnn", "-o", "m.onnx", "--opset", "99"], "--opset"),
]


@pytest.mark.parametrize("args,option", USAGE, ids=[o for _, o in USAGE])
def test_range_checks_name_the_option(args, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails(args, rf"{option} -?\d+ (is out of range|must be)")
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(["train", "small_cnn", *D, "--device", "cuda", "-o", tmp_path / "w.pt"], r"torch sees no CUDA device")


def test_validation_functions_directly():
    from relu_opt import validation

    with pytest.raises(ConfigError, match="--x 0 is out of range; give an integer of at least 1 and at most 3"):
        validation.check_int("--x", 0, 1, 3)
    validation.check_int("--x", None)
    with pytest.raises(ConfigError, match="not a finite number"):
        validation.check_float("--lr", float("-inf"))
    assert validation.parse_budgets(None, "1_000, 20") == [1000, 20]
    assert validation.parse_budgets(None, None, required=False) == []
    check = validation.check_model_input(create_model("resnet20"), (2, 3, 32, 32), "resnet20")
    assert check.output_shape == (2, 10)
    assert 2 * 188_416 * 4 < check.activation_bytes < 2 * 3_000_000 * 4  # ReLUs and convs of two samples


# --- 7. leftovers and secrets --------------------------------------------------------------------


def test_private_dir_is_0700_and_removed_on_error():
    root = private_root()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    with pytest.raises(RuntimeError), private_dir("bench") as d:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and d.parent == root
        (d / "model.onnx").write_bytes(b"weights")
        raise RuntimeError("boom")
    assert not d.exists()


def test_stale_private_dirs_of_dead_processes_are_cleared():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = private_root()
    stale = root / f"bench-{dead.pid}-abc"
    live = root / f"bench-{os.getpid()}-live"
    for d in (stale, live):
        d.mkdir()
        (d / "inputs.pt").write_bytes(b"secret")
    try:
        removed = clear_stale(root)
        assert stale in removed and not stale.exists() and live.exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


# --- 8. caches keyed on content -------------------------------------------------------------------


def test_cache_key_is_the_content_not_the_timestamp(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights v1")
    shutil.copyfile(a, b)  # copied without timestamps
    os.utime(b, (1, 1))
    assert file_digest(a) == file_digest(b)
    b.write_bytes(b"weights v2")
    os.utime(b, (os.stat(a).st_atime, os.stat(a).st_mtime))
    assert file_digest(a) != file_digest(b)


def test_every_cache_folder_follows_relu_opt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "c"))
    from relu_opt.errors import DataError

    with pytest.raises(DataError, match=re.escape(str(tmp_path / "c" / "data" / "cifar-10-batches-py"))):
        load_dataset("cifar10")
    from relu_opt.backends.crypten import calibration as cost_calibration

    assert cost_calibration.cache_dir() == tmp_path / "c"


def test_corrupt_file_error_is_a_relu_opt_error(tmp_path):
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"f '.*x.json' is not valid JSON"):
        read_json(tmp_path / "x.json", what="f")


@pytest.mark.parametrize(
    "option,pattern",
    [
        ({"lr": float("nan")}, r"lr nan is not a finite number"),
        ({"strategy": "nope"}, r"strategy 'nope' is not known"),
        ({"kd_alpha": 2.0}, r"--kd-alpha 2 must be at most 1"),
        ({"batch_size": 0}, r"--batch-size 0 is out of range"),
    ],
    ids=["lr", "strategy", "kd_alpha", "batch_size"],
)
def test_python_api_checks_the_config_too(tmp_path, option, pattern):
    import relu_opt

    with pytest.raises(ConfigError, match=pattern):
        relu_opt.optimize(_small(), load_dataset("synthetic"), budget=10, outdir=tmp_path / "o", **option)
    assert list(tmp_path.iterdir()) == []


def test_other_weights_in_the_same_folder_are_optimized_again(optimized_dir, tmp_path):
    """The cached result is keyed on the weights' content: new weights under the same name are not
    answered with the old model."""
    from relu_opt.optimizer import OptimizeConfig, optimize

    shutil.copytree(optimized_dir, tmp_path / "o")
    old = (tmp_path / "o" / "model.pt").read_bytes()
    other = _trained(seed=1)
    cfg = OptimizeConfig(budget=100, epochs=0.5, rank_samples=64, fit_samples=64, batch_size=64)
    optimize(other, load_dataset("synthetic"), cfg, tmp_path / "o", base_spec="small_cnn", progress=False)
    assert (tmp_path / "o" / "model.pt").read_bytes() != old
    assert len(list((tmp_path / "o" / ".work").glob("rank_*.pt"))) == 2  # one ranking per set of weights
    assert _optimize_small(tmp_path / "o").elements_after <= 100  # the first weights again: still valid


def test_state_digest_follows_the_values():
    from relu_opt.cache import state_digest

    a, b = _small(), _small()
    assert state_digest(a) == state_digest(b) != state_digest(a, extra="other data")
    with torch.no_grad():
        b.fc.weight[0, 0] += 1e-6
    assert state_digest(a) != state_digest(b)


def test_an_unforeseen_truncated_file_is_one_line_not_aborted(tmp_path, monkeypatch):
    def truncated(*_a, **_k):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr("relu_opt.data.load_dataset", truncated)
    msg = fails(["train", "small_cnn", "-o", tmp_path / "w.pt"], r"a file ended early \(truncated\?\): Compressed")
    assert "Aborted" not in msg


def test_temp_file_of_a_killed_writer_is_cleared(tmp_path):
    from relu_opt import atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".plan.json.{dead.pid}.abc123.tmp"  # what SIGKILL mid-write leaves
    mine = tmp_path / f".plan.json.{os.getpid()}.def456.tmp"  # a write in flight in a live process
    left.write_text('{"half')
    mine.write_text('{"half')
    atomic.write_json(tmp_path / "plan.json", {"ok": 1})
    assert json.loads((tmp_path / "plan.json").read_text()) == {"ok": 1}
    assert not left.exists() and mine.exists()


def test_output_that_is_a_pipe_is_refused_not_replaced(tmp_path):
    """A device or pipe (think -o /dev/null as root) must not be renamed over by the atomic write."""
    from relu_opt import atomic

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    fails(["export", "small_cnn", "-o", pipe], r"-o '.*pipe' is a device, pipe or socket, not a file")
    fails(["count", "small_cnn", "--json", pipe], r"--json '.*pipe' is a device, pipe or socket")
    with pytest.raises(ConfigError, match="is not a regular file"):
        atomic.write_json(pipe, {"x": 1})
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_a_head_too_big_for_memory_is_one_line():
    huge = 10**12  # a 10^12-class head: hundreds of terabytes on any machine
    fails(["count", "small_cnn", "--num-classes", huge], rf"building 'small_cnn' with {huge} classes .* failed: ")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["resnet20"], r"MODEL on input shape 1,1,12,12 fails: .* was optimized for inputs 1,1,12,12"),
        (["small_cnn", "--input-shape", "1,1,12,12"], r"outputs shape \(1, 4\) but MODEL outputs \(1, 10\)"),
    ],
    ids=["other-input", "other-classes"],
)
def test_optimized_folder_of_another_model(optimized_dir, args, pattern):
    fails(["bench", *args, "--optimized", optimized_dir], pattern)


def test_run_refuses_a_budget_the_model_cannot_meet_before_training(tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    fails(
        ["run", "small_cnn", "--data", "digits", "--budget", 10**9, "--runs-dir", runs, "--cache-dir", cache],
        r"budget 1,000,000,000 is not below the model's [\d,]+ ReLU elements",
    )
    assert not runs.exists() and not (cache / "baselines").exists()
