"""chop.cli.models: the built-in LeNet-300-100 and building the model ``[model]`` names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from chop.cli.config import ModelSpec
from chop.cli.models import BUILTIN, LeNet300100, build_model
from chop.errors import ConfigError


@pytest.fixture
def folder(tmp_path: Path):
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_lenet_300_100_shapes_and_forward():
    torch.manual_seed(0)
    model = LeNet300100()
    assert [tuple(p.shape) for p in model.parameters()] == [
        (300, 784), (300,), (100, 300), (100,), (10, 100), (10,)]
    x = torch.randn(5, 1, 28, 28)
    expected = model.fc3(torch.relu(model.fc2(torch.relu(model.fc1(x.reshape(5, -1))))))
    torch.testing.assert_close(model(x), expected)
    small = LeNet300100(in_features=64, num_classes=3)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_builtin_models_by_name_with_kwargs(tmp_path):
    assert set(BUILTIN) == {"lenet-300-100"}
    model = build_model(ModelSpec("lenet-300-100", {"in_features": 16, "num_classes": 4}), tmp_path)
    assert isinstance(model, LeNet300100) and model.fc1.in_features == 16
    assert model.fc3.out_features == 4


def test_a_callable_from_the_config_folder(folder):
    (folder / "mdlmod_a.py").write_text(
        "import torch.nn as nn\n"
        "def make(width=4):\n    return nn.Linear(3, width)\n")
    model = build_model(ModelSpec("mdlmod_a:make", {"width": 7}), folder)
    assert isinstance(model, nn.Linear) and model.out_features == 7


def test_unknown_builtin_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.source = 'lenet-300' is neither \"module:callable\" "
                                          r"nor a built-in model \(did you mean 'lenet-300-100'\?\); "
                                          r"built-in models: lenet-300-100$"):
        build_model(ModelSpec("lenet-300"), tmp_path)
    with pytest.raises(ConfigError, match=r"'resnet' is neither .*built-in model; built-in models"):
        build_model(ModelSpec("resnet"), tmp_path)


def test_factory_failures_and_non_modules_are_config_errors(folder):
    (folder / "mdlmod_b.py").write_text(
        "def not_a_model():\n    return {'weights': 1}\n"
        "def broken(width):\n    raise RuntimeError('no GPU')\n")
    with pytest.raises(ConfigError, match=r"'mdlmod_b:not_a_model' returned a dict, not a torch\.nn\.Module"):
        build_model(ModelSpec("mdlmod_b:not_a_model"), folder)
    with pytest.raises(ConfigError, match=r"calling broken\(width=2\) failed: RuntimeError: no GPU"):
        build_model(ModelSpec("mdlmod_b:broken", {"width": 2}), folder)
    with pytest.raises(ConfigError, match=r"LeNet300100\(depth=3\) failed: TypeError"):
        build_model(ModelSpec("lenet-300-100", {"depth": 3}), folder)
    with pytest.raises(ConfigError, match=r"no module named 'mdlmod_missing'"):
        build_model(ModelSpec("mdlmod_missing:make"), folder)
