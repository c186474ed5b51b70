"""chop.cli.sources: "module:callable" references imported from the config's folder, and user
code whose every failure becomes a ConfigError naming the key and the line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chop.cli.sources import call_user, import_callable, is_reference
from chop.errors import ConfigError


@pytest.fixture
def folder(tmp_path: Path):
    """A config folder; modules the test imports from it are forgotten afterwards."""
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(folder: Path, name: str, code: str) -> Path:
    path = folder / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code)
    return path


@pytest.mark.parametrize(("source", "expected"), [
    ("models:LeNet5", True), ("pkg.mod:Class.build", True), ("models:", False),
    (":LeNet5", False), ("digits", False), ("lenet-300-100", False), ("data.pt", False),
])
def test_is_reference(source, expected):
    assert is_reference(source) is expected


def test_import_callable_from_the_config_folder(folder):
    write(folder, "srcmod_a", "def build(width=3):\n    return ['model', width]\n"
                              "class Zoo:\n    @staticmethod\n    def make():\n        return 'made'\n")
    path_before = list(sys.path)
    build = import_callable("srcmod_a:build", folder, "model.source")
    assert build(width=5) == ["model", 5]
    assert import_callable("srcmod_a:Zoo.make", folder, "model.source")() == "made"
    assert sys.path == path_before  # the folder is not left on sys.path


def test_a_package_module_in_the_folder(folder):
    write(folder, "srcpkg_b/__init__", "")
    write(folder, "srcpkg_b/data", "def batches():\n    return [1, 2]\n")
    assert import_callable("srcpkg_b.data:batches", folder, "data.source")() == [1, 2]


def test_a_same_named_module_from_elsewhere_is_replaced_by_the_folders(folder):
    other, mine = folder / "other", folder / "mine"
    write(other, "srcmod_c", "def which():\n    return 'other'\n")
    write(mine, "srcmod_c", "def which():\n    return 'mine'\n")
    assert import_callable("srcmod_c:which", other, "model.source")() == "other"
    assert import_callable("srcmod_c:which", mine, "model.source")() == "mine"
    assert import_callable("srcmod_c:which", mine, "model.source")() == "mine"


def test_missing_module(folder):
    with pytest.raises(ConfigError, match=r"^model\.source = 'srcmod_none:build': no module named "
                                          r"'srcmod_none' in .*; put srcmod_none\.py next to the config"):
        import_callable("srcmod_none:build", folder, "model.source")
    write(folder, "srcmod_py", "def build():\n    return 1\n")  # named as its file
    with pytest.raises(ConfigError, match=r"name the module without \.py, as Python imports it: "
                                          r"\"srcmod_py:build\""):  # was: put srcmod_py/py.py
        import_callable("srcmod_py.py:build", folder, "model.source")


def test_module_importing_a_missing_package(folder):
    path = write(folder, "srcmod_d", "import srcpkg_not_installed\n")
    with pytest.raises(ConfigError, match=r"^data\.source = 'srcmod_d:f': importing srcmod_d failed: "
                                          r"No module named 'srcpkg_not_installed' \(at .*srcmod_d\.py:1\); "
                                          r"install the missing package") as info:
        import_callable("srcmod_d:f", folder, "data.source")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert str(path) in str(info.value)


def test_module_raising_while_importing(folder):
    write(folder, "srcmod_e", "x = 1\ny = x / 0\n")
    with pytest.raises(ConfigError, match=r"importing srcmod_e failed: ZeroDivisionError: division by "
                                          r"zero \(at .*srcmod_e\.py:2\)$") as info:
        import_callable("srcmod_e:f", folder, "model.source")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_missing_or_uncallable_attribute(folder):
    write(folder, "srcmod_f", "def build_model():\n    pass\nWIDTH = 3\n")
    with pytest.raises(ConfigError, match=r"module srcmod_f \(.*srcmod_f\.py\) has no attribute "
                                          r"'build_modle' \(did you mean 'build_model'\?\)"):
        import_callable("srcmod_f:build_modle", folder, "model.source")
    with pytest.raises(ConfigError, match=r"has no attribute 'build_model.x'"):
        import_callable("srcmod_f:build_model.x", folder, "model.source")
    with pytest.raises(ConfigError, match=r"^model\.source = 'srcmod_f:WIDTH': WIDTH is a int, not callable$"):
        import_callable("srcmod_f:WIDTH", folder, "model.source")


def test_call_user_returns_or_wraps_the_failure():
    assert call_user(lambda a, b: a + b, {"a": 1, "b": 2}, "model.source", "m:f") == 3

    def build(width):
        raise ValueError(f"bad width {width}")

    with pytest.raises(ConfigError, match=r"^model\.source = 'm:build': calling build\(width=4\) "
                                          r"failed: ValueError: bad width 4 \(at .*test_sources\.py:\d+\)$") as info:
        call_user(build, {"width": 4}, "model.source", "m:build")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ConfigError, match=r"calling build\(\) failed: TypeError"):
        call_user(build, {}, "model.source", "m:build")
