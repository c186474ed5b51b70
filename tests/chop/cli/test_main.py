"""``chop transform`` and ``chop report`` end to end: outputs load back and reproduce the pruned
model; every bad input fails with a short message, no traceback and nothing in OUTDIR."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import chop
from chop.cli.main import main
from chop.kernels import allocator

ROOT = Path(__file__).resolve().parents[3]
OUTPUTS = {"model.pt2", "weights.safetensors", "masks.safetensors", "report.json",
           "sparsity.html", "graph.dot", ".chop-manifest.json"}

MODEL_PY = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 9, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
'''

CONFIG = '''
[model]
source = "tinynet:Tiny"
kwargs = {{ num_classes = 10 }}

[data]
source = "batches.pt"
batch_size = 16
batches = 2

[pipeline]
passes = {passes}

[passes.snip]
batches = 2

[passes.mask]
sparsity = 0.8
scope = "global"
'''


def _tiny_class(folder: Path):
    namespace: dict = {}
    exec(compile(MODEL_PY, str(folder / "tinynet.py"), "exec"), namespace)
    return namespace["Tiny"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with tinynet.py, batches.pt, model.ckpt and snip.toml (snip, mask, fold)."""
    (tmp_path / "tinynet.py").write_text(MODEL_PY)
    torch.manual_seed(0)
    model = _tiny_class(tmp_path)()
    torch.save(model.state_dict(), tmp_path / "model.ckpt")
    generator = torch.Generator().manual_seed(1)
    torch.save({"inputs": torch.randn(40, 1, 6, 6, generator=generator),
                "targets": torch.randint(0, 10, (40,), generator=generator)},
               tmp_path / "batches.pt")
    write_config(tmp_path, '["snip", "mask", "fold"]')
    return tmp_path


def write_config(folder: Path, passes: str, extra: str = "", name: str = "snip.toml") -> Path:
    path = folder / name
    path.write_text(CONFIG.format(passes=passes) + extra)
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("CHOP_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "chop.cli", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=300)


def api_graph(folder: Path, pipeline: str):
    """The same pruning through the Python API: chop.trace + chop.run."""
    model = _tiny_class(folder)()
    model.load_state_dict(torch.load(folder / "model.ckpt", weights_only=True))
    data = torch.load(folder / "batches.pt", weights_only=True)
    batches = [(data["inputs"][i:i + 16], data["targets"][i:i + 16]) for i in (0, 16)]
    graph = chop.trace(model, batches[0][0])
    chop.run(graph, pipeline, data=batches)
    return graph, batches


@pytest.mark.parametrize("passes", ['["snip", "mask", "fold"]', '"snip, mask"'])
def test_transform_end_to_end(project: Path, passes: str, capfd) -> None:
    config = write_config(project, passes)
    out = project / "out"
    result = run_cli("transform", "--config", str(config), str(project / "model.ckpt"),
                     "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert set(os.listdir(out)) == OUTPUTS
    assert "fc1.weight" in result.stdout and "total" in result.stdout  # the per-layer table

    graph, batches = api_graph(project, "snip{batches=2}, mask{sparsity=0.8}")
    graph.eval()
    x = torch.randn(5, 1, 6, 6)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = graph.module(x)

    masks = load_file(out / "masks.safetensors")
    api_masks = {n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes()
                 if "mask" in n.meta["chop"]}
    assert masks.keys() == api_masks.keys() == {"conv.weight", "fc1.weight", "fc2.weight"}
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, api_masks[name]), name

    program = torch.export.load(out / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected)

    weights = load_file(out / "weights.safetensors")
    model = _tiny_class(project)()
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0

    report = json.loads((out / "report.json").read_text())
    kept = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    assert report["totals"]["kept"] == kept == round(0.2 * numel)
    assert [step["name"] for step in report["pipeline"]][:2] == ["snip", "mask"]
    assert report["pipeline"][1]["options"]["sparsity"] == 0.8
    assert all(step["seconds"] >= 0 for step in report["pipeline"])
    assert len(report["checkpoint"]["sha256"]) == 64
    assert set(report["versions"]) == {"chop", "torch", "python"}
    layer = next(layer for layer in report["layers"] if layer["name"] == "fc1.weight")
    assert layer["op"] == "linear" and layer["shape"] == [16, 36] and layer["numel"] == 576
    assert layer["kept"] == int(masks["fc1.weight"].sum())
    assert set(layer["saliency"]) == {"min", "p50", "mean", "p90", "max"}

    html = (out / "sparsity.html").read_text()
    assert "<svg" in html and "fc1" in html
    assert (out / "graph.dot").read_text().startswith("digraph")

    capfd.readouterr()
    for path in (out, out / "model.pt2", out / "weights.safetensors"):
        assert main(["report", str(path)]) == 0
        shown = capfd.readouterr().out
        assert "fc1.weight" in shown
        assert f"{kept:,}" in shown.split("total")[1]  # from masks, or zeros in the weights


@pytest.mark.parametrize(
    ("passes", "extra", "pipeline"),
    [
        ('["snip", "mask", "shrink"]', 'granularity = "channel"\n', "mask{granularity=channel, sparsity=0.8}, shrink"),
        ('["snip", "mask", "sparse"]', '\n[passes.sparse]\nmode = "all"\n', "mask{sparsity=0.8}, sparse{mode=all}"),
    ],
    ids=["shrink", "sparse"],
)
def test_transform_writes_shrunk_and_sparse_models(project: Path, passes, extra, pipeline,
                                                   capfd) -> None:
    config = write_config(project, passes, name="structured.toml")
    config.write_text(config.read_text().replace('scope = "global"\n', 'scope = "global"\n' + extra, 1))
    out = project / "out"
    result = run_cli("transform", "--config", str(config), str(project / "model.ckpt"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    graph, _ = api_graph(project, "snip{batches=2}, " + pipeline)
    graph.eval()
    x = torch.randn(5, 1, 6, 6)
    program = torch.export.load(out / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), graph.module(x))
    weights = load_file(out / "weights.safetensors")  # the smaller model's own state dict
    assert weights.keys() == graph.module.state_dict().keys()
    stored = sum(t.numel() for k, t in weights.items() if t.is_floating_point())
    dense = sum(p.numel() for p in _tiny_class(project)().parameters())
    assert stored < dense
    before, after = graph.history[-1].info["total"]["params"]
    assert after < before
    assert f"{graph.history[-1].name}: parameters {before:,} -> {after:,}" in result.stdout
    assert "not pruned" not in result.stdout + result.stderr  # it is: smaller, or CSR
    if "sparse" not in passes:
        # [model] builds the unshrunk shapes: chop train takes model.pt2 and says why
        assert main(["train", "--config", str(config), str(out), "-o", str(project / "t")]) == 0
        captured = capfd.readouterr()
        said, out_text = (" ".join(t.split()) for t in (captured.err, captured.out))  # rich wraps
        assert "the OUTDIR was shrunk, so [model] no longer builds its shapes" in said
        assert "not pruned" not in said + out_text  # it was: by the shrink that made the OUTDIR
        report = json.loads((project / "t" / "report.json").read_text())
        assert report["checkpoint"]["pipeline"] == json.loads(passes)
        assert report["warnings"] == []
        trained = torch.export.load(project / "t" / "model.pt2").state_dict
        assert {k: v.shape for k, v in trained.items()} == {
            k: v.shape for k, v in program.state_dict.items()}
        return
    # the CSR layers are reported and their masks saved, as the masked weights' would be
    masks = load_file(out / "masks.safetensors")
    assert {"fc1.weight", "fc2.weight"} <= masks.keys()
    for name in ("fc1.weight", "fc2.weight"):
        stored = graph.module.get_buffer(name + "_values").numel()
        assert int(masks[name].sum()) == stored
        assert re.search(rf"{re.escape(name)} .*│ +{stored:,} │", result.stdout), name
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["kept"] == sum(int(m.sum()) for m in masks.values())
    assert "fc1.weight" in (out / "sparsity.html").read_text()  # a layer of the picture
    dot = (out / "graph.dot").read_text()
    assert re.search(r'label="fc1 \(linear\)\\n16×36\\nkept \d+/576', dot)
    shown = run_cli("report", str(out / "model.pt2"))  # a fresh `chop`: the op registers itself
    assert shown.returncode == 0, shown.stderr
    assert "fc1.weight" in shown.stdout
    # a sparse export has no weights left to train: refused, nothing written
    assert main(["train", "--config", str(config), str(out), "-o", str(project / "t")]) == 2
    assert "holds a sparse export" in capfd.readouterr().err
    assert main(["train", "--config", str(config), str(project / "model.ckpt"),
                 "-o", str(project / "t")]) == 2
    assert "sparse is an export for inference" in capfd.readouterr().err
    assert not (project / "t").exists()


def test_transform_json_quiet_set_and_default_outdir(project: Path, capfd) -> None:
    config = project / "snip.toml"
    args = ["transform", "--config", str(config), str(project / "model.ckpt"), "--json",
            "--quiet", "--set", "passes.mask.sparsity=0.5", "--set", "passes.mask.scope=local"]
    assert main(args) == 0
    captured = capfd.readouterr()
    report = json.loads(captured.out)
    assert captured.err == ""
    out = project / "snip-out"  # default: a new folder next to the config
    assert set(os.listdir(out)) == OUTPUTS
    assert report["config"]["overrides"] == {"passes.mask.sparsity": 0.5,
                                             "passes.mask.scope": "local"}
    for layer in report["layers"]:
        assert layer["kept"] == round(layer["numel"] / 2)  # local: every layer keeps half
    assert main(args) == 0  # a second run never overwrites the first
    capfd.readouterr()
    assert (project / "snip-out-2" / "report.json").is_file()


def test_pt2_checkpoint_needs_no_model_section(project: Path, capfd) -> None:
    first = project / "first"
    assert main([*transform_args(project), "-o", str(first), "--quiet"]) == 0
    config = project / "snip.toml"
    text = config.read_text()
    config.write_text(text[text.index("[data]"):].replace("sparsity = 0.8", "sparsity = 0.9"))
    args = [*transform_args(project, ckpt="first/model.pt2"), "--json", "--quiet"]
    assert main([*args, "-o", str(project / "again")]) == 0
    report = json.loads(capfd.readouterr().out)
    assert report["checkpoint"]["kind"] == "program"
    assert set(os.listdir(project / "again")) == OUTPUTS
    # the weights already pruned to 80% score zero, so 90% keeps a subset of the first masks
    first_masks = load_file(first / "masks.safetensors")
    for name, mask in load_file(project / "again" / "masks.safetensors").items():
        assert not (mask & ~first_masks[name]).any()


def test_report_of_checkpoint(project: Path, capfd) -> None:
    assert main(["report", str(project / "model.ckpt")]) == 0
    out = capfd.readouterr().out
    assert "fc1.weight" in out and "conv.weight" in out


def test_readme_example_runs(tmp_path: Path) -> None:
    result = run_cli("transform", "--config", "examples/lenet5_snip.toml", "examples/lenet5.ckpt",
                     "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "conv1.weight" in result.stdout and "95.0%" in result.stdout
    assert set(os.listdir(tmp_path / "out")) == OUTPUTS
    # the README shows the figures this prints: the table, and what pruning did to accuracy
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    metric = next(line for line in result.stdout.splitlines() if line.startswith("accuracy on"))
    assert metric == "accuracy on 1,024 held-out samples: 98.8% before pruning, 10.0% after " \
                     "(-88.9 points)" and metric in readme
    for line in result.stdout.splitlines():
        if line.startswith(("│ conv", "│ fc", "│ total", "model:")):
            assert line.rstrip() in readme, line
    # the README's training command on that output (one epoch here, to keep the test short)
    result = run_cli("train", "--config", "examples/lenet5_snip.toml", str(tmp_path / "out"),
                     "-o", str(tmp_path / "trained"), "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    epoch = next(line for line in result.stdout.splitlines() if line.startswith("epoch 1: loss"))
    assert epoch[:epoch.rindex(" (")] in readme  # the README's first epoch, without its time
    assert set(os.listdir(tmp_path / "trained")) == OUTPUTS


# -- bad input: non-zero exit, a readable message, no traceback, nothing in OUTDIR ----------------


def fails(args: list[str], out: Path, capfd, *needles: str, extra: tuple = ()) -> str:
    code = main([*args, *extra, "-o", str(out)])
    err = capfd.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("error:"), err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, err)
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return flat


def transform_args(project: Path, config: Path | None = None,
                   ckpt: str = "model.ckpt") -> list[str]:
    return ["transform", "--config", str(config or project / "snip.toml"), str(project / ckpt)]


def test_missing_config(project: Path, capfd) -> None:
    fails(transform_args(project, project / "nope.toml"), project / "out", capfd,
          "nope.toml does not exist")


def test_toml_syntax_error(project: Path, capfd) -> None:
    bad = project / "bad.toml"
    bad.write_text("[data]\nsource = digits\n")
    fails(transform_args(project, bad), project / "out", capfd, "bad.toml is not valid TOML",
          "line 2")


def test_unknown_key(project: Path, capfd) -> None:
    config = write_config(project, '["snip", "mask"]', name="typo.toml")
    config.write_text(config.read_text().replace("sparsity = 0.8", "sparsty = 0.8"))
    fails(transform_args(project, config), project / "out", capfd, "typo.toml",
          "passes.mask", "'sparsty'", "did you mean 'sparsity'")


def test_unknown_section(project: Path, capfd) -> None:
    config = write_config(project, '["snip", "mask"]', "\n[modle]\nx = 1\n", name="sec.toml")
    fails(transform_args(project, config), project / "out", capfd, "unknown section [modle]",
          "did you mean 'model'")


def test_wrong_type(project: Path, capfd) -> None:
    fails([*transform_args(project), "--set", 'passes.mask.sparsity="high"'], project / "out",
          capfd, "passes.mask.sparsity", "--set", "'high'", "expected float")


def test_wrong_type_in_data(project: Path, capfd) -> None:
    fails([*transform_args(project), "--set", "data.batch_size=true"], project / "out", capfd,
          "data.batch_size", "expected a positive integer", "a boolean")


def test_sparsity_out_of_range(project: Path, capfd) -> None:
    fails([*transform_args(project), "--set", "passes.mask.sparsity=1.5"], project / "out",
          capfd, "snip.toml", "passes.mask.sparsity", "1.5", "[0, 1)")


def test_pass_table_not_in_pipeline(project: Path, capfd) -> None:
    config = write_config(project, '["magnitude", "mask"]', name="extra.toml")
    fails(transform_args(project, config), project / "out", capfd, "[passes.snip]",
          "not in the pipeline")


def test_missing_checkpoint(project: Path, capfd) -> None:
    fails(transform_args(project, ckpt="nope.ckpt"), project / "out", capfd,
          "nope.ckpt does not exist")


@pytest.mark.parametrize("name", ["corrupt.ckpt", "corrupt.safetensors", "corrupt.pt2"])
def test_corrupt_checkpoint(project: Path, capfd, name: str) -> None:
    (project / name).write_bytes(b"this is not a checkpoint" * 10)
    fails(transform_args(project, ckpt=name), project / "out", capfd, name, "corrupt")


def test_truncated_checkpoint(project: Path, capfd) -> None:
    data = (project / "model.ckpt").read_bytes()
    (project / "cut.ckpt").write_bytes(data[: len(data) // 2])
    fails(transform_args(project, ckpt="cut.ckpt"), project / "out", capfd, "cut.ckpt", "corrupt")


def test_mismatched_state_dict(project: Path, capfd) -> None:
    state = torch.load(project / "model.ckpt", weights_only=True)
    state["fc2.weight"] = torch.zeros(12, 16)
    state["extra.weight"] = torch.zeros(3)
    del state["fc1.bias"]
    torch.save(state, project / "other.ckpt")
    fails(transform_args(project, ckpt="other.ckpt"), project / "out", capfd,
          "does not match Tiny", "1 missing keys: fc1.bias", "1 unexpected keys: extra.weight",
          "fc2.weight (12, 16) in the checkpoint vs (10, 16) in the model")


def test_pickled_module_needs_trust(project: Path, capfd) -> None:
    sys.path.insert(0, str(project))
    try:
        import tinynet

        torch.save(tinynet.Tiny(), project / "whole.pt")
    finally:
        sys.path.remove(str(project))
    message = fails(transform_args(project, ckpt="whole.pt"), project / "out", capfd,
                    "pickled Python objects", "--trust-checkpoint", "state_dict()")
    assert "tinynet.Tiny" in message
    # with --trust-checkpoint it runs, and needs no [model]
    args = [*transform_args(project, ckpt="whole.pt"), "--trust-checkpoint", "--quiet"]
    assert main([*args, "-o", str(project / "trusted")]) == 0
    assert set(os.listdir(project / "trusted")) == OUTPUTS


def test_data_file_without_targets(project: Path, capfd) -> None:
    torch.save({"inputs": torch.randn(40, 1, 6, 6)}, project / "batches.pt")
    fails(transform_args(project), project / "out", capfd, "batches.pt has no 'targets'",
          "'inputs'")


def test_model_source_does_not_import(project: Path, capfd) -> None:
    fails([*transform_args(project), "--set", "model.source=missingmod:Net"], project / "out",
          capfd, "model.source", "no module named 'missingmod'")


def test_model_source_raises_while_importing(project: Path, capfd) -> None:
    (project / "broken.py").write_text("import torch\nraise ValueError('boom')\n")
    fails([*transform_args(project), "--set", "model.source=broken:Net"], project / "out",
          capfd, "importing broken failed: ValueError: boom", "broken.py:2")


def test_bad_model_kwargs(project: Path, capfd) -> None:
    fails([*transform_args(project), "--set", "model.kwargs.depth=3"], project / "out", capfd,
          "calling Tiny(num_classes=10, depth=3) failed", "TypeError")


def test_existing_outdir_is_refused_then_forced(project: Path, capfd) -> None:
    out = project / "out"
    assert main([*transform_args(project), "-o", str(out), "--quiet"]) == 0
    assert main([*transform_args(project), "-o", str(out)]) == 2  # never replaced silently
    assert "--force" in capfd.readouterr().err
    assert main([*transform_args(project), "-o", str(out), "--force", "--quiet"]) == 0
    assert set(os.listdir(out)) == OUTPUTS
    assert capfd.readouterr() == ("", "")  # --quiet: nothing but errors


def test_force_never_deletes_files_chop_did_not_write(project: Path, capfd, monkeypatch) -> None:
    """Hole 2: `cd myproject && chop transform --config ../cfg/snip.toml ../cfg/model.ckpt -o .
    --force` deleted the whole project folder."""
    mine = project.parent / "myproject"
    mine.mkdir()
    (mine / "train.py").write_text("print('my work')")
    monkeypatch.chdir(mine)
    assert main([*transform_args(project), "-o", ".", "--force"]) == 2
    assert "output path . is the current folder" in capfd.readouterr().err
    other = project.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "data").mkdir()
    assert main([*transform_args(project), "-o", str(other), "--force"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "holds files chop did not write: data/, notes.txt" in err and "nothing was deleted" in err
    assert (mine / "train.py").read_text() == "print('my work')"
    assert (other / "notes.txt").read_text() == "mine" and (other / "data").is_dir()

    # --force on the folder of the data file or of the model's .py
    for folder, name in (("data", "batches.pt"), ("nets", "tinynet.py")):
        (project / folder).mkdir()
        (project / name).rename(project / folder / name)
    config = project / "snip.toml"
    config.write_text(config.read_text().replace('"tinynet:Tiny"', '"nets.tinynet:Tiny"')
                      .replace('"batches.pt"', '"data/batches.pt"'))
    for folder, name in (("data", "batches.pt"), ("nets", "tinynet.py")):
        out = project / folder
        assert main([*transform_args(project), "-o", str(out), "--force"]) == 2
        assert f"holds the input {out / name}" in " ".join(capfd.readouterr().err.split())
        assert (out / name).is_file()
    assert main([*transform_args(project), "-o", str(project / "fine"), "--quiet"]) == 0


def test_outdir_holding_the_input_is_refused(project: Path, capfd) -> None:
    code = main([*transform_args(project), "-o", str(project), "--force"])
    assert code == 2
    assert "would overwrite" in capfd.readouterr().err
    assert (project / "model.ckpt").is_file()


def test_failure_late_in_the_run_leaves_nothing(project: Path, capfd, monkeypatch) -> None:
    import chop.cli.outputs

    def broken(*args, **kwargs):
        raise chop.ChopError("simulated failure while writing")

    monkeypatch.setattr(chop.cli.outputs, "render_html", broken)
    fails(transform_args(project), project / "out", capfd, "simulated failure")


def test_subprocess_error_has_no_traceback(project: Path) -> None:
    (project / "corrupt.pt2").write_bytes(b"garbage" * 10)
    result = run_cli(*transform_args(project, ckpt="corrupt.pt2"), "-o", str(project / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "corrupt" in result.stderr
    assert not (project / "out").exists()


def test_a_bug_inside_a_pass_exits_3_with_one_line(project: Path, capfd, monkeypatch) -> None:
    from chop.passes.transform.mask import Mask

    def buggy(self, graph, ctx):
        return graph.no_such_attribute  # an AttributeError: a bug, not a user mistake

    monkeypatch.setattr(Mask, "apply", buggy)
    monkeypatch.delenv("CHOP_TRACEBACK", raising=False)
    out = project / "out"
    assert main([*transform_args(project), "-o", str(out)]) == 3
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("internal error: InternalError: pass 'mask' (after the following "
                               "passes: snip) failed: AttributeError")
    assert "CHOP_TRACEBACK=1" in lines[0] and "bug" in lines[0]
    assert not out.exists()

    monkeypatch.setenv("CHOP_TRACEBACK", "1")  # the traceback on request, the original chained
    with pytest.raises(chop.InternalError) as info:
        main([*transform_args(project), "-o", str(out)])
    assert isinstance(info.value.__cause__, AttributeError)


def test_a_user_mistake_inside_a_pass_exits_2(project: Path, capfd, monkeypatch) -> None:
    monkeypatch.delenv("CHOP_TRACEBACK", raising=False)
    torch.save({"inputs": torch.randn(40, 1, 6, 6), "targets": torch.randint(0, 10, (40, 3))},
               project / "batches.pt")  # one row of targets per sample: not class indices
    args = [*transform_args(project), "-o", str(project / "out")]
    assert main([*args, "--set", "data.eval_batches=0"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: pass 'snip'") and "targets" in err and "Traceback" not in err
    assert main(args) == 2  # the held-out batches are measured first
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "snip.toml: [data] eval_batches: evaluating the held-out " \
        "batches: the default cross-entropy loss raised" in " ".join(err.split())


# -- hostile inputs and the user's folders (issue 9) ------------------------------------------------


def evil_pt2(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of the chop output ``src`` whose sample inputs are a pickle that, unpickled, runs
    ``touch marker``."""

    class Marker:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            body = (pickle.dumps(Marker(), protocol=2) if "sample_inputs/" in info.filename
                    else zin.read(info))
            zout.writestr(info.filename, body)
    return dst


def test_a_pt2_runs_no_code_without_trust(project: Path, capfd) -> None:
    """Hole 1: a .pt2 whose sample inputs unpickle to os.system ran it in `chop report` (exit 0)
    and `chop transform`."""
    assert main([*transform_args(project), "-o", str(project / "first"), "--quiet"]) == 0
    marker = project / "PWNED"
    evil_pt2(project / "first" / "model.pt2", project / "evil.pt2", marker)
    config = project / "snip.toml"
    config.write_text(config.read_text().split("[data]", 1)[0].split("[model]")[0]
                      + "[data]" + config.read_text().split("[data]", 1)[1])  # no [model]
    before = (project / "evil.pt2").read_bytes()
    for args in (["report", str(project / "evil.pt2")],
                 [*transform_args(project, ckpt="evil.pt2"), "-o", str(project / "out")]):
        assert main(args) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert err.startswith("error: ") and "Traceback" not in err
        assert "sample_inputs/model.pt holds a pickled Python object (posix.system)" in err
        assert "--trust-checkpoint" in err and not marker.exists()
    assert (project / "evil.pt2").read_bytes() == before and not (project / "out").exists()
    result = run_cli("report", str(project / "evil.pt2"))  # the command, as a process
    assert result.returncode == 2 and "posix.system" in result.stderr and not marker.exists()
    assert "Traceback" not in result.stderr
    # chop's own outputs need no trust, and trusted loading still works
    for trust in ([], ["--trust-checkpoint"]):
        assert main(["report", str(project / "first" / "model.pt2"), *trust]) == 0
    assert "fc1.weight" in capfd.readouterr().out


WAIT_DATA = '''
import time
from pathlib import Path

import torch

def batches(batch_size=16):
    go = Path(__file__).with_name("go")
    for _ in range(1200):  # a slow data source: waits for the test to say go
        if go.exists():
            break
        time.sleep(0.05)
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch_size, 1, 6, 6, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(2)]
'''


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def popen_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("CHOP_TRACEBACK", None)
    return subprocess.Popen([sys.executable, "-m", "chop.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def test_two_runs_into_one_outdir(project: Path, capfd) -> None:
    """Hole 3: two runs to the same -o both succeeded, the second silently replacing the
    first."""
    (project / "waitdata.py").write_text(WAIT_DATA)
    config = project / "snip.toml"
    config.write_text(config.read_text().replace('"batches.pt"', '"waitdata:batches"'))
    out = project / "out"
    first = popen_cli(*transform_args(project), "-o", str(out), "--quiet")
    try:
        wait_for(lambda: any(p.name.startswith(f".out.tmp-{first.pid}-") for p in project.iterdir()))
        assert main([*transform_args(project), "-o", str(out)]) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert f"another chop run (pid {first.pid}) is writing {out}" in err
        (project / "go").write_text("")
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.communicate()
    written = (out / "report.json").read_text()
    assert main([*transform_args(project), "-o", str(out)]) == 2  # no silent replacement
    assert "--force" in capfd.readouterr().err and (out / "report.json").read_text() == written


def test_a_file_created_in_outdir_while_chop_runs_is_kept(project: Path, capfd) -> None:
    """Hole 3: a file created in the output folder while chop writes was deleted."""
    (project / "userdata.py").write_text(
        "from pathlib import Path\nimport torch\n\n"
        "def batches():\n"
        "    out = Path(__file__).with_name('out')\n"
        "    out.mkdir(exist_ok=True)\n"
        "    (out / 'notes.txt').write_text('written meanwhile')\n"
        "    data = torch.load(Path(__file__).with_name('batches.pt'))\n"
        "    return [(data['inputs'][i:i + 16], data['targets'][i:i + 16]) for i in (0, 16)]\n"
    )
    config = project / "snip.toml"
    config.write_text(config.read_text().replace('"batches.pt"', '"userdata:batches"')
                      .replace("batch_size = 16\n", ""))
    out = project / "out"
    assert main([*transform_args(project), "-o", str(out), "--force"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "was changed while this run was working: it holds files chop did not write: notes.txt" in err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "written meanwhile"
    assert not [p for p in project.iterdir() if p.name.startswith(".out.")]


def mount_tmpfs(path: Path, *options: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(path)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_unwritable_outdirs_fail_first_as_user_errors(project: Path, capfd) -> None:
    """Hole 4: -o under a regular file, on a read-only file system or at /proc/x failed with exit
    3 ("internal error … a bug") after the whole run; an empty mount point failed with EBUSY and
    left a .NAME.old-* folder. The checkpoint here does not exist: the output fails first."""
    (project / "notes.txt").write_text("x")
    cases = [(project / "notes.txt" / "out", "notes.txt is a file, not a folder")]
    if Path("/proc/self").exists():
        cases.append((Path("/proc/x/out"), "cannot write the output folder /proc/x/out"))
    for out, expected in cases:
        assert main([*transform_args(project, ckpt="missing.ckpt"), "-o", str(out)]) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert err.startswith("error: cannot write the output folder") and expected in err, err
    mount_tmpfs(project / "ro", "-o", "ro")
    mount_tmpfs(project / "mnt")
    try:
        assert main([*transform_args(project, ckpt="missing.ckpt"), "-o", str(project / "ro" / "out")]) == 2
        assert "Read-only file system" in capfd.readouterr().err
        for force in ([], ["--force"]):
            args = transform_args(project, ckpt="missing.ckpt")
            assert main([*args, "-o", str(project / "mnt"), *force]) == 2
            err = " ".join(capfd.readouterr().err.split())
            assert "is a mount point; chop replaces OUTDIR with one rename" in err
        assert not [p for p in project.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(project / "ro")], check=False)
        subprocess.run(["umount", str(project / "mnt")], check=False)


def ignored_sigint() -> None:
    """Skip when this process ignores SIGINT, as a command started in the background by a
    shell without job control does: chop (like every program) leaves an ignored SIGINT
    ignored, as under ``nohup``, so Ctrl-C cannot be tested from here."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background); chop "
                    "leaves it ignored")


def catches_sigterm(pid: int) -> bool:
    """True once the process has installed a SIGTERM handler (chop's main has started)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGINT, 130, "interrupted: stopped; no partial output was left"),
    (signal.SIGTERM, 143, "terminated: stopped; no partial output was left"),
])
def test_a_signal_during_a_finalizer_still_stops_the_run(monkeypatch, capfd, sig, code,
                                                         line) -> None:
    """A signal that arrives while a ``__del__`` runs raises there, where Python only prints
    the exception: the run went on to exit 0 with the signals ignored."""
    import chop.cli.main as cli

    if sig == signal.SIGINT:
        ignored_sigint()

    after: list[int] = []

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), sig)  # the handler runs inside this finalizer
            sum(range(1000))

    def run(argv, show_traceback) -> int:
        Finalized()  # collected at once: the signal arrives inside its __del__
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # after the finalizer, where it is delivered again
            after.append(1)
        return 0

    monkeypatch.setattr(cli, "_main", run)
    hook, handler, start = sys.unraisablehook, signal.getsignal(sig), time.monotonic()
    assert main([]) == code
    assert capfd.readouterr().err == line + "\n"
    assert after and time.monotonic() - start < 4.0  # stopped in the loop, not at its end
    assert signal.getsignal(sig) is handler and sys.unraisablehook is hook  # restored


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGINT, 130, "interrupted: stopped; no partial output was left"),
    (signal.SIGTERM, 143, "terminated: stopped; no partial output was left"),
])
def test_a_signal_at_start_up_prints_one_line(project: Path, sig, code, line) -> None:
    """Hole 5: Ctrl-C during start-up printed a 38-line traceback."""
    if sig == signal.SIGINT:
        ignored_sigint()
    process = popen_cli(*transform_args(project), "-o", str(project / "out"))
    wait_for(lambda: catches_sigterm(process.pid), timeout=60)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    # A KeyboardInterrupt raised inside eval() of a string (namedtuple does it while modules
    # import) makes CPython end the process with SIGINT even though chop caught it: a shell
    # sees status 130 either way.
    allowed = (code, -signal.SIGINT) if sig == signal.SIGINT else (code,)
    assert process.returncode in allowed and err == line + "\n"
    assert not [p for p in project.iterdir() if p.name.startswith(".out") or p.name == "out"]


SLOW_COPY = '''
import time

from tinynet import Tiny

class SlowCopy(Tiny):
    """A model whose deepcopy (chop checks weights.safetensors on a copy) takes minutes."""

    def __deepcopy__(self, memo):
        time.sleep(300)
'''


def start_slow_writer(project: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A real `chop transform` held in its writing step, its files all in the temporary folder."""
    (project / "slownet.py").write_text(SLOW_COPY)
    config = write_config(project, '["snip", "mask", "fold"]', name="slow.toml")
    config.write_text(config.read_text().replace('"tinynet:Tiny"', '"slownet:SlowCopy"'))
    process = popen_cli(*transform_args(project, config), "-o", str(out))
    pattern = f".{out.name}.tmp-{process.pid}-"

    def written() -> Path | None:
        tmp = [p for p in out.parent.iterdir() if p.name.startswith(pattern)]
        return tmp[0] if tmp and (tmp[0] / ".chop-manifest.json").exists() else None

    wait_for(lambda: written() is not None or process.poll() is not None)
    assert process.poll() is None, process.communicate()
    return process, written()


def test_sigterm_while_writing_leaves_nothing(project: Path) -> None:
    """Hole 5: SIGTERM left .out.tmp-* folders with a partial model.pt2."""
    out = project / "out"
    process, tmp = start_slow_writer(project, out)
    assert (tmp / "model.pt2").is_file()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err == "terminated: stopped; no partial output was left\n"
    assert not out.exists() and not [p for p in project.iterdir() if p.name.startswith(".out")]


def test_leftovers_of_a_killed_run_are_removed_by_the_next(project: Path, capfd) -> None:
    """Hole 5: the .out.tmp-* folder of a killed run stayed, and no later run cleaned or named
    it."""
    out = project / "out"
    process, tmp = start_slow_writer(project, out)
    process.kill()  # SIGKILL: no clean-up possible
    process.communicate(timeout=120)
    assert (tmp / "model.pt2").is_file() and not out.exists()
    assert main([*transform_args(project), "-o", str(out)]) == 0
    err = "".join(capfd.readouterr().err.split())  # rich wraps long paths anywhere
    assert f"removed{tmp},theunfinishedoutputofachoprun(pid{process.pid})thatwaskilled" in err
    assert not tmp.exists() and set(os.listdir(out)) == OUTPUTS
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".")) == []


def test_a_pipeline_that_cannot_run_fails_before_loading(project: Path, capfd) -> None:
    """Hole 6: `mask` without a criterion was refused only after ~24 s of loading and tracing;
    here the checkpoint does not even exist."""
    config = write_config(project, '["mask", "fold"]', name="nocrit.toml")
    config.write_text(config.read_text().replace("[passes.snip]\nbatches = 2\n", ""))
    fails(transform_args(project, config, ckpt="missing.ckpt"), project / "out", capfd,
          "nocrit.toml: [pipeline] passes: pass 'mask' needs 'saliency'", 'e.g. "snip, mask"')


def test_data_errors_say_what_to_fix(project: Path, capfd) -> None:
    """Hole 6: torch's messages (a guard failure, "Target 10 is out of bounds", cross-entropy on
    float targets, weights_only=False advice) instead of what is wrong and how to fix it."""
    assert main([*transform_args(project), "-o", str(project / "first"), "--quiet"]) == 0
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 1, 6, 6, generator=g)
    nomodel = project / "nomodel.toml"
    text = (project / "snip.toml").read_text()
    nomodel.write_text(text[text.index("[data]"):])

    torch.save({"inputs": torch.randn(40, 3, 6, 6), "targets": torch.zeros(40, dtype=torch.long)},
               project / "batches.pt")  # three channels for a one-channel program
    flat = fails(transform_args(project, nomodel, ckpt="first/model.pt2"), project / "out", capfd,
                 "[data]: the batches' input x is float32[16, 3, 6, 6], but",
                 "model.pt2 takes x: float32[batch, 1, 6, 6]", "only the batch size may differ")
    assert "Guard failed" not in flat and len(capfd.readouterr().err) == 0

    torch.save({"inputs": inputs, "targets": torch.randint(0, 20, (40,), generator=g)},
               project / "batches.pt")
    fails(transform_args(project), project / "out", capfd, "error: pass 'snip':",
          "the targets hold class 1", "but the model outputs 10 classes",
          "class targets must be in [0, 10)", extra=("--set", "data.eval_batches=0"))
    fails(transform_args(project), project / "out", capfd,  # the metric before pruning
          "snip.toml: [data] eval_batches: the targets hold class 1")

    torch.save({"inputs": inputs, "targets": torch.randn(40)}, project / "batches.pt")
    fails(transform_args(project), project / "out", capfd,
          "[data]: the targets are float32[16], but chop's command line scores and trains with "
          "cross-entropy over integer class labels")

    (project / "batches.pt").write_bytes(bytes(range(256)) * 4)
    (project / "random.pt").write_bytes(bytes(range(256)) * 4)
    for args, needle in ((transform_args(project), "cannot read data file"),
                         (transform_args(project, ckpt="random.pt"), "random.pt is corrupt")):
        flat = fails(args, project / "out", capfd, needle)
        assert "weights_only" not in flat


def test_a_chained_cause_is_shown_with_chop_traceback(project: Path, monkeypatch) -> None:
    (project / "random.pt").write_bytes(bytes(range(256)) * 4)
    monkeypatch.setenv("CHOP_TRACEBACK", "1")
    with pytest.raises(chop.CheckpointError) as info:
        main([*transform_args(project, ckpt="random.pt"), "-o", str(project / "out")])
    assert info.value.__cause__ is not None


def test_an_output_that_is_not_pruned_says_so(project: Path, capfd) -> None:
    """Hole 7: sparsity = 0.0, or a pipeline without a mask pass, wrote a "pruned" model that is
    0% sparse without a word."""
    assert main([*transform_args(project), "-o", str(project / "zero"),
                 "--set", "passes.mask.sparsity=0.0"]) == 0
    shown = " ".join(capfd.readouterr().out.split())
    assert "warning: not pruned: the masks keep every weight (sparsity 0.0)" in shown
    report = json.loads((project / "zero" / "report.json").read_text())
    assert report["warnings"] == ["not pruned: the masks keep every weight (sparsity 0.0); raise "
                                  "the mask pass's sparsity, e.g. [passes.mask] sparsity = 0.9"]
    config = project / "nomask.toml"
    config.write_text(CONFIG.format(passes='["magnitude"]').split("[passes.snip]")[0])
    assert main([*transform_args(project, config), "-o", str(project / "nomask"), "--json"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert report["warnings"][0].startswith("not pruned: no pass of the pipeline made masks")
    assert main(["report", str(project / "nomask")]) == 0
    assert "warning: not pruned" in capfd.readouterr().out
    assert main([*transform_args(project), "-o", str(project / "pruned"), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["warnings"] == []


# -- property: hostile configs and files never crash chop, never leave anything, never change input --


SECTIONS = {
    "model": ["source", "kwargs", "modle"],
    "data": ["source", "batch_size", "batches", "shuffle", "seed", "shape", "classes", "sise"],
    "pipeline": ["passes", "pases"],
    "passes.snip": ["batches", "accumulate", "bn", "temperature", "x"],
    "passes.mask": ["sparsity", "scope", "granularity", "min_keep", "include", "biases"],
    "train": ["epochs", "lr", "optimizer"],
    "junk": ["a"],
}
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
SCALARS = st.one_of(
    st.booleans(), st.integers(-3, 70), st.integers(0, 4), st.floats(0, 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["snip", "mask", "fold", "global", "local", "tinynet:Tiny", "batches.pt",
                     "digits", "synthetic", "2:4", "4x4", "channel", "sum-of-abs", "train",
                     "snip, mask", "x:y", "../model.ckpt", "magnitude, mask, shrink"]),
    TEXT,
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else "inf" if value == float("inf") else \
            "-inf" if value == float("-inf") else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


@st.composite
def configs(draw) -> tuple[str, list[str]]:
    """A TOML config of chop's sections and keys (and some typos) with random values; or the
    valid config with random ``--set`` overrides; or random text."""
    kind = draw(st.sampled_from(["random", "overridden", "text"]))
    if kind == "text":
        return draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=60)), []
    sections = draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True))
    pairs = [(section, key) for section in sections
             for key in draw(st.lists(st.sampled_from(SECTIONS[section]), min_size=1, max_size=3,
                                      unique=True))]
    if kind == "overridden":  # one or two known keys: runs that get further
        return CONFIG.format(passes='["snip", "mask", "fold"]'), [
            f"--set={section}.{key}={toml_value(draw(VALUES))}" for section, key in pairs[:2]
            if key in SECTIONS[section][:4] and section != "junk"]
    text = "".join(f"\n[{section}]\n" + "".join(f"{k} = {toml_value(draw(VALUES))}\n"
                                                for s, k in pairs if s == section)
                   for section in sections)
    return text, []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def hostile(args: list[str], project: Path, capfd) -> None:
    """`chop ARGS` exits 0, or 2 with a one-paragraph message; never a traceback or exit 3;
    nothing is left behind and no input changes."""
    before = snapshot(project)
    out = project / "out"
    code = main([*args, "-o", str(out)] if args[0] == "transform" else args)
    captured = capfd.readouterr()
    assert code in (0, 2), captured.err
    assert "Traceback" not in captured.err
    if code == 2:
        assert captured.err.startswith("error: "), captured.err
        assert not out.exists()
    elif out.exists():
        assert set(os.listdir(out)) == OUTPUTS
        shutil.rmtree(out)
    assert not [p.name for p in project.iterdir() if p.name.startswith(".")]
    assert snapshot(project) == before  # the inputs are unchanged


# Derandomized, so CI is reproducible; both property tests together take well under a minute.
HOSTILE = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])


@HOSTILE
@given(config=configs())
def test_hostile_configs(project: Path, capfd, config: tuple[str, list[str]]) -> None:
    text, overrides = config
    (project / "hostile.toml").write_text(text)
    hostile([*transform_args(project, project / "hostile.toml"), *overrides], project, capfd)


@pytest.fixture
def real_files(project: Path) -> dict[str, bytes]:
    """The bytes of real files chop reads: a checkpoint, a data file, a .pt2, safetensors."""
    assert main([*transform_args(project), "-o", str(project / "first"), "--quiet"]) == 0
    first = project / "first"
    files = {".ckpt": (project / "model.ckpt").read_bytes(),
             ".pt2": (first / "model.pt2").read_bytes(),
             ".safetensors": (first / "weights.safetensors").read_bytes(),
             ".pt": (project / "batches.pt").read_bytes(),
             ".json": (first / "report.json").read_bytes()}
    shutil.rmtree(first)
    return files


@st.composite
def broken_files(draw, real: dict[str, bytes]) -> tuple[str, bytes]:
    """Random bytes, or a real file truncated or with a few bytes changed, with a suffix chop
    reads."""
    suffix = draw(st.sampled_from(sorted(real)))
    kind = draw(st.sampled_from(["random", "truncated", "flipped"]
                                + (["changed"] * 3 if suffix == ".json" else [])))
    data = real[suffix]
    if kind == "changed":  # a report.json with one value replaced
        report = node = json.loads(data)
        while True:  # walk down to a random value
            keys = list(range(len(node))) if isinstance(node, list) else sorted(node)
            key = draw(st.sampled_from(keys))
            if not isinstance(node[key], (dict, list)) or not node[key] or draw(st.booleans()):
                break
            node = node[key]
        node[key] = draw(JSON)
        return suffix, json.dumps(report).encode()
    if kind == "random":
        return suffix, draw(st.binary(max_size=600))
    if kind == "truncated":
        return suffix, data[:draw(st.integers(0, len(data) - 1))]
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return suffix, bytes(flipped)


@HOSTILE
@given(data=st.data())
def test_hostile_checkpoints_and_data_files(project: Path, capfd, real_files, data) -> None:
    suffix, content = data.draw(broken_files(real_files))
    if suffix == ".pt" and data.draw(st.booleans()):  # a broken data file
        original = (project / "batches.pt").read_bytes()
        (project / "batches.pt").write_bytes(content)
        try:
            hostile(transform_args(project), project, capfd)
        finally:
            (project / "batches.pt").write_bytes(original)
        return
    (project / f"hostile{suffix}").write_bytes(content)
    if suffix != ".json":
        hostile(transform_args(project, ckpt=f"hostile{suffix}"), project, capfd)
    hostile(["report", str(project / f"hostile{suffix}")], project, capfd)
    (project / f"hostile{suffix}").unlink()


def test_readme_safety_promises_name_tests_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Safety", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`(test_\w+)`", section))
    assert len(names) >= 10
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("test_*.py"))
    for name in names:
        assert f"def {name}(" in sources, name


def test_a_loss_of_your_own_scores_and_measures_any_model(project: Path, capfd) -> None:
    """[loss] source: regression targets the default cross-entropy refuses, scored and measured
    with the user's loss (the metric before pruning recomputed here from the checkpoint)."""
    g = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(40, 1, 6, 6, generator=g), torch.randn(40, 10, generator=g)
    torch.save({"inputs": inputs, "targets": targets}, project / "batches.pt")
    (project / "losses.py").write_text(
        "import torch\n"
        "def mse(outputs, targets):\n"
        "    return torch.nn.functional.mse_loss(outputs, targets)\n")
    config = write_config(project, '["snip", "mask", "fold"]', '\n[loss]\nsource = "losses:mse"\n',
                          name="regress.toml")
    out = project / "out"
    assert main(["transform", "--config", str(config), str(project / "model.ckpt"), "-o",
                 str(out)]) == 0
    shown = " ".join(capfd.readouterr().out.split())
    report = json.loads((out / "report.json").read_text())
    entry = report["metrics"]
    assert (entry["metric"], entry["samples"]) == ("loss", 8)  # 40 samples, 2 batches of 16
    model = _tiny_class(project)()
    model.load_state_dict(torch.load(project / "model.ckpt", weights_only=True))
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model.eval()(inputs[32:]), targets[32:]))
    assert entry["before"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert f"loss on 8 held-out samples: {expected:.4g} before pruning" in shown
    assert report["totals"]["kept"] == round(0.2 * report["totals"]["numel"])
    config.write_text(config.read_text().replace("[loss]\nsource = \"losses:mse\"\n", ""))
    assert main(["transform", "--config", str(config), str(project / "model.ckpt"), "-o",
                 str(project / "ce")]) == 2  # without it: float targets are refused
    assert "[loss] source" in " ".join(capfd.readouterr().err.split())


def test_transform_and_train_make_malloc_reuse_freed_memory_and_others_do_not(
        monkeypatch, tmp_path, capfd) -> None:
    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or False)
    missing = str(tmp_path / "missing.toml")
    assert main(["transform", "--config", missing, str(tmp_path / "m.pt")]) == 2
    assert main(["train", "--config", missing, str(tmp_path / "m.pt")]) == 2
    assert len(calls) == 2
    assert main(["passes"]) == 0
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert len(calls) == 2
    capfd.readouterr()


def test_a_full_disk_is_a_user_error_and_leaves_nothing(project: Path, capfd,
                                                        monkeypatch) -> None:
    """torch's zip writer aborted the process (exit 134) on a full disk, and safetensors' error
    was reported as a bug in chop (exit 3)."""
    small = project / "small"
    mount_tmpfs(small, "-o", "size=16k")  # model.pt2 (~32 kB) does not fit
    try:
        done = run_cli(*transform_args(project), "-o", str(small / "out"))
        assert done.returncode == 2, done.stderr  # in a subprocess: an abort must not end pytest
        assert "No space left on device" in done.stderr and os.listdir(small) == []
        import safetensors.torch
        from safetensors import SafetensorError

        def full(*_, **__):  # what safetensors raises when the disk is full
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")

        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        monkeypatch.setattr(safetensors.torch, "save_file", full)
        assert main([*transform_args(project), "-o", str(small / "out")]) == 2
        err = " ".join(capfd.readouterr().err.split())
        assert "cannot write the output folder" in err and "No space left on device" in err, err
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_outputs_get_the_modes_of_files_made_as_usual(project: Path, capfd) -> None:
    """The temporary folder's 0700 (mkdtemp) and safetensors' 0600 files reached OUTDIR."""
    umask = os.umask(0o022)
    try:
        assert main([*transform_args(project), "-o", str(project / "out"), "--quiet"]) == 0
    finally:
        os.umask(umask)
    assert (project / "out").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (project / "out").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_train_keeps_a_channels_last_outdirs_layout(project: Path) -> None:
    """[model] builds the weights row-major (safetensors keeps no strides): the trained model
    lost the layout that the OUTDIR's report still listed."""
    (project / "widenet.py").write_text(MODEL_PY.replace(
        "nn.Conv2d(1, width, 3, padding=1)",
        "nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, width, 3, padding=1))"))
    namespace: dict = {}
    exec(compile((project / "widenet.py").read_text(), "widenet.py", "exec"), namespace)
    torch.save(namespace["Tiny"]().state_dict(), project / "wide.ckpt")
    config = write_config(project, '["snip", "mask", "channels-last"]', name="cl.toml",
                          extra="\n[train]\nepochs = 1\n")
    config.write_text(config.read_text().replace("tinynet:Tiny", "widenet:Tiny"))
    out = project / "out"
    assert main(["transform", "--config", str(config), str(project / "wide.ckpt"),
                 "-o", str(out), "--quiet"]) == 0
    assert main(["train", "--config", str(config), str(out), "-o", str(project / "t"),
                 "--quiet"]) == 0
    for folder in (out, project / "t"):
        weight = torch.export.load(folder / "model.pt2").state_dict["conv.1.weight"]
        assert weight.is_contiguous(memory_format=torch.channels_last), folder
        assert not weight.is_contiguous(), folder


def test_train_refuses_a_fold_bn_outdir(project: Path, capfd) -> None:
    config = write_config(project, '["snip", "mask", "fold-bn"]', name="folded.toml")
    out = project / "out"
    assert main(["transform", "--config", str(config), str(project / "model.ckpt"),
                 "-o", str(out)]) == 0
    capfd.readouterr()
    assert main(["train", "--config", str(config), str(out), "-o", str(project / "t")]) == 2
    assert "holds a fold-bn export" in capfd.readouterr().err
    assert not (project / "t").exists()
