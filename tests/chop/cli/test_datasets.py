"""chop.cli.datasets: every [data] source yields the configured (inputs, targets) batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chop.cli.config import ConfigError, DataSpec
from chop.cli.datasets import load_batches, load_split
from chop.errors import DataError


def spec(**kw) -> DataSpec:
    return DataSpec(**{"batch_size": 4, "batches": 2, **kw}, given=frozenset(kw))


def test_keys_that_do_nothing_for_the_source_are_warned_about(tmp_path: Path, caplog) -> None:
    """classes, label_field and max_length with the digits were accepted and did nothing."""
    torch.save({"inputs": torch.randn(20, 2), "targets": torch.arange(20)}, tmp_path / "d.pt")
    with caplog.at_level("WARNING", logger="chop"):
        load_batches(spec(source="d.pt", classes=5, label_field="y"), tmp_path)
        load_batches(spec(source="synthetic", shape=(3,), classes=3), tmp_path)
    assert caplog.messages == [
        "data.classes does nothing for data.source = 'd.pt' (classes is for the synthetic "
        "source); remove it from [data]",
        "data.label_field does nothing for data.source = 'd.pt' (text_field, label_field and "
        "max_length are for text files); remove it from [data]"]


def test_digits() -> None:
    pytest.importorskip("sklearn")
    batches = load_batches(spec(source="digits"), Path("."))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.int64


@pytest.mark.parametrize("shipped", [True, False])
def test_the_digits_are_scikit_learns_read_from_its_file_or_else_through_it(
        shipped: bool, tmp_path: Path, monkeypatch) -> None:
    from sklearn.datasets import load_digits

    import chop.cli.datasets as datasets

    if not shipped:  # scikit-learn without the CSV where it keeps it: load_digits
        monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: type(
            "Spec", (), {"submodule_search_locations": [str(tmp_path)]})())
    x, y = datasets.digits()
    expected = load_digits()
    assert torch.equal(x, torch.tensor(expected.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
                       / 16)
    assert torch.equal(y, torch.tensor(expected.target, dtype=torch.int64))


def test_the_digits_need_scikit_learn_installed(monkeypatch) -> None:
    import chop.cli.datasets as datasets

    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="needs scikit-learn: pip install scikit-learn"):
        datasets.digits()


def test_reading_the_digits_does_not_import_scikit_learn() -> None:
    """Importing scikit-learn took 3.4 s, most of the README's first example."""
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    code = ("import sys; from chop.cli.datasets import digits; x, y = digits(); "
            "assert x.shape == (1797, 1, 8, 8); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


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
    os.mkfifo(tmp_path / "fifo.pt")  # reading it would block: refused, not read
    with pytest.raises(DataError, match=r"fifo\.pt is not a regular file \(a folder, a FIFO"):
        load_batches(spec(source="fifo.pt"), tmp_path)
    from chop.cli.datasets import read_records

    with pytest.raises(DataError, match="is not a regular file"):
        read_records(tmp_path / "fifo.pt")
    torch.save({"inputs": torch.randn(20, 2)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match="no 'targets'"):
        load_batches(spec(source="d.pt"), tmp_path)
    torch.save({"inputs": torch.randn(5, 2), "targets": torch.arange(5)}, tmp_path / "s.pt")
    with pytest.raises(DataError, match="5 samples, fewer than 2 full batches of 4"):
        load_batches(spec(source="s.pt"), tmp_path)
    torch.save({"inputs": torch.randn(20, 2), "targets": torch.tensor(3)}, tmp_path / "0d.pt")
    with pytest.raises(DataError, match="one entry per sample .*a 0-d tensor"):  # was len()'s
        load_batches(spec(source="0d.pt"), tmp_path)
    with pytest.raises(ConfigError, match="does not fit"):
        load_batches(spec(source="s.pt", batches=1, shape=(3,)), tmp_path)
    with pytest.raises(ConfigError, match="not a data file"):
        load_batches(spec(source="data.xlsx"), tmp_path)
    with pytest.raises(ConfigError, match="is a text file, which needs a tokenizer"):
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


# -- text files and held-out batches ---------------------------------------------------------------

RECORDS = [{"text": "the cat sat", "label": 1}, {"text": "a dog, \"barked\"", "label": 0},
           {"text": "ünïcode ok", "label": 1}]


def write_text_file(path: Path, records: list[dict]) -> Path:
    import csv
    import json

    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)
    elif suffix == ".txt":
        path.write_text("\n\n".join(r["text"] for r in records) + "\n", encoding="utf-8")
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
def test_text_files_are_read_as_records(tmp_path: Path, suffix: str) -> None:
    from chop.cli.datasets import read_records

    path = write_text_file(tmp_path / f"d{suffix}", RECORDS)
    got = read_records(path, text_field="review")
    if suffix == ".txt":  # one record per non-empty line, under text_field
        assert got == [{"review": r["text"]} for r in RECORDS]
    elif suffix == ".csv":  # cells are strings: labels are read as such (chop.cli.hf maps them)
        assert got == [{"text": r["text"], "label": str(r["label"])} for r in RECORDS]
    else:
        assert got == RECORDS


def test_text_file_layouts_and_errors(tmp_path: Path) -> None:
    import json

    from chop.cli.datasets import read_records

    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"text": ["a", "b"], "label": [0, 1]}))
    assert read_records(columns) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    columns.write_text(json.dumps({"text": ["a", "b"], "label": [0]}))
    with pytest.raises(DataError, match=r"columns have different lengths \(\[1, 2\]\)"):
        read_records(columns)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3 is not valid JSON"):
        read_records(bad)
    bad.write_text('{"text": "a"}\n' + "[" * 100_000 + "\n")  # deeper than Python's stack
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON"):
        read_records(bad)
    bad.write_text('{"text": "a"}\n["not", "a", "record"]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not a record"):
        read_records(bad)
    (tmp_path / "n.json").write_text('"just a string"')
    with pytest.raises(DataError, match="holds a JSON str; it must hold a list of records"):
        read_records(tmp_path / "n.json")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read data file .* as UTF-8"):
        read_records(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "none.csv")


def test_text_is_encoded_by_the_model_folders_function(tmp_path: Path) -> None:
    write_text_file(tmp_path / "d.jsonl", RECORDS * 4)
    seen = []

    def encode(records, where):
        seen.append((len(records), where))
        ids = torch.arange(len(records)).unsqueeze(1).repeat(1, 3)
        return {"input_ids": ids}, torch.tensor([r["label"] for r in records])

    batches, held = load_split(spec(source="d.jsonl", batch_size=4, batches=1, eval_batches=4),
                               tmp_path, encode)
    assert seen == [(12, str(tmp_path / "d.jsonl"))]
    assert batches[0][0]["input_ids"][:, 0].tolist() == [0, 1, 2, 3]
    assert [b[0]["input_ids"][:, 0].tolist() for b in held] == [[4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize(("count", "sizes"), [(40, [4, 4, 4]), (18, [4, 4, 2]), (17, [4, 5]),
                                              (9, [])])
def test_held_out_batches_follow_the_scoring_ones(tmp_path: Path, count: int, sizes) -> None:
    """Up to eval_batches full batches after the scoring ones; a short last one is kept, a
    last one of 1 sample joins the one before (a traced batch size is dynamic from 2)."""
    torch.save({"inputs": torch.arange(count).float().unsqueeze(1), "targets": torch.arange(count)},
               tmp_path / "d.pt")
    batches, held = load_split(spec(source="d.pt", batches=2, eval_batches=3), tmp_path)
    assert [len(t) for _, t in held] == sizes
    used = torch.cat([t for _, t in batches + held]).tolist()
    assert used == list(range(8 + sum(sizes)))  # file order, no sample twice
    shuffled, held = load_split(spec(source="d.pt", batches=2, eval_batches=3, shuffle=True),
                                tmp_path)
    seen = torch.cat([t for _, t in shuffled + held]).tolist()
    assert len(set(seen)) == len(seen)


def test_synthetic_and_callable_sources_have_held_out_batches(tmp_path: Path) -> None:
    one, _ = load_split(spec(source="synthetic", shape=(3,), eval_batches=0), Path("."))
    first, held = load_split(spec(source="synthetic", shape=(3,), eval_batches=2), Path("."))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, first))  # held out: drawn apart
    assert len(held) == 2 and not any(torch.equal(h[0], f[0]) for h in held for f in first)
    (tmp_path / "few.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return [(torch.full((4, 2), float(i)), torch.zeros(4, dtype=torch.long))\n"
        "            for i in range(3)]\n")
    first, held = load_split(DataSpec(source="few:batches", batches=2, eval_batches=4), tmp_path)
    assert [float(x[0, 0]) for x, _ in first] == [0.0, 1.0]
    assert [float(x[0, 0]) for x, _ in held] == [2.0]  # what is left, no error
