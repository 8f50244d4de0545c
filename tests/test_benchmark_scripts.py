"""The GPU benchmark script runs on CPU on a tiny CIFAR-10 folder that the test writes."""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_data import _cifar_folder

ROOT = Path(__file__).parent.parent


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
