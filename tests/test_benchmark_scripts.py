"""The GPU benchmark script runs on CPU on a tiny CIFAR-10 folder that the test writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import _cifar_folder

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_cifar_resnet18_tiny(tmp_path):
    _cifar_folder(tmp_path / "data", "cifar10")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cifar_resnet18.py"),
            "--data-dir",
            str(tmp_path / "data"),
            "--max-train",
            "32",
            "--baseline-epochs",
            "1",
            "--epochs",
            "0.5",
            "--budgets",
            "50000,12900",
            "--strategy",
            "taylor",
            "--replace",
            "identity",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "cifar_resnet18.json").read_text())
    assert result["baseline"]["relu"] == 557_056
    assert [row["relu"] <= row["budget"] for row in result["rows"]] == [True, True]
    assert result["device"].startswith("CPU")
    assert (out / "cifar_resnet18.png").is_file()


def test_pareto_markdown_checks_targets_and_keeps_failed_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pareto_bench", ROOT / "benchmarks" / "pareto.py")
    pareto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pareto)
    row = {"strategy": "taylor", "replace": "poly", "granularity": "channel", "seed": 0, "epochs": 1.0, "wall_s": 9}
    result = {
        "baseline": {"relu": 144256, "test_accuracy": 94.46, "epochs": None, "source": "pretrained"},
        "rows": [
            {**row, "budget": 7212, "relu": 7212, "test_accuracy": 94.1},  # 20x, -0.36: met
            {**row, "budget": 1442, "relu": 1442, "test_accuracy": 93.2},  # 100x, -1.26: missed
            {**row, "strategy": "random", "budget": 1442, "relu": 1442, "test_accuracy": None, "failed": "diverged"},
        ],
        "machine": {"cpus": 2, "platform": "linux", "torch": "2.13.0"},
    }
    md = pareto.markdown(result)
    assert "shipped pretrained weights" in md
    assert "| 20x | 94.10% | -0.36 | met (20x, <=0.5) | 9 | - |" in md  # no attempts recorded
    assert "| 100x | 93.20% | -1.26 | missed (100x, <=1) |" in md
    assert "| random | poly | channel | 1 | 1,442 | 0 | 1,442 | 100x | failed | - | - |" in md
    result["rows"].append({**row, "seed": 1, "budget": 7212, "relu": 7212, "test_accuracy": 93.8})
    assert pareto.seed_spread(result["rows"]) == [
        {
            "strategy": "taylor",
            "granularity": "channel",
            "budget": 7212,
            "seeds": 2,
            "failed": 0,
            "retried": 0,
            "min": 93.8,
            "max": 94.1,
            "mean": 93.95,
        }
    ]
    assert "| taylor | 7,212 | 2 | 0 | 0 | 93.80% | 94.10% | 93.95% | 0.30 |" in pareto.markdown(result)
    result["rows"].append({**row, "strategy": "random", "budget": 7212, "relu": 7212, "test_accuracy": 93.9})
    seed0 = {"strategy": "taylor", "granularity": "channel", "budget": 7212, "accuracy": 94.1, "random": 93.9}
    assert pareto.versus_random(result["rows"]) == [{**seed0, "difference": 0.2}]
    # with seeds on both sides the means are compared too; a failed seed is left out of the mean, not zero
    result["rows"] += [
        {**row, "strategy": "random", "seed": 1, "budget": 7212, "relu": 7212, "test_accuracy": 93.5},
        {**row, "strategy": "random", "seed": 2, "budget": 7212, "relu": 7212, "test_accuracy": None},
    ]
    assert pareto.versus_random(result["rows"]) == [
        {**seed0, "difference": 0.2, "mean": 93.95, "random_mean": 93.7, "mean_difference": 0.25, "seeds": [2, 2]}
    ]
    assert "| +0.20 | 93.95% | 93.70% | +0.25 | 2/2 |" in pareto.markdown(result)
    # a row fine-tuned with the range penalty is another setting: not a seed of the plain rows
    result["rows"].append({**row, "seed": 2, "budget": 7212, "relu": 7212, "test_accuracy": 90.0, "range_weight": 1.0})
    assert [s["seeds"] for s in pareto.seed_spread(result["rows"]) if s["strategy"] == "taylor"] == [2]


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pareto_results_merge_across_invocations_on_the_same_baseline(tmp_path):
    pareto = _load_script("pareto")
    row = {"strategy": "taylor", "replace": "poly", "granularity": "channel", "seed": 0, "epochs": 1.0, "wall_s": 9}
    base = {"relu": 144256, "test_accuracy": 94.46, "sha256": "abc", "source": "pretrained"}
    stem = tmp_path / "pareto_fashion_resnet20"
    pareto.write_results(
        stem, base, [{**row, "budget": 7212, "relu": 7203, "test_accuracy": 94.0}], 144256, 94.46, complete=False
    )
    assert json.loads(stem.with_suffix(".json").read_text())["complete"] is False
    assert "Incomplete" in stem.with_suffix(".md").read_text() and stem.with_suffix(".png").is_file()
    assert [r["budget"] for r in pareto.earlier_rows(stem, base)] == [7212]
    assert pareto.earlier_rows(stem, {**base, "sha256": "other weights"}) == []


def test_latency_frontier_compares_at_equal_accuracy_loss_limits():
    lf = _load_script("latency_frontier")

    def r(selector, budget, level, relu, val, test, rounds, wan):
        return {
            "selector": selector,
            "budget": budget,
            "level": level,
            "relu": relu,
            "val_accuracy": val,
            "test_accuracy": test,
            "rounds": rounds,
            "wan_s": wan,
        }

    rows = [
        r("count", 14425, None, 14406, 93.7, 94.0, 170, 6.9),
        r("count", 7212, None, 7203, 93.6, 93.9, 102, 4.1),
        r("count", 1442, None, 1440, 92.9, 93.2, 90, 3.7),  # 1.18 below: outside both limits
        r("latency", None, 0.35, 6272, 93.7, 93.9, 58, 2.4),
        r("latency", None, 0.3, 3136, 93.3, 93.5, 49, 2.0),  # 0.78 below: within 1 only
    ]
    a, b = lf.at_limits(rows, 94.08, [0.5, 1.0])
    assert (a["latency"], a["count"], a["fewer_rounds"], a["lower_wan"]) == ("0.35x latency", "7,212 ReLUs", 1.76, True)
    assert (b["latency"], b["count"], b["rounds"]) == ("0.3x latency", "7,212 ReLUs", [49, 102])
    assert lf.at_limits(rows[:3], 94.08, [0.5])[0]["latency"] is None


@pytest.mark.slow
def test_distributed_epochs_records_one_row_per_process_count(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed_epochs.py"), "--model", "small_cnn"]
    cmd += ["--data", "digits", "--epochs", "2", "--nprocs", "1,2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "distributed_epochs.json").read_text())
    assert [row["processes"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert len(row["epoch_s"]) == 2 and all(s > 0 for s in row["epoch_s"]) and row["val_accuracy"] > 30
    assert "| 2 |" in (tmp_path / "distributed_epochs.md").read_text()
