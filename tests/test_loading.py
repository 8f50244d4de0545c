import textwrap

import pytest
import torch
from torch import nn

import relu_opt
from relu_opt.errors import ModelSpecError, TraceError, WeightsError
from relu_opt.loading import load_weights, resolve_model

USER_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Gated(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return torch.relu(x)
            return x

    class Net(nn.Module):
        default_input_shape = (1, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = Gated()

        def forward(self, x):
            return self.gate(self.conv(x)).relu()

    class Plain(nn.Module):
        default_input_shape = (1, 3, 8, 8)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    def make_plain():
        return Plain()

    def not_a_model():
        return 3
    """
)


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "user_models.py"
    p.write_text(USER_MODELS)
    return p


def test_file_spec_class_and_factory(user_file):
    a = resolve_model(f"{user_file}:Plain")
    b = resolve_model(f"{user_file}:make_plain")
    assert isinstance(a.model, nn.Module) and a.default_input_shape == (1, 3, 8, 8)
    assert type(b.model).__name__ == "Plain"


def test_package_module_spec():
    loaded = resolve_model("relu_opt.models.small_cnn:small_cnn")
    assert (
        relu_opt.count(loaded.model, torch.randn(1, 3, 32, 32)).total_relu == 16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8
    )


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("missing_dir/nope.py:Net", "does not exist"),
        ("{file}:Nope", "has no attribute 'Nope'"),
        ("{file}:not_a_model", "not a torch.nn.Module"),
        ("no_such_pkg_xyz.mod:f", "cannot import module 'no_such_pkg_xyz.mod'"),
        ("resnet2O", "unknown model 'resnet2O'"),
        ("{file}", "names a file but no class"),
    ],
)
def test_bad_model_specs(user_file, spec, needle):
    with pytest.raises(ModelSpecError, match=needle) as info:
        resolve_model(spec.format(file=user_file))
    if "Nope" in spec:
        assert "Net" in str(info.value) and "make_plain" in str(info.value)  # lists what is there
    if spec == "resnet2O":
        assert "resnet20" in str(info.value)


def test_trace_error_names_module_and_line(user_file):
    model = resolve_model(f"{user_file}:Net").model
    with pytest.raises(TraceError) as info:
        relu_opt.count(model, torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "'gate' (Gated)" in msg
    assert "user_models.py:7" in msg and "if x.sum() > 0" in msg
    assert "--leaf Gated" in msg
    c = relu_opt.count(model, torch.randn(1, 3, 8, 8), leaf=["Gated"])
    assert c.total_relu == 4 * 8 * 8  # only the traceable .relu(); the leaf is opaque


def _save(tmp_path, state, name="w.pt"):
    p = tmp_path / name
    torch.save(state, p)
    return p


def test_weights_round_trip_and_checkpoint_dict(tmp_path):
    src = relu_opt.create_model("small_cnn")
    dst = relu_opt.create_model("small_cnn")
    load_weights(dst, _save(tmp_path, {"state_dict": src.state_dict(), "epoch": 3}))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_weights_errors(tmp_path):
    model = relu_opt.create_model("small_cnn")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "none.pt")
    state = model.state_dict()
    wrong_keys = {("x." + k): v for k, v in state.items()}
    with pytest.raises(WeightsError, match=r"missing keys: features\.0\.weight.*\(\+\d+ more\).*unexpected keys"):
        load_weights(model, _save(tmp_path, wrong_keys))
    other = relu_opt.create_model("small_cnn", num_classes=7).state_dict()
    with pytest.raises(WeightsError, match=r"wrong shapes: fc\.weight \(7, 64\) vs model \(10, 64\)"):
        load_weights(model, _save(tmp_path, other))
    bad = dict(state)
    bad["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    with pytest.raises(WeightsError, match=r"non-finite .* fc\.bias"):
        load_weights(model, _save(tmp_path, bad))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(model, tmp_path / "junk.pt")
    with pytest.raises(WeightsError, match="state dict of tensors"):
        load_weights(model, _save(tmp_path, [1, 2, 3]))
