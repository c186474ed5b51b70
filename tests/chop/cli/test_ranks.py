"""``torchrun --nproc-per-node 2 -m chop.cli transform``: real processes on gloo. The ranks
split the scoring batches and end with the masks of one process scoring them all; rank 0
alone writes OUTDIR and prints; an error on the ranks exits non-zero with one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from chop.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).parent / "torchrun"

CONFIG = """
[model]
source = "lenet-300-100"
kwargs = { in_features = 16, num_classes = 4 }

[data]
source = "synthetic"
shape = [16]
classes = 4
batch_size = 8
batches = 4

[pipeline]
passes = ["snip", "mask", "fold"]

[passes.snip]
batches = 4

[passes.mask]
sparsity = 0.9
"""


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    scratch = cwd.parent / f"{cwd.name}-tmp"  # torchrun's own temporary folders, not in /tmp
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(scratch)}
    env.pop("CHOP_TRACEBACK", None)
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m",
                           "chop.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def test_two_ranks_split_the_scoring_and_rank_0_writes(tmp_path: Path, capfd) -> None:
    from chop.cli.models import LeNet300100

    torch.manual_seed(0)
    torch.save(LeNet300100(in_features=16, num_classes=4).state_dict(), tmp_path / "m.pt")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    done = torchrun("transform", "--config", "c.toml", "m.pt", "-o", "ranks", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("per-layer sparsity") == 1 and done.stdout.count("wrote ranks") == 1
    assert "error" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.toml", "m.pt", "ranks"]  # one OUTDIR, no leftovers
    report = json.loads((tmp_path / "ranks" / "report.json").read_text())
    assert report["data"]["ranks"] == 2

    assert main(["transform", "--config", str(config), str(tmp_path / "m.pt"), "-o",
                 str(tmp_path / "one"), "--quiet"]) == 0  # one process scoring all 4 batches
    ranks, one = load_file(tmp_path / "ranks" / "masks.safetensors"), load_file(
        tmp_path / "one" / "masks.safetensors")
    assert ranks.keys() == one.keys() and all(torch.equal(ranks[k], one[k]) for k in one)
    saliency = [layer["saliency"] for layer in report["layers"]]
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    for a, b in zip(saliency, [layer["saliency"] for layer in single["layers"]], strict=True):
        assert a["max"] == b["max"] or abs(a["max"] - b["max"]) <= 1e-6 * abs(b["max"])


def test_an_error_on_the_ranks_is_one_line_each_and_a_failed_run(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(CONFIG.replace("sparsity = 0.9", "sparsity = 2.0"))
    done = torchrun("transform", "--config", "c.toml", "missing.pt", "-o", "out", cwd=tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: rank ")]
    assert sorted(line[:14] for line in errors) == ["error: rank 0:", "error: rank 1:"], done.stderr
    assert all("passes.mask.sparsity" in line for line in errors), done.stderr
    # torchrun prints its own traceback of the failed launch; none comes from chop
    assert not any("chop/" in line and 'File "' in line for line in done.stderr.splitlines())
    assert not (tmp_path / "out").exists()


def test_chop_train_refuses_torchrun(tmp_path: Path, capfd, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(["train", "--config", str(tmp_path / "c.toml"), str(tmp_path)]) == 2
    assert "rank 1: chop train runs in one process; run it without torchrun" in \
        " ".join(capfd.readouterr().err.split())
