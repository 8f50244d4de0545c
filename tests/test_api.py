"""The library comes first: the command line is a thin layer over relu_opt's public API, the API does
what the commands do, and one code path ranks for `rank` and `optimize`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import relu_opt
from relu_opt.cli import app
from relu_opt.data import load_dataset

ROOT = Path(relu_opt.__file__).parent
CLI_MAY_IMPORT = {"relu_opt", "relu_opt.render", "relu_opt.cli_options"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _commands() -> dict[str, ast.FunctionDef]:
    """Return the CLI's command functions by command name (from the @command decorators)."""
    out = {}
    for node in _tree(ROOT / "cli.py").body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "command":
                    out[d.args[0].value] = node
    return out


def test_every_command_is_a_thin_call_of_the_public_api():
    imports = set()
    for node in ast.walk(_tree(ROOT / "cli.py")):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relu_opt"):
            imports.add(node.module + "." + node.names[0].name if node.module == "relu_opt" else node.module)
        if isinstance(node, ast.Import):
            imports |= {a.name for a in node.names if a.name.startswith("relu_opt")}
    assert imports <= CLI_MAY_IMPORT | {"relu_opt.render", "relu_opt.cli_options"}, imports
    commands = _commands()
    assert set(commands) == {"models", "count", "export", "bench", "link", "train", "rank", "optimize", "run", "report"}
    public = set(relu_opt.__all__)
    for name, fn in commands.items():
        used = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "ro"}
        assert used <= public, (name, used - public)
        called = {
            n.func.attr
            for n in ast.walk(fn)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "ro"
        }
        doing = called - {"check_writable", "check_optimize", "write_json", "ConfigError", "Pricing", "OptimizeConfig"}
        doing -= {"RunConfig", "HostRole", "parse_network"}
        assert doing, f"`relu-opt {name}` calls no API function"
    assert len((ROOT / "cli.py").read_text().splitlines()) < 450


def test_no_module_imports_another_modules_private_name():
    bad = []
    for path in ROOT.rglob("*.py"):
        modules = _module_aliases(path)
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relu_opt"):
                bad += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if _private(a.name)]
            named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            if named and _private(node.attr) and node.value.id in modules:
                bad.append(f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert not bad, bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(path: Path) -> set[str]:
    """Return the names `path` binds to relu_opt modules (import relu_opt.x as y; from relu_opt import x)."""
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.startswith("relu_opt")}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relu_opt"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if (ROOT.parent / (full.replace(".", "/") + ".py")).is_file() or (
                    ROOT.parent / full.replace(".", "/")
                ).is_dir():
                    names.add(a.asname or a.name)
    return names


def test_the_optimizer_is_composed_of_parts_and_its_optimize_is_short():
    tree = _tree(ROOT / "optimizer" / "__init__.py")
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "optimize")
    assert fn.end_lineno - fn.lineno + 1 < 60
    parts = {p.stem for p in (ROOT / "optimizer").glob("*.py")} - {"__init__"}
    assert {"config", "planner", "tuner", "exporter", "search", "ranking_cache"} <= parts


def _scores_of_rank_cli(tmp_path: Path, *options: str) -> dict[str, float]:
    out = tmp_path / "rank.json"
    args = ["rank", "resnet20", "--pretrained", "--data", "fashion-mnist", *options, "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return {row["site"]: row["score"] for row in json.loads(out.read_text())["sites"]}


@pytest.mark.slow
def test_rank_and_optimize_rank_alike_for_any_replacement(tmp_path, monkeypatch):
    """`relu-opt rank ... --replace square` scores what `optimize --replace square` ranks with: before, rank
    fitted its own polynomials whatever --replace said, and knew only ReLU sites."""
    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "cache"))
    try:
        load_dataset("fashion-mnist", download=False)
    except relu_opt.ReluOptError as exc:
        pytest.skip(f"Fashion-MNIST is not installed here: {exc}")
    square = _scores_of_rank_cli(tmp_path, "--replace", "square", "--samples", "256")
    poly = _scores_of_rank_cli(tmp_path, "--samples", "256")
    assert square.keys() == poly.keys() and len(square) == 19
    assert max(abs(square[s] - poly[s]) / max(abs(poly[s]), 1e-12) for s in square) > 0.05  # the replacement counts

    m = relu_opt.load_model("resnet20", pretrained=True, data="fashion-mnist")
    r = relu_opt.optimize(
        m.model,
        m.data,
        budget=140_000,
        outdir=tmp_path / "o",
        replace="square",
        rank_samples=256,
        epochs=0,
        selector="count",
    )
    from_optimize = {s.site: s.score for s in r.sites}
    assert from_optimize.keys() == square.keys()
    for site, score in square.items():
        assert from_optimize[site] == pytest.approx(score, rel=1e-6, abs=1e-12), site


def test_run_prices_selection_with_the_cost_model_of_its_own_pricing(tmp_path, monkeypatch):
    """`run --parties 3 --cache-dir X` asks the backend for the 3-party cost model in X when it selects
    (before, the selection loaded the default 2-party model from the default cache)."""
    from relu_opt.backends.crypten import CrypTenBackend

    asked = []

    class Selected(Exception):
        pass

    def cost_model_asked(self, pricing, note=None):
        asked.append(pricing)
        raise Selected

    monkeypatch.setattr(CrypTenBackend, "load_cost_model", cost_model_asked)
    monkeypatch.setenv("RELU_OPT_CACHE", str(tmp_path / "default-cache"))
    cache = tmp_path / "X"
    args = ["run", "small_cnn", "--data", "digits", "--budget", "500", "--parties", "3", "--cache-dir", str(cache)]
    args += ["--baseline-epochs", "1", "--runs-dir", str(tmp_path / "runs")]
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, Selected), r.output
    assert [(p.parties, p.cache) for p in asked] == [(3, str(cache))]
    assert not (tmp_path / "default-cache" / "cost_models").exists()


def test_the_api_refuses_what_the_cli_refuses(tmp_path):
    m = relu_opt.load_model("small_cnn", data="synthetic", input_shape=(1, 1, 12, 12))
    cases = [
        (lambda: relu_opt.optimize(m.model, m.data, budget="10", outdir=tmp_path / "o"), r"--budget '10' is a str"),
        (lambda: relu_opt.optimize(m.model, m.data, budget=-3, outdir=tmp_path / "o"), r"--budget -3 is negative"),
        (lambda: relu_opt.count(m.model, (1, 1, 12, 12)), r"example is a tuple, not a tensor"),
        (lambda: relu_opt.count(m.model, torch.zeros(1, 3, 32, 32)), r"on input shape 1,3,32,32 fails"),
        (lambda: relu_opt.optimize(m.model, m.data, outdir=tmp_path / "o", selector="count"), r"needs --budget"),
        (lambda: relu_opt.optimize(m.model, m.data, budget=10, outdir=tmp_path / "o", nope=1), r"unexpected keyword"),
    ]
    for call, pattern in cases:
        with pytest.raises(relu_opt.ReluOptError, match=pattern):
            call()
    assert list(tmp_path.iterdir()) == []  # every refusal leaves nothing behind
