"""The threat model holds: party 0 (the model owner) cannot rebuild the client's input from its own view
under the default dealer, and can under the labelled insecure one (the attack must be able to succeed)."""

import ast
import re
from pathlib import Path

import pytest
import torch

from relu_opt.backends import INSECURE_LABEL, Pricing
from relu_opt.backends.crypten.convert import prepare
from relu_opt.backends.crypten.privacy import attack_input
from relu_opt.data import load_dataset
from relu_opt.models import create_model
from relu_opt.models.pretrained import list_pretrained, load_pretrained

PACKAGE = Path(__file__).parent.parent / "relu_opt"


@pytest.fixture(scope="module")
def resnet20_and_image():
    model = create_model("resnet20", in_channels=1)
    load_pretrained(model, list_pretrained("resnet20")[0])
    x = load_dataset("fashion-mnist").test.x[:1]
    return [("original", prepare(model.eval(), x))], x


@pytest.mark.slow
@pytest.mark.parties
def test_party0_as_dealer_reads_the_input_and_a_third_party_dealer_stops_it(resnet20_and_image):
    models, x = resnet20_and_image
    insecure = attack_input(models, x, "party0")
    assert insecure.recovered and insecure.error < 1e-4  # every pixel, to fixed-point rounding
    assert torch.allclose(torch.tensor(insecure.guess, dtype=torch.float64).reshape(x.shape), x.double(), atol=1e-4)
    secure = attack_input(models, x, Pricing().dealer_name)
    assert Pricing().dealer_name == "third-party" and not secure.recovered
    # the best candidate from party 0's view is no better than guessing a blank image
    assert secure.error >= 0.5 * float(x.abs().max()) and secure.recorded >= insecure.recorded - 1


def test_the_insecure_dealer_is_labelled_and_never_the_default():
    assert Pricing().insecure is None
    assert Pricing(dealer="party0").insecure == INSECURE_LABEL == "INSECURE: party 0 can read the input"
    assert not Pricing().engine().dealer().insecure


def _names_outside_backends(path: Path) -> list[str]:
    """Return the imports, names and strings of a module (not its docstrings or comments) that name CrypTen."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
        elif isinstance(node, ast.Name):
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.append(node.name)
    return [f for f in found if re.search(r"crypten|\b(ttp|tfp)\b", f, re.IGNORECASE)]


def test_nothing_outside_the_backends_names_the_engine():
    modules = [p for p in PACKAGE.rglob("*.py") if "backends" not in p.relative_to(PACKAGE).parts]
    assert len(modules) > 40
    offenders = {str(p.relative_to(PACKAGE)): names for p in modules if (names := _names_outside_backends(p))}
    assert offenders == {}


def test_the_engine_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may name CrypTen."""\nimport crypten  # not this\nx = "TTP"\n')
    assert _names_outside_backends(bad) == ["crypten", "TTP"]
