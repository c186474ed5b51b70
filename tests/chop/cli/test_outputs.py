"""chop.cli.outputs: choosing and checking OUTDIR, writing it atomically and only over chop's own
outputs (manifest, lock, leftovers of killed runs), the masks file, the re-exported program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chop
from chop.cli import outputs
from chop.cli.outputs import (
    MANIFEST,
    Output,
    check_outdir,
    default_outdir,
    foreign_files,
    masks_of,
    write_manifest,
)
from chop.cli.report import build_report
from chop.errors import InternalError, OutputError


def test_default_outdir_numbers_taken_folders(tmp_path):
    config = tmp_path / "snip.toml"
    assert default_outdir(config) == tmp_path / "snip-out"
    assert default_outdir(config, "-trained-out") == tmp_path / "snip-trained-out"
    (tmp_path / "snip-out").mkdir()
    assert default_outdir(config) == tmp_path / "snip-out"  # an empty folder is reused
    (tmp_path / "snip-out" / "report.json").write_text("{}")
    assert default_outdir(config) == tmp_path / "snip-out-2"
    (tmp_path / "snip-out-2").write_text("a file")  # a file is taken too
    assert default_outdir(config) == tmp_path / "snip-out-3"


def chop_folder(path: Path, **files: str) -> Path:
    """A folder as chop writes it: files and their manifest."""
    path.mkdir(parents=True)
    for name, text in (files or {"report.json": "{}"}).items():
        (path / name).write_text(text)
    write_manifest(path)
    return path


def test_check_outdir_accepts_new_and_empty_folders(tmp_path, monkeypatch):
    assert check_outdir(tmp_path / "new", []) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_outdir(tmp_path / "empty", [tmp_path / "model.pt"]) == (tmp_path / "empty").resolve()
    monkeypatch.chdir(tmp_path)
    relative = check_outdir(Path("sub"), [], force=True)
    assert relative == tmp_path.resolve() / "sub"


def test_check_outdir_refusals(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"output path .*file is a file; pass a folder with -o"):
        check_outdir(tmp_path / "file", [])
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("x")
    with pytest.raises(OutputError, match=r"already exists and is not empty; .*--force"):
        check_outdir(full, [])
    model = full / "sub" / "model.pt"
    for out in (full, full / "sub"):  # holds the input: even with force
        with pytest.raises(OutputError,
                           match=r"folder .* holds the input .*model\.pt.*Choose another"):
            check_outdir(out, [model], force=True)
    with pytest.raises(OutputError, match=r"output path .*model\.pt is the input .*model\.pt; "):
        check_outdir(model, [model], force=True)  # is the input (a file, not a folder)
    assert check_outdir(full / "sub2", [model], force=True) == (full / "sub2").resolve()
    monkeypatch.chdir(full / "sub2" if (full / "sub2").is_dir() else full)
    with pytest.raises(OutputError, match=r"output path \. is the current folder"):
        check_outdir(Path("."), [], force=True)
    with pytest.raises(OutputError, match=r"holds the current folder"):  # a folder above it
        check_outdir(tmp_path, [], force=True)


def test_force_replaces_only_chop_outputs(tmp_path):
    """Hole 2: --force deleted folders chop did not write. Now it needs a manifest that lists
    every file, unchanged."""
    ours = chop_folder(tmp_path / "ours", **{"report.json": "{}", "model.pt2": "x"})
    assert foreign_files(ours) == []
    assert check_outdir(ours, [], force=True) == ours.resolve()

    project = tmp_path / "project"  # a user's folder: no manifest
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    (project / "data").mkdir()
    with pytest.raises(OutputError, match=r"holds files chop did not write: data/, train\.py\. "
                                          r"--force only replaces a folder of chop's own outputs"):
        check_outdir(project, [], force=True)

    (ours / "report.json").write_text('{"edited": true}')  # changed since chop wrote it
    (ours / "notes.txt").write_text("mine")  # added
    os.symlink(project / "train.py", ours / "link.py")
    assert foreign_files(ours) == ["link.py", "notes.txt", "report.json"]
    (ours / MANIFEST).write_text("not json")
    assert MANIFEST in foreign_files(ours)  # a broken manifest proves nothing
    listing = tmp_path / "listing.json"  # a manifest elsewhere, linked in: chop writes no links
    (ours / "notes.txt").unlink()
    (ours / "link.py").unlink()
    (ours / MANIFEST).rename(listing)
    write_manifest(ours)
    (ours / MANIFEST).rename(listing)
    (ours / MANIFEST).symlink_to(listing)
    assert foreign_files(ours) == [MANIFEST, "model.pt2", "report.json"]


def mounted_tmpfs(path: Path) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_mount_point_is_refused_before_any_work(tmp_path):
    """Hole 4: an empty mount point failed with EBUSY at the end and left a .NAME.old-* folder."""
    mount = tmp_path / "mnt"
    if not mounted_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OutputError, match=r"is a mount point; .*-o .*mnt/run1"):
            check_outdir(mount, [])
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_output_replaces_a_chop_folder_on_success(tmp_path):
    out = chop_folder(tmp_path / "out", **{"old.txt": "old"})
    with Output(out, force=True) as target:
        assert target.tmp.parent == tmp_path and target.tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert leftovers(tmp_path) == [".out.lock", target.tmp.name]
        (target.tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing changes until the end
        target.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_output_creates_missing_parents_and_removes_them_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), Output(out) as target:
        assert (tmp_path / "a" / "b").is_dir()
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
    with Output(out) as target:
        (target.tmp / "x").write_text("x")
        target.commit()
    assert (out / "x").read_text() == "x" and leftovers(out.parent) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_output_leaves_nothing_on_failure(tmp_path, error, existing):
    out = tmp_path / "out"
    if existing:
        chop_folder(out, **{"old.txt": "old"})
    with pytest.raises(type(error)), Output(out, force=True) as target:
        (target.tmp / "half.txt").write_text("half")
        raise error
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]
    else:
        assert not out.exists()


def test_output_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = chop_folder(tmp_path / "out", **{"old.txt": "old"})
    rename = os.rename

    def failing(source, target):
        if Path(source).name.startswith(".out.tmp-") and Path(target) == out:  # the new folder
            raise OSError(28, "No space left on device", str(target))
        return rename(source, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OutputError, match="cannot write the output folder .*No space left"), \
            Output(out, force=True) as target:
        (target.tmp / "new.txt").write_text("new")
        target.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existed", [False, True])
def test_a_file_created_in_outdir_meanwhile_is_kept(tmp_path, existed):
    """Hole 3: a file created in the output folder while chop wrote was deleted."""
    out = tmp_path / "out"
    if existed:
        chop_folder(out, **{"report.json": "{}"})
    with pytest.raises(OutputError, match=r"was changed while this run was working: it (is not "
                                          r"empty|holds files chop did not write: notes\.txt)"), \
            Output(out, force=existed) as target:
        (target.tmp / "report.json").write_text('{"new": 1}')
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")  # someone writes into OUTDIR meanwhile
        target.commit()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "report.json").exists() == existed
    assert leftovers(tmp_path) == []


def test_one_run_at_a_time_per_outdir(tmp_path):
    """Hole 3: two runs to the same -o both succeeded, the second replacing the first."""
    out = tmp_path / "out"
    with Output(out) as first:
        with pytest.raises(OutputError, match=rf"another chop run \(pid {os.getpid()}\) is "
                                              r"writing .*out; wait for it"):
            Output(out).__enter__()
        assert leftovers(tmp_path) == [".out.lock", first.tmp.name]
        (first.tmp / "report.json").write_text("{}")
        first.commit()
    with Output(out) as second:  # the lock is free again
        with pytest.raises(OutputError, match="was changed while this run was working: it is not empty"):
            second.commit()  # without force, the first run's outputs stay
    assert leftovers(tmp_path) == [] and (out / "report.json").is_file()


def test_a_file_in_the_way_of_the_lock_is_refused_and_left_alone(tmp_path):
    """A link where the lock goes (to a user's file) was truncated to a pid and removed; a
    user's own file of that name was removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.lock").symlink_to(victim)
    (tmp_path / ".notes.lock").write_text("my notes")
    with pytest.raises(OutputError, match=r"\.out\.lock is in the way .* a symbolic link"):
        Output(tmp_path / "out").__enter__()
    with pytest.raises(OutputError, match=r"\.notes\.lock is in the way .* other data"):
        Output(tmp_path / "notes").__enter__()
    assert victim.read_text() == "precious" and (tmp_path / ".out.lock").is_symlink()
    assert (tmp_path / ".notes.lock").read_text() == "my notes"
    (tmp_path / ".stale.lock").write_text("4194304")  # a killed run's lock: taken over
    with Output(tmp_path / "stale") as target:
        (target.tmp / "report.json").write_text("{}")
        target.commit()
    assert not (tmp_path / ".stale.lock").exists()


def test_unwritable_places_fail_before_any_work(tmp_path):
    """Hole 4: -o under a regular file or at /proc/x failed with exit 3 after the whole run."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write the output folder .*file is a file, not a folder"):
        Output(tmp_path / "file" / "out").__enter__()
    if Path("/proc/self").exists():
        with pytest.raises(OutputError, match=r"cannot write the output folder /proc/x/out: "):
            Output(Path("/proc/x/out")).__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_leftovers_of_killed_runs_are_removed_or_restored(tmp_path, caplog):
    """Hole 5: a killed run's .out.tmp-* folders stayed forever, unmentioned."""
    pid = dead_pid()
    partial = tmp_path / f".out.tmp-{pid}-abc"
    partial.mkdir()
    (partial / "model.pt2").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getpid()}-def"  # a live process's: not touched
    alive.mkdir()
    other = tmp_path / ".other.tmp-1-x"  # another OUTDIR's: not touched
    other.mkdir()
    moved = chop_folder(tmp_path / f".out.old-{pid}-ghi", **{"report.json": "{}"})
    with caplog.at_level("WARNING", logger="chop"), Output(tmp_path / "out"):
        pass
    assert not partial.exists() and alive.is_dir() and other.is_dir()
    assert f"removed {partial}, the unfinished output of a chop run (pid {pid})" in caplog.text
    # a run killed between moving OUTDIR aside and renaming its own folder in: OUTDIR is back
    assert not moved.exists() and (tmp_path / "out" / "report.json").is_file()
    assert f"restored {tmp_path / 'out'} from {moved}" in caplog.text


def test_masks_of_lists_each_masked_parameter(cnn_graph):
    assert masks_of(cnn_graph) == {}
    chop.run(cnn_graph, "magnitude, mask{sparsity=0.5, scope=local, include='conv'}")
    found = masks_of(cnn_graph)
    assert list(found) == ["conv1.weight", "conv2.weight"]
    for name, mask in found.items():
        assert mask.dtype == torch.bool and mask.is_contiguous()
        assert torch.equal(mask, cnn_graph.weight_node(name).meta["chop"]["mask"])
        assert int(mask.sum()) == mask.numel() // 2


def test_export_program_has_a_dynamic_batch_and_eval_mode(cnn, cnn_graph, cnn_batches):
    x = cnn_batches[0][0]
    program = outputs.export_program(cnn_graph, x[:2])
    assert cnn_graph.training  # the graph's own mode is restored
    cnn.eval()
    for batch in (x, x[:3]):
        torch.testing.assert_close(program.module()(batch), cnn(batch))
    program = outputs.export_program(cnn_graph, x[:1])  # torch.export would fix a batch of 1
    torch.testing.assert_close(program.module()(x[:3]), cnn(x[:3]))


def test_export_program_failure_is_an_internal_error(mlp_batches, mlp, monkeypatch):
    graph = chop.trace(mlp, (mlp_batches[0][0],))

    def broken(*args, **kwargs):
        raise ValueError("cannot export\nmore detail")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(InternalError, match=r"re-exporting the pruned MLP failed: ValueError: "
                                            r"cannot export; this is a bug") as info:
        outputs.export_program(graph, mlp_batches[0][0])
    assert isinstance(info.value.__cause__, ValueError)


def test_write_outputs_writes_checked_files_and_nothing_when_a_check_fails(mlp, mlp_batches, tmp_path, monkeypatch):
    x = mlp_batches[0][0]
    graph = chop.trace(mlp, (x,))
    keys = list(mlp.state_dict())
    chop.run(graph, "magnitude, mask{sparsity=0.75}")
    masks = {k: v.clone() for k, v in masks_of(graph).items()}
    report = build_report(graph)
    out = tmp_path / "out"
    with Output(out) as target:
        outputs.write_outputs(graph, report, target, x, keys, mlp)
    assert sorted(p.name for p in out.iterdir()) == sorted([*outputs.FILES, MANIFEST])
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(outputs.FILES) and foreign_files(out) == []
    saved = load_file(out / "masks.safetensors")
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)
    weights = load_file(out / "weights.safetensors")
    assert sorted(weights) == sorted(keys)
    assert all(torch.count_nonzero(weights[k][~m]) == 0 for k, m in masks.items())  # folded

    def differs(what, got, expected):
        raise InternalError(f"{what} differs")

    monkeypatch.setattr(outputs, "check_same_outputs", differs)
    again = tmp_path / "again"
    with pytest.raises(InternalError, match="model.pt2 differs"), Output(again) as target:
        outputs.write_outputs(graph, report, target, x, keys, mlp)
    assert not again.exists() and leftovers(tmp_path) == []


def test_the_manifest_covers_nested_folders(tmp_path):
    """OUTDIR/hf/ (a Hugging Face folder): its files are listed by their path; --force replaces
    it only when all of them are chop's, and removes the emptied folder."""
    ours = tmp_path / "ours"
    (ours / "hf" / "deep").mkdir(parents=True)
    (ours / "report.json").write_text("{}")
    (ours / "hf" / "config.json").write_text('{"a": 1}')
    (ours / "hf" / "deep" / "x.bin").write_bytes(b"\x00\x01")
    write_manifest(ours)
    listed = json.loads((ours / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["hf/config.json", "hf/deep/x.bin", "report.json"]
    assert listed["hf/deep/x.bin"]["size"] == 2
    assert foreign_files(ours) == []

    (ours / "hf" / "notes.txt").write_text("mine")
    (ours / "other").mkdir()
    (ours / "hf" / "mine" / "deeper").mkdir(parents=True)  # a user's empty folders in ours
    assert foreign_files(ours) == ["other/", "hf/mine/", "hf/notes.txt"]
    (ours / "hf" / "mine" / "deeper").rmdir()
    (ours / "hf" / "mine").rmdir()
    assert foreign_files(ours) == ["other/", "hf/notes.txt"]
    with pytest.raises(OutputError, match=r"holds files chop did not write: other/, hf/notes\.txt"):
        check_outdir(ours, [], force=True)
    (ours / "hf" / "notes.txt").unlink()
    (ours / "other").rmdir()
    (ours / "hf" / "config.json").write_text('{"a": 2}')  # changed since chop wrote it
    assert foreign_files(ours) == ["hf/config.json"]
    (ours / "hf" / "config.json").write_text('{"a": 1}')

    with Output(ours, force=True) as out:
        (out.tmp / "report.json").write_text('{"new": true}')
        write_manifest(out.tmp)
        out.commit()
    assert sorted(os.listdir(ours)) == [MANIFEST, "report.json"]  # the old hf/ is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ours")]
