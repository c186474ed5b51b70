"""chop.errors: two families (user mistakes vs bugs), every class exported from ``chop``, and
the did-you-mean hint."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import chop
from chop import errors
from chop.errors import ChopError, InternalError, LintError, did_you_mean

BUGS = {"InternalError", "LintError"}
ALL_ERRORS = {
    name for name, value in vars(errors).items()
    if inspect.isclass(value) and issubclass(value, BaseException)
    and value.__module__ == errors.__name__
}
# every other class of chop.errors is a user mistake (new ones included)
USER_ERRORS = ALL_ERRORS - BUGS - {"ChopError"}


def test_the_known_classes_are_all_there():
    assert {"TraceError", "PipelineError", "OptionError", "GranularityError",
            "MissingMetadataError", "DataError", "PassError", "CollapseError", "ConfigError",
            "CheckpointError", "OutputError", "ReportError"} <= USER_ERRORS
    assert {"ChopError", *BUGS} <= ALL_ERRORS


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_errors_are_chop_errors_and_not_internal(name):
    cls = getattr(errors, name)
    assert issubclass(cls, ChopError)
    assert not issubclass(cls, InternalError)
    with pytest.raises(ChopError):  # `except chop.ChopError` catches it
        raise cls("x")


def test_granularity_error_is_an_option_error():
    assert issubclass(errors.GranularityError, errors.OptionError)


@pytest.mark.parametrize("cls", [InternalError, LintError])
def test_bugs_are_not_chop_errors(cls):
    assert not issubclass(cls, ChopError)
    assert issubclass(cls, InternalError) and issubclass(cls, Exception)
    try:
        raise cls("a bug")
    except ChopError:  # pragma: no cover - the point of the test
        pytest.fail(f"except ChopError swallowed {cls.__name__}")
    except InternalError as e:
        assert str(e) == "a bug"


@pytest.mark.parametrize("name", sorted(ALL_ERRORS))
def test_every_error_class_is_exported_from_chop(name):
    assert getattr(chop, name) is getattr(errors, name)
    assert name in chop.__all__


def test_errors_imports_nothing_from_chop():
    """Every layer may import chop.errors, so it must not import chop itself."""
    tree = ast.parse(Path(errors.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and not node.level]
    assert not [m for m in imported if m.split(".")[0] == "chop"]
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_did_you_mean_names_the_closest_choice():
    assert did_you_mean("snp", ["mask", "snip", "synflow"]) == " (did you mean 'snip'?)"
    assert did_you_mean("sparsty", iter(["scope", "sparsity"])) == " (did you mean 'sparsity'?)"


def test_did_you_mean_is_empty_without_a_close_match():
    assert did_you_mean("zzzz", ["mask", "snip"]) == ""
    assert did_you_mean("snip", []) == ""
