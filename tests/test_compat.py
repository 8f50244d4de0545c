"""Each CrypTen compatibility repair: the failure it fixes, and that the repair fixes it."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from relu_opt.backends.crypten import compat

crypten = compat.import_crypten()


def _model(nodes, inits=(), out_shape=(1, 4)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
        initializer=list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _convert(mp):
    return crypten.nn.from_onnx(mp.SerializeToString())


@pytest.mark.slow
def test_registration_alias_is_needed_and_fixes_import():
    assert compat.registration_alias_needed()  # this torch moved the module crypten imports
    bare = subprocess.run([sys.executable, "-c", "import crypten"], capture_output=True, text=True)
    assert bare.returncode != 0 and "torch.onnx._internal.registration" in bare.stderr
    fixed = subprocess.run(
        [sys.executable, "-c", "from relu_opt.backends.crypten.compat import import_crypten; import_crypten()"],
        capture_output=True,
        text=True,
    )
    assert fixed.returncode == 0, fixed.stderr


def test_identity_removed():
    w = numpy_helper.from_array(np.full((1, 4), 2.0, dtype=np.float32), "w")
    mp = _model(
        [helper.make_node("Identity", ["w"], ["w2"]), helper.make_node("Mul", ["input", "w2"], ["output"])], [w]
    )
    with pytest.raises(ValueError, match="does not support ONNX op Identity"):
        _convert(mp)
    model = _convert(compat.remove_identity(mp))
    x = torch.arange(4.0).reshape(1, 4)
    assert torch.allclose(model(x), 2 * x)


def test_identity_as_graph_output_keeps_the_output_name():
    mp = _model([helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Identity", ["r"], ["output"])])
    fixed = compat.remove_identity(mp)
    assert [n.op_type for n in fixed.graph.node] == ["Relu"] and fixed.graph.node[0].output[0] == "output"
    x = torch.tensor([[-1.0, 2.0, -3.0, 4.0]])
    assert torch.equal(_convert(fixed)(x), x.relu())


def test_repeated_input_rewritten_as_pow():
    mp = _model([helper.make_node("Mul", ["input", "input"], ["output"])])
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    with pytest.raises(ValueError, match="Is graph unconnected"):
        _convert(mp)(x)
    assert torch.allclose(_convert(compat.dedupe_repeated_inputs(mp))(x), x * x)
    add = _model([helper.make_node("Add", ["input", "input"], ["output"])])
    assert torch.allclose(_convert(compat.dedupe_repeated_inputs(add))(x), 2 * x)


def test_integer_initializers_become_constants():
    idx = numpy_helper.from_array(np.array([3, 0], dtype=np.int64), "idx")
    mp = _model([helper.make_node("Gather", ["input", "idx"], ["output"], axis=1)], [idx], out_shape=(1, 2))
    with pytest.raises(RuntimeError, match="floating point"):
        _convert(mp)
    fixed = compat.integer_initializers_to_constants(mp)
    assert not fixed.graph.initializer
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(_convert(fixed)(x), x[:, [3, 0]])


def test_repair_leaves_input_untouched():
    mp = _model([helper.make_node("Mul", ["input", "input"], ["output"])])
    before = mp.SerializeToString()
    compat.repair_for_crypten(mp)
    assert mp.SerializeToString() == before
    onnx.checker.check_model(compat.repair_for_crypten(mp))
