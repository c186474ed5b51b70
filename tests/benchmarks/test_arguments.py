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
    p.add_argument("--sample-ms", type=arguments.number_at_least(0), default=0.0)
    p.add_argument("--timeout", type=arguments.number_at_least(0, inclusive=False), default=1.0)
    return p


def test_values_in_range_are_parsed() -> None:
    args = parser().parse_args(["--repeats", "1", "--warmup", "0", "--sparsity", "0"])
    assert (args.repeats, args.warmup, args.sparsity) == (1, 0, 0.0)
    assert parser().parse_args(["--sparsity", "0.999"]).sparsity == 0.999
    args = parser().parse_args(["--sample-ms", "0", "--timeout", "0.5"])
    assert (args.sample_ms, args.timeout) == (0.0, 0.5)


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--repeats", "2.5"], "argument --repeats: '2.5' is not a whole number"),
    (["--sparsity", "1"], "argument --sparsity: must be in [0, 1) (0.9 prunes 90%), got 1.0"),
    (["--sparsity", "-0.1"], "must be in [0, 1)"),
    (["--sparsity", "half"], "argument --sparsity: 'half' is not a number"),
    (["--sample-ms", "-5"], "argument --sample-ms: must be at least 0 (a finite number), got -5"),
    (["--sample-ms", "inf"], "argument --sample-ms: must be at least 0 (a finite number), got inf"),
    (["--timeout", "0"], "argument --timeout: must be more than 0 (a finite number), got 0"),
    (["--timeout", "nan"], "argument --timeout: must be more than 0 (a finite number), got nan"),
    (["--timeout", "soon"], "argument --timeout: 'soon' is not a number"),
])
def test_values_out_of_range_are_parser_errors(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError) as caught:
        parser().parse_args(argv)
    assert message in str(caught.value)


def test_labels_keep_the_digits_a_sparsity_needs() -> None:
    # before: 0.999 printed as "1.00" in bench_sparse's table and "100%" in the other headers
    assert [arguments.share(v) for v in (0.0, 0.9, 0.95, 0.999)] == ["0.00", "0.90", "0.95",
                                                                      "0.999"]
    assert [arguments.percent(v) for v in (0.0, 0.5, 0.9, 0.99, 0.995, 0.999)] == [
        "0%", "50%", "90%", "99%", "99.5%", "99.9%"]


def test_unique_keeps_the_first_order() -> None:
    assert arguments.unique([32, 1, 32, 1, 7]) == [32, 1, 7]


def run_script(name: str, *argv: str, cwd: Path, timeout: float = 120
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *argv],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize(("script", "argv", "message"), [
    # before: a ZeroDivisionError/TraceError/hang after the model was built and run
    ("bench_pruner.py", ["--models", "lenet5", "--criteria", "mask"],
     "error: --criteria 'mask': criterion mask is not one criterion pass"),
    ("bench_distributed.py", ["--batches", "3"], "error: --batches 3: an even number"),
    ("bench_distributed.py", ["--batch", "0"], "error: argument --batch: must be at least 1"),
    ("bench_structured.py", ["--models", "bert", "--seq", "600"],
     "error: --seq 600: BERT-base takes at most 512 tokens"),
    ("bench_snip.py", ["--models", "bert", "--seq", "513"],
     "error: --seq 513: BERT-base takes at most 512 tokens"),
    ("bench_shrink.py", ["--widths", *["8"] * 12], "error: --widths: at most 11 layers, got 12"),
    ("coverage.py", ["--tp-timeout", "0"], "error: argument --tp-timeout: must be more than 0"),
    ("bench_sparse.py", ["--threads", "0"], "error: argument --threads: must be at least 1"),
    ("bench_allocator.py", ["--worker", "reuse", "nope"], "error: --worker reuse nope:"),
    # before: an OptionError after loading the data; an empty report over results.json
    ("reproduce_snip.py", ["--sparsities", "0.9,1"], "error: argument --sparsities: must be in"),
    ("reproduce_snip.py", ["--seeds", "0"], "error: argument --seeds: must be at least 1"),
    ("reproduce_snip.py", ["--threads", "0"], "error: argument --threads: must be at least 1"),
    # before: exit 1 without usage; a traceback and an empty folder; a run with no criterion
    ("bench_structured.py", ["--models", "resnet50", "bogus"], "error: unknown model 'bogus'"),
    ("reproduce_snip.py", ["--from-json", "missing.json", "--out", "out"],
     "error: --from-json missing.json: no such file"),
    ("bench_pruner.py", ["--criteria", ";"], "error: --criteria ';': no criterion given"),
])
def test_scripts_refuse_values_they_cannot_run(script: str, argv: list[str], message: str,
                                              tmp_path: Path) -> None:
    done = run_script(script, *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["bench_shrink.py", "bench_train_step.py"])
def test_reusing_freed_memory_where_the_process_chose_its_allocator_is_a_parser_error(
        script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bench_shrink.py exited 1 without its usage; bench_train_step.py had no such option
    monkeypatch.setenv("CHOP_MALLOC", "system")  # what reuse_freed_memory() leaves alone
    done = run_script(script, "--reuse-freed-memory", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("error: --reuse-freed-memory: reuse_freed_memory() did nothing here (not glibc, "
            "or the environment chose the allocator)") in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_reproduction_refuses_an_output_folder_it_cannot_write_before_training(
        tmp_path: Path) -> None:
    # before: hours of training, then a traceback when writing the results
    (tmp_path / "taken").write_text("a file, where --out needs a folder")
    done = run_script("reproduce_snip.py", "--out", "taken/sub", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: --out taken/sub: taken is not a folder" in done.stderr
    assert done.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_pruner_benchmark_runs_at_sparsity_zero_and_repeated_criteria(tmp_path: Path) -> None:
    # before: ZeroDivisionError at sparsity 0 (no masks), StopIteration for a repeated criterion
    done = run_script("bench_pruner.py", "--models", "lenet5", "--steps", "2", "--rounds", "1",
                      "--warmup", "0", "--sparsity", "0", "--criteria", "magnitude;magnitude",
                      cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ")[1] for line in done.stdout.splitlines()
            if line.startswith("| LeNet-5")]
    assert rows == ["no Pruner", "hand-written magnitude (floor)", "magnitude"]
    assert "pruning every step to 0%" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # as many cells as header columns
    floor = next(line for line in table if "(floor)" in line).split(" | ")
    assert floor[4] == "1.00"  # the × floor column: the floor against itself


def test_shrink_benchmark_prints_one_column_per_batch(tmp_path: Path) -> None:
    # before: --batches 1 1 printed two header columns over one column of cells
    done = run_script("bench_shrink.py", "--models", "vgg", "--widths", "4", "4", "--batches",
                      "1", "1", "--repeats", "1", "--sparsity", "0.999", cwd=tmp_path,
                      timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "99.9% of each channel group removed" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| variant | batch 1: ms | speedup | ÷ FLOPs |"
    assert {line.count("|") for line in table} == {5}


def test_a_script_refuses_a_bad_value_before_measuring(tmp_path: Path) -> None:
    # before this check, --repeats 0 ran the whole benchmark and failed in statistics.median
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sparse.py"), "--repeats", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "bench_sparse.py: error: argument --repeats: must be at least 1, got 0" in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []
