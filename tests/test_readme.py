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
