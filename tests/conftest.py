import os

import pytest
import torch

# Marks for single cases of a parametrized test, where a decorator would mark every case.
CASE_MARKS = {
    "tests/test_examples.py::test_example_runs[bench_encrypted.py]": ("parties",),  # relu_opt.bench: 2 parties
    "tests/test_export.py::test_zoo_onnx_parity_and_relu_count[wide_resnet22_8]": ("slow",),  # 1.6-1.8 s
}


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in CASE_MARKS.get(item.nodeid, ()):
            item.add_marker(name)
        if item.get_closest_marker("parties") or item.get_closest_marker("multihost"):
            item.add_marker("slow")  # a test that launches parties or namespaces is slow, marked or not


@pytest.fixture(autouse=True, scope="session")
def _temporary_cache(tmp_path_factory):
    """Point relu-opt's cache ($RELU_OPT_CACHE) at one temporary folder for the whole session, so no test
    reads from or writes into the user's ~/.cache/relu-opt, while the cost-model calibrations a test
    measures are shared with the later tests instead of redone. Subprocesses (the CLI, the parties, the
    examples) inherit it. A RELU_OPT_CACHE already set (CI may pre-seed one) is kept as it is."""
    before = os.environ.get("RELU_OPT_CACHE")
    if before:
        yield before
        return
    path = tmp_path_factory.mktemp("cache")
    os.environ["RELU_OPT_CACHE"] = str(path)
    try:
        yield str(path)
    finally:
        if before is None:
            os.environ.pop("RELU_OPT_CACHE", None)
        else:  # set but empty, which relu-opt reads as unset
            os.environ["RELU_OPT_CACHE"] = before


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
