"""The README's commands run as written: its Python example is examples/quickstart.py verbatim,
and that example runs."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_is_the_quickstart_and_runs(capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    quickstart = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    assert block.strip() in quickstart
    assert len(block.strip().splitlines()) <= 16
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"0\.weight +kept +\d+ of 72", out)
    assert "torch.Size([64, 10])" in out


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = 'pip install torch==2.13.0 -e ".[test]"'
    assert install in readme and install.replace("pip install", "pip install --quiet") in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(text: str) -> list[str]:
    return re.findall(r"```\w*\n(.*?)```", text, re.DOTALL)


def without_seconds(line: str) -> str:
    return re.sub(r" \(\d+\.\d+s\)$", "", line.rstrip())


def test_readme_hugging_face_example_prints_what_it_shows(tmp_path, capfd, monkeypatch):
    """The README's model-folder run, as written (in a copy of examples/): its metric line, its
    table rows and its training epochs are what the commands print."""
    import shutil
    import subprocess
    import sys

    import pytest

    pytest.importorskip("transformers")
    from chop.cli.main import main

    monkeypatch.setenv("COLUMNS", "120")  # the README's table is 118 characters wide
    text = readme()
    section = text[text.index("## Hugging Face models"):text.index("## Python")]
    commands = [line for b in blocks(section) for line in b.splitlines()
                if line.startswith(("python examples/", "chop "))]
    assert commands == ["python examples/make_tiny_bert.py",
                        "chop transform --config examples/tiny_bert.toml examples/tiny-bert",
                        "chop train --config examples/tiny_bert.toml examples/tiny_bert-out"]
    (tmp_path / "examples").mkdir()
    for name in ("make_tiny_bert.py", "tiny_bert.toml"):
        shutil.copy(ROOT / "examples" / name, tmp_path / "examples" / name)
    done = subprocess.run([sys.executable, *commands[0].split()[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    capfd.readouterr()
    printed = []
    for command in commands[1:]:
        args = command.split()[1:]
        assert main([*(a if not a.startswith("examples/") else str(tmp_path / a) for a in args)
                     ]) == 0
        printed += [without_seconds(line) for line in capfd.readouterr().out.splitlines()]
    shown = [without_seconds(line) for b in blocks(section) for line in b.splitlines()]
    for line in shown:
        if line.startswith(("accuracy on", "epoch ", "model:", "│ bert.", "│ classifier",
                            "│ total")):
            assert " ".join(line.split()) in {" ".join(p.split()) for p in printed}, line


def test_readme_many_gpus_commands_run_as_written(tmp_path):
    """Both torchrun commands of "Many GPUs", with 2 gloo processes on CPU; the FSDP2 example
    in the README is examples/fsdp_snip.py verbatim and prints what the README says."""
    import os
    import shutil
    import subprocess
    import sys

    text = readme()
    section = text[text.index("## Many GPUs"):text.index("## Benchmarks")]
    commands = [line for b in blocks(section) for line in b.splitlines()
                if line.startswith("torchrun ")]
    assert len(commands) == 2
    code = next(b for b in blocks(section) if "fully_shard" in b)
    assert code.strip() in (ROOT / "examples" / "fsdp_snip.py").read_text(encoding="utf-8")
    (tmp_path / "examples").mkdir()  # the CLI command writes into examples/: a copy of them
    for name in ("lenet5_snip.toml", "lenet5.ckpt", "models.py", "fsdp_snip.py"):
        shutil.copy(ROOT / "examples" / name, tmp_path / "examples" / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}  # torchrun's own temporary folders go there too
    env.pop("CHOP_TRACEBACK", None)
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    assert outputs[0].count("per-layer sparsity") == 1
    assert (tmp_path / "examples" / "lenet5_ranks-out" / "masks.safetensors").is_file()
    printed = re.search(r"prints `(.*?)`", section).group(1)
    assert printed in outputs[1]


def test_readme_pass_table_lists_every_registered_pass():
    from chop.pipeline.registry import all_passes

    text = (ROOT / "README.md").read_text()
    table = text.split("## Passes", 1)[1].split("###", 1)[0]
    listed = {name for row in table.splitlines() if row.startswith("| `")
              for name in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    assert listed == set(all_passes())
