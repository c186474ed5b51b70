"""chop.cli.checkpoint: safe loading of every accepted format, and precise mismatch errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from chop.cli.checkpoint import CheckpointError, load_checkpoint, load_into, sha256


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_state_dict(tmp_path: Path) -> None:
    model = net()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "state_dict" and same(ckpt.state_dict, model.state_dict())
    assert ckpt.sha256 == sha256(path) and len(ckpt.sha256) == 64


def test_lightning_checkpoint(tmp_path: Path) -> None:
    model = net()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3}, path)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    load_into(fresh, load_checkpoint(path).state_dict, path)
    assert same(fresh.state_dict(), model.state_dict())


def test_safetensors(tmp_path: Path) -> None:
    model = net()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), path)
    assert same(load_checkpoint(path).state_dict, model.state_dict())


def test_pt2(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net(), (torch.randn(2, 4),)), path)
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "program" and ckpt.program is not None


def test_pickled_module_is_refused_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(net(), path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as info:
        load_checkpoint(path)
    assert "torch.nn.modules.container.Sequential" in str(info.value)
    ckpt = load_checkpoint(path, trust=True)
    assert ckpt.kind == "module" and isinstance(ckpt.module, nn.Sequential)


@pytest.mark.parametrize("name", ["x.pt", "x.ckpt", "x.safetensors", "x.pt2"])
def test_corrupt(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / name)


def test_missing_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown file type '.h5'"):
        load_checkpoint(tmp_path / "m.h5")


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "note": "hello"}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="note are not tensors"):
        load_checkpoint(tmp_path / "m.pt")
    torch.save([torch.zeros(2)], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(tmp_path / "l.pt")


def test_mismatch_lists_first_few_then_count(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    state = {f"other.{i}": torch.zeros(1) for i in range(7)}
    state["0.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as info:
        load_into(model, state, tmp_path / "m.pt")
    message = str(info.value)
    assert "15 missing keys: 0.bias, 1.weight, 1.bias, 2.weight, 2.bias and 10 more" in message
    assert "7 unexpected keys: other.0" in message and "and 2 more" in message
    assert "0.weight (3, 2) in the checkpoint vs (2, 2) in the model" in message
    assert "[model] source and kwargs" in message
