"""The argument types of the benchmark scripts: numbers out of range are parser errors that name
the option and the range, before anything is measured."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("arguments", ROOT / "benchmarks" / "arguments.py")
arguments = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arguments)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", exit_on_error=False)
    p.add_argument("--repeats", type=arguments.at_least(1), default=3)
    p.add_argument("--warmup", type=arguments.at_least(0), default=0)
    p.add_argument("--sparsity", type=arguments.sparsity_arg, default=0.5)
    return p


def test_values_in_range_are_parsed() -> None:
    args = parser().parse_args(["--repeats", "1", "--warmup", "0", "--sparsity", "0"])
    assert (args.repeats, args.warmup, args.sparsity) == (1, 0, 0.0)
    assert parser().parse_args(["--sparsity", "0.999"]).sparsity == 0.999


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--repeats", "2.5"], "argument --repeats: '2.5' is not a whole number"),
    (["--sparsity", "1"], "argument --sparsity: must be in [0, 1) (0.9 prunes 90%), got 1.0"),
    (["--sparsity", "-0.1"], "must be in [0, 1)"),
    (["--sparsity", "half"], "argument --sparsity: 'half' is not a number"),
])
def test_values_out_of_range_are_parser_errors(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError) as caught:
        parser().parse_args(argv)
    assert message in str(caught.value)


def test_a_script_refuses_a_bad_value_before_measuring(tmp_path: Path) -> None:
    # before this check, --repeats 0 ran the whole benchmark and failed in statistics.median
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sparse.py"), "--repeats", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "bench_sparse.py: error: argument --repeats: must be at least 1, got 0" in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []
