"""chop.cli.checkpoint: safe loading of every accepted format (nothing in an untrusted file runs),
and precise mismatch errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from chop.cli.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    plain_sympy,
    sha256,
    untrusted_pt2,
)

REAL_TORCH_LOAD = torch.load


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


def test_sparse_or_complex_tensors_are_named_not_an_internal_error(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].to_sparse()
    state["1.bias"] = state["1.bias"].to(torch.complex64)
    with pytest.raises(CheckpointError, match=r"2 tensors of another kind: 0\.weight is a "
                       r"torch\.sparse_coo tensor, 1\.bias is torch\.complex64\. Save dense "
                       r"tensors of the model's dtypes"):
        load_into(model, state, tmp_path / "m.pt")


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


# -- nothing in a file runs unless trusted --------------------------------------------------------


class Marker:
    """Unpickling this writes a marker file: the code execution a hostile file attempts."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def replace_entry(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    """A copy of the zip archive ``src`` whose entry ending in ``suffix`` holds ``data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            body = data if info.filename.endswith(suffix) else zin.read(info)
            zout.writestr(info.filename, body)
    return dst


def saved_program(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt2"
    program = torch.export.export(net(), (torch.randn(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_pt2_with_a_pickled_object_is_refused_and_runs_nothing(tmp_path: Path, protocol) -> None:
    """Hole 1: torch.export.load unpickled the sample inputs (weights_only=False fallback)."""
    marker = tmp_path / "PWNED"
    evil = replace_entry(saved_program(tmp_path), tmp_path / "evil.pt2", "sample_inputs/model.pt",
                         pickle.dumps(Marker(marker), protocol=protocol))
    with pytest.raises(CheckpointError, match=r"evil\.pt2: m/data/sample_inputs/model\.pt "
                                              r"holds a pickle.*loading it would run code from the "
                                              r"file, so chop refuses by default.*--trust-checkpoint "
                                              r"\(trust=True in Python\) only if you trust"):
        load_checkpoint(evil)
    assert not marker.exists()
    assert torch.load is REAL_TORCH_LOAD  # everything patched is restored, also on errors


def test_pt2_with_code_in_a_shape_expression_is_refused(tmp_path: Path) -> None:
    """Hole 1: torch.export.load evaluates shape expressions with sympy.sympify (Python eval)."""
    src = saved_program(tmp_path)
    marker = tmp_path / "PWNED"
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        text = archive.read(name).decode()
    found = re.search(r'"expr_str": "(Symbol\([^"]*\))"', text)
    assert found is not None  # the dynamic batch dimension
    code = f"__import__('os').system('touch {marker}')".replace("'", "\\u0027")
    evil = replace_entry(src, tmp_path / "evil.pt2", "models/model.json",
                         text.replace(found.group(1), code).encode())
    with pytest.raises(CheckpointError, match=r"holds a shape expression that is not plain "
                                              r"arithmetic \(\"__import__"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize(("node", "said"), [
    ({"target": "torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch",
      "inputs": [{"name": "function_cls_name", "arg": {"as_string": "this.s"}, "kind": 1}],
      "outputs": [{"as_none": True}], "metadata": {}},
     "a call of torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch"),
    ({"target": "torch.ops.higher_order.wrap_with_set_grad_enabled",
      "inputs": [{"name": "enable_grad", "arg": {"as_bool": True}, "kind": 1},
                 {"name": "fn", "arg": {"as_operator": "torch.builtins.exec"}, "kind": 1},
                 {"name": "code", "arg": {"as_string": "open('PWNED', 'w')"}, "kind": 1}],
      "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": False},
     "builtins.exec as an argument"),
])
def test_pt2_calling_anything_but_operators_is_refused(tmp_path: Path, node, said) -> None:
    """Hole: the deserialiser resolves any torch.* path a file names; a helper that imports a
    module the file names ("this" printed the Zen of Python when the program ran), or exec."""
    src = saved_program(tmp_path)
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        doc = json.loads(archive.read(name))
    doc["graph_module"]["graph"]["nodes"].insert(0, node)
    evil = replace_entry(src, tmp_path / "evil.pt2", "models/model.json", json.dumps(doc).encode())
    with pytest.raises(CheckpointError, match=rf"evil\.pt2: its program holds {re.escape(said)}"):
        load_checkpoint(evil)
    assert load_checkpoint(src).kind == "program"  # the untouched file loads


def test_pt2_with_a_compiled_library_is_refused(tmp_path: Path) -> None:
    src = saved_program(tmp_path)
    evil = tmp_path / "aoti.pt2"
    shutil.copy(src, evil)
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(CheckpointError, match=r"model/data/aotinductor/model/model\.so holds an "
                                              r"AOTInductor-compiled library \(native code\)"):
        load_checkpoint(evil)


def test_untrusted_pt2_refuses_every_unpickler_and_restores_them(tmp_path: Path) -> None:
    import sympy
    from torch.export.pt2_archive import _package

    path = saved_program(tmp_path)
    real = (torch.load, sympy.sympify, _package.pickle, torch._C._pickle_load_obj)
    with pytest.raises(RuntimeError, match="inside"), untrusted_pt2(path):
        for unpickle in (_package.pickle.loads, torch._C._pickle_load_obj):  # opaque, torchbind
            with pytest.raises(CheckpointError, match="holds a pickled Python object"):
                unpickle(pickle.dumps(Marker(tmp_path / "PWNED")))
        with pytest.raises(CheckpointError, match="refuses"):
            torch.load(io.BytesIO(pickle.dumps(Marker(tmp_path / "PWNED"), protocol=2)),
                       weights_only=False)
        assert torch.load(io.BytesIO(tensor_bytes()), weights_only=False).shape == (2,)
        raise RuntimeError("an error inside")
    assert (torch.load, sympy.sympify, _package.pickle, torch._C._pickle_load_obj) == real
    assert not (tmp_path / "PWNED").exists()


def tensor_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.zeros(2), buffer)
    return buffer.getvalue()


def test_trusted_pt2_and_chop_own_programs_load(tmp_path: Path) -> None:
    path = saved_program(tmp_path)
    for trust in (False, True):
        program = load_checkpoint(path, trust=trust).program
        assert program.module()(torch.randn(3, 4)).shape == (3, 3)


@pytest.mark.parametrize(("text", "plain"), [
    ("Symbol('s77', positive=True, integer=True)", True),
    ("Add(Mul(Integer(2), Symbol('s0', integer=True)), Integer(-1))", True),
    ("Max(Integer(2), FloorDiv(Symbol('s1'), Integer(4)))", True),
    ("Float('1.5', precision=53)", True),
    ("__import__('os').system('x')", False),
    ("Symbol('s0').__class__", False),
    ("Max('__import__(\"os\")', 1)", False),  # sympify would evaluate the string argument
    ("Symbol('x y; import os')", False),
    ("lambda: 0", False),
    ("eval('1')", False),
    ("Pow(Symbol('s0', integer=True), Integer(2))", True),
    ("Pow(Integer(9), Pow(Integer(9), Integer(9)))", False),  # sympy would compute it: no end
    ("Pow(Integer(9), Integer(387420489))", False),
    ("PowByNatural(Integer(9), PowByNatural(Integer(9), Integer(9)))", False),
    ("Mul(Integer(9 ** 9 ** 9), Integer(1))", False),  # Python's ** too
])
def test_plain_sympy(text: str, plain: bool) -> None:
    assert plain_sympy(text, {"FloorDiv"}) is plain


def test_random_bytes_never_get_the_weights_only_false_advice(tmp_path: Path) -> None:
    """Hole 6: random bytes named .pt got torch's advice to retry with weights_only=False."""
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 3)
    with pytest.raises(CheckpointError, match=r"random\.pt is corrupt or not a \.pt file") as info:
        load_checkpoint(tmp_path / "random.pt")
    assert "weights_only" not in str(info.value)
    assert info.value.__cause__ is not None


def test_a_program_entry_is_searched_in_chunks_not_inflated_whole(tmp_path):
    """A few kB of zip may inflate to gigabytes: the search for Hugging Face output types
    reads the program's JSON a chunk at a time (and finds text across two chunks)."""
    import tracemalloc

    from chop.cli.checkpoint import _holds

    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/models/model.json", b" " * (64 << 20) + b"needle")
    with zipfile.ZipFile(path) as archive:
        assert _holds(archive, "archive/models/model.json", b"needle", chunk=(1 << 20) + 3)
        tracemalloc.start()
        try:
            assert not _holds(archive, "archive/models/model.json", b"other")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 << 20, peak  # the entry is 64 MiB


def test_a_damaged_pt2_says_what_torch_found_wrong(tmp_path: Path) -> None:
    """torch.export.load logs the reason and raises "check the warnings above", which chop
    silences: the message had no reason."""
    src = saved_program(tmp_path)
    damaged = tmp_path / "damaged.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for info in zin.infolist():
            if "/data/weights/" not in info.filename or info.filename.endswith(".json"):
                zout.writestr(info.filename, zin.read(info))  # every weight's bytes left out
    with pytest.raises(CheckpointError, match=r"damaged\.pt2 is corrupt or not a \.pt2 file "
                                              r"\(RuntimeError: .*failed locating file"):
        load_checkpoint(damaged)
