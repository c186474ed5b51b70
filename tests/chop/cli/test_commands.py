"""``chop train`` end to end on the LeNet-5 digits example: from a checkpoint (pipeline first) and
from a ``chop transform`` OUTDIR; masks stay exact; bad inputs fail with a short message."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chop.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"

PRUNE = """
[model]
source = "models:LeNet5"
kwargs = { num_classes = 10 }

[data]
source = "digits"
batch_size = 128
batches = 1
shuffle = true

[pipeline]
passes = ["snip", "mask", "fold"]

[passes.mask]
sparsity = 0.9
"""
TRAIN = """
[train]
optimizer = "adam"
lr = 0.01
epochs = 1
batch_size = 128
eval_fraction = 0.25
seed = 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLES / "models.py", tmp_path / "models.py")
    shutil.copy(EXAMPLES / "lenet5.ckpt", tmp_path / "lenet5.ckpt")
    (tmp_path / "prune.toml").write_text(PRUNE)
    (tmp_path / "train.toml").write_text(PRUNE + TRAIN)
    return tmp_path


def check_outputs(out: Path, sparsity: float = 0.9) -> dict[str, torch.Tensor]:
    """Masks keep exactly round((1 - s)·N) weights and every pruned weight is zero."""
    masks = load_file(out / "masks.safetensors")
    weights = load_file(out / "weights.safetensors")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.floor((1 - sparsity) * total + 0.5)
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, name
    return masks


def test_train_from_a_checkpoint_end_to_end(project: Path) -> None:
    out = project / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    env.pop("CHOP_TRACEBACK", None)
    done = subprocess.run(
        [sys.executable, "-m", "chop.cli", "train", "--config", str(project / "train.toml"),
         str(project / "lenet5.ckpt"), "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "epoch 1: loss" in done.stdout and "eval accuracy" in done.stdout
    assert "per-layer sparsity" in done.stdout and "Traceback" not in done.stderr
    check_outputs(out)
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["pipeline"]] == ["snip", "mask", "fold"]
    (record,) = report["train"]["history"]
    assert report["data"]["train_samples"] + report["data"]["eval_samples"] == 1797
    program = torch.export.load(out / "model.pt2").module()
    assert program(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    # the reported eval accuracy is the saved model's accuracy on the held-out quarter of the
    # digits (the seeded split recomputed here); training beat chance
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).div(16).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    held = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:449]
    with torch.no_grad():
        correct = int((program(x[held]).argmax(1) == y[held]).sum())
    assert record["epoch"] == 1 and report["data"]["eval_samples"] == 449
    assert record["eval"]["accuracy"] == pytest.approx(correct / 449, abs=1e-9)
    assert record["eval"]["accuracy"] > 0.3


def test_train_from_a_transform_outdir_keeps_its_masks(project: Path, capfd) -> None:
    pruned = project / "pruned"
    assert main(["transform", "--config", str(project / "prune.toml"),
                 str(project / "lenet5.ckpt"), "-o", str(pruned), "--quiet"]) == 0
    before = load_file(pruned / "weights.safetensors")
    out = project / "trained"
    assert main(["train", "--config", str(project / "train.toml"), str(pruned), "-o", str(out),
                 "--json", "--set", "train.optimizer=sgd", "--set", "train.momentum=0.9"]) == 0
    stdout, stderr = capfd.readouterr()
    report = json.loads(stdout)  # --json: stdout is the report only; epochs go to stderr
    assert "epoch 1" in stderr
    assert report["train"]["optimizer"] == "sgd" and report["checkpoint"]["kind"] == "outdir"
    masks = check_outputs(out)
    original = load_file(pruned / "masks.safetensors")
    assert masks.keys() == original.keys()
    assert all(torch.equal(masks[k], original[k]) for k in masks)
    after = load_file(out / "weights.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in masks)  # it trained


def test_train_refuses_an_outdir_with_damaged_masks(project: Path, capfd) -> None:
    from safetensors.torch import save_file

    pruned = project / "pruned"
    assert main(["transform", "--config", str(project / "prune.toml"),
                 str(project / "lenet5.ckpt"), "-o", str(pruned), "--quiet"]) == 0
    masks_file = pruned / "masks.safetensors"
    masks = {k: v.clone() for k, v in load_file(masks_file).items()}  # not over the file
    for damage, expected in [
        (lambda: masks_file.write_bytes(masks_file.read_bytes()[:100]),
         "masks.safetensors (Error while deserializing header"),
        (lambda: save_file({**masks, "conv1.weight": torch.ones(3, 3, dtype=torch.bool)},
                           masks_file), "the mask of 'conv1.weight' is torch.bool[3, 3], not a "
         "0/1 mask of the weight's shape [6, 1, 3, 3]"),
        (lambda: save_file({**masks, "conv1.weight": torch.full((6, 1, 3, 3), 0.3)}, masks_file),
         "the mask of 'conv1.weight' is torch.float32[6, 1, 3, 3], not a 0/1 mask"),
    ]:
        damage()
        shown = run_error(["train", "--config", str(project / "train.toml"), str(pruned), "-o",
                           str(project / "trained")], capfd)
        assert expected in shown and "rerun chop transform" in shown
        assert not (project / "trained").exists()


def run_error(args: list[str], capfd) -> str:
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize(("extra", "expected"), [
    ("epoch = 2\n", "unknown key 'epoch' in [train] (did you mean 'epochs'?)"),
    ("lr = -1\n", "train.lr: expected a positive (finite) number"),
    ("optimizer = \"adamw\"\n", "train.optimizer: expected \"adam\" or \"sgd\""),
    ("momentum = 0.9\n", "momentum is an option of optimizer = \"sgd\""),
    ("eval_fraction = 1.5\n", "train.eval_fraction: expected a number in [0, 1)"),
    ("prune_end = 10\n", "pruning during training needs train.prune_sparsity"),
    ("prune_sparsity = 0.95\nprune_schedule = \"steep\"\n",
     "train.prune_schedule: expected \"exp\", \"cos\", \"cube\" or \"linear\""),
    ("prune_sparsity = 0.95\nprune_start = 5\nprune_end = 2\n",
     "train.prune_end: expected an integer of at least prune_start"),
])
def test_bad_train_section(project: Path, capfd, extra: str, expected: str) -> None:
    config = project / "bad.toml"
    config.write_text(PRUNE + "\n[train]\n" + extra)
    out = project / "out"
    err = run_error(["train", "--config", str(config), str(project / "lenet5.ckpt"), "-o",
                     str(out)], capfd)
    assert expected in err and "bad.toml" in err
    assert not out.exists()


def test_train_prunes_along_a_schedule_from_the_masks_it_starts_with(project: Path, capfd) -> None:
    config = project / "gradual.toml"
    config.write_text(PRUNE + TRAIN.replace("epochs = 1", "epochs = 2") + (
        "prune_sparsity = 0.97\nprune_criterion = \"snip\"\nprune_schedule = \"linear\"\n"
        "prune_start = 0\nprune_end = 8\nprune_frequency = 2\n"))
    out = project / "out"
    assert main(["train", "--config", str(config), str(project / "lenet5.ckpt"), "-o", str(out),
                 "--json"]) == 0
    report = json.loads(capfd.readouterr().out)
    history = report["train"]["history"]
    assert history[-1]["sparsity"] == pytest.approx(0.97, abs=1e-4)
    masks = check_outputs(out, sparsity=0.97)  # exact kept counts at the target
    assert masks


def test_bad_sources(project: Path, capfd) -> None:
    config = str(project / "train.toml")
    err = run_error(["train", "--config", config, str(project / "missing.ckpt")], capfd)
    assert "missing.ckpt does not exist" in err
    (project / "folder").mkdir()
    err = run_error(["train", "--config", config, str(project / "folder"), "-o",
                     str(project / "out")], capfd)
    assert "not a chop transform OUTDIR" in err
    err = run_error(["train", "--config", config, str(project / "lenet5.ckpt"), "-o",
                     str(project), "--force"], capfd)
    assert "holds the input" in err
    err = run_error(["train", "--config", config, str(project / "lenet5.ckpt"), "--set",
                     "train.epochs=0", "-o", str(project / "out")], capfd)
    assert "train.epochs (set by --set train.epochs=0)" in err
