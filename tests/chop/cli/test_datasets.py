"""chop.cli.datasets: every [data] source yields the configured (inputs, targets) batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chop.cli.config import ConfigError, DataSpec
from chop.cli.datasets import load_batches
from chop.errors import DataError


def spec(**kw) -> DataSpec:
    return DataSpec(**{"batch_size": 4, "batches": 2, **kw}, given=frozenset(kw))


def test_digits() -> None:
    pytest.importorskip("sklearn")
    batches = load_batches(spec(source="digits"), Path("."))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.int64


def test_synthetic_and_shape() -> None:
    batches = load_batches(spec(source="synthetic", shape=(3, 5), classes=4), Path("."))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 5), (4, 3, 5)]
    assert all(int(y.max()) < 4 for _, y in batches)
    with pytest.raises(ConfigError, match="needs the shape"):
        load_batches(spec(source="synthetic"), Path("."))


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_files(tmp_path: Path, suffix: str) -> None:
    inputs = np.arange(10 * 6, dtype=np.float64).reshape(10, 6)
    targets = np.arange(10, dtype=np.int32)
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, inputs=inputs, targets=targets)
    elif suffix == ".pt":
        torch.save({"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}, path)
    else:
        save_file({"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}, path)
    batches = load_batches(spec(source=path.name, shape=(2, 3)), tmp_path)
    x, y = batches[1]
    assert x.shape == (4, 2, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [4, 5, 6, 7]  # file order


def test_shuffle_is_seeded(tmp_path: Path) -> None:
    torch.save({"inputs": torch.randn(20, 2), "targets": torch.arange(20)}, tmp_path / "d.pt")
    a = load_batches(spec(source="d.pt", shuffle=True, seed=1), tmp_path)
    b = load_batches(spec(source="d.pt", shuffle=True, seed=1), tmp_path)
    assert torch.equal(a[0][1], b[0][1]) and not torch.equal(a[0][1], torch.arange(4))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_batches(spec(source="none.pt"), tmp_path)
    torch.save({"inputs": torch.randn(20, 2)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match="no 'targets'"):
        load_batches(spec(source="d.pt"), tmp_path)
    torch.save({"inputs": torch.randn(5, 2), "targets": torch.arange(5)}, tmp_path / "s.pt")
    with pytest.raises(DataError, match="5 samples, fewer than 2 full batches of 4"):
        load_batches(spec(source="s.pt"), tmp_path)
    with pytest.raises(ConfigError, match="does not fit"):
        load_batches(spec(source="s.pt", batches=1, shape=(3,)), tmp_path)
    with pytest.raises(ConfigError, match="not a data file"):
        load_batches(spec(source="data.csv"), tmp_path)


def test_callable(tmp_path: Path) -> None:
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def batches(batch_size):\n"
        "    return [(torch.ones(batch_size, 2), torch.zeros(batch_size, dtype=torch.long))] * 5\n"
        "def plain():\n"
        "    return iter([(torch.ones(1), torch.zeros(1))])\n"
    )
    got = load_batches(spec(source="mydata:batches"), tmp_path)
    assert len(got) == 2 and got[0][0].shape == (4, 2)
    with pytest.raises(ConfigError, match="does not take shuffle"):
        load_batches(spec(source="mydata:batches", shuffle=True), tmp_path)
    with pytest.raises(DataError, match="asked for 2 batches but data gave 1"):
        load_batches(DataSpec(source="mydata:plain", batches=2), tmp_path)
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_batches(DataSpec(source="mydata:nope"), tmp_path)


class Marker:
    """Unpickling this writes a marker file: the code a hostile data file would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_data_files_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    torch.save({"inputs": torch.randn(8, 2), "targets": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"evil\.pt: it holds pickled Python objects \(posix\.system"
                                        r"\), which chop never unpickles from a data file; it must "
                                        r"be a dict of tensors") as info:
        load_batches(spec(source="evil.pt"), tmp_path)
    assert info.value.__cause__ is not None
    np.savez(tmp_path / "evil.npz", inputs=np.zeros((8, 2)),
             targets=np.array([Marker(marker)] * 8, dtype=object))
    with pytest.raises(DataError, match=r"evil\.npz: it holds pickled Python objects \(a pickled "
                                        r"object array\)"):
        load_batches(spec(source="evil.npz"), tmp_path)
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 2)
    with pytest.raises(DataError, match=r"random\.pt: not a torch\.save file") as info:
        load_batches(spec(source="random.pt"), tmp_path)
    assert "weights_only" not in str(info.value)
    assert not marker.exists()
