"""The ``chop`` facade: importing it (or the CLI entry point) does not import torch; its lazy
names resolve on first use and register chop's custom op; unknown names raise AttributeError."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_python(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_import_chop_does_not_import_torch():
    out = run_python("import sys, chop\n"
                     "print('torch' in sys.modules, chop.ChopError.__name__, chop.__version__)")
    assert out[:2] == ["False", "ChopError"]
    assert out[2] and out[2][0].isdigit()


def test_the_cli_entry_point_and_version_do_not_import_torch():
    code = ("import contextlib, io, sys\n"
            "import chop.cli.main as m\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n"
            "        m.main(['--version'])\n"
            "    except SystemExit as e:\n"
            "        code = e.code\n"
            "print('torch' in sys.modules, code, buf.getvalue().strip().replace(' ', '_'))")
    out = run_python(code)
    assert out[0] == "False"
    assert out[1] == "0"
    assert out[2].startswith("chop_")


def test_a_torch_backed_name_registers_the_custom_op():
    code = ("import sys, chop\n"
            "before = 'chop.kernels.csr' in sys.modules\n"
            "trace = chop.trace\n"
            "import torch\n"
            "print(before, 'torch' in sys.modules, hasattr(torch.ops.chop, 'csr_linear'))")
    assert run_python(code) == ["False", "True", "True"]


def test_importing_chop_after_torch_registers_the_custom_op():
    code = ("import torch, chop\n"
            "print(hasattr(torch.ops.chop, 'csr_linear'))")
    assert run_python(code) == ["True"]


def test_lazy_names_resolve_to_their_definitions():
    import chop
    from chop.cli.api import save, summary
    from chop.ir.graph import Graph, trace
    from chop.pipeline.manager import run
    from chop.training.pruner import Pruner

    assert chop.save is save and chop.summary is summary
    assert chop.trace is trace
    assert chop.Graph is Graph
    assert chop.run is run
    assert chop.Pruner is Pruner
    assert {"trace", "Graph", "run", "Pruner", "ChopError", "save", "summary"} <= set(dir(chop))
    assert {"save", "summary"} <= set(chop.__all__)


def test_every_name_in_all_resolves():
    import chop

    for name in chop.__all__:
        assert getattr(chop, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    import chop

    with pytest.raises(AttributeError, match="no attribute 'tracee'"):
        chop.tracee  # noqa: B018
    assert not hasattr(chop, "not_a_name")
