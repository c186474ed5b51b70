"""``chop transform`` and ``chop report`` end to end: outputs load back and reproduce the pruned
model; every bad input fails with a short message, no traceback and nothing in OUTDIR."""

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
from chop.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
OUTPUTS = {"model.pt2", "weights.safetensors", "masks.safetensors", "report.json",
           "sparsity.html", "graph.dot"}

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
def test_transform_writes_shrunk_and_sparse_models(project: Path, passes, extra, pipeline) -> None:
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
    # the README's training command on that output (one epoch here, to keep the test short)
    result = run_cli("train", "--config", "examples/lenet5_snip.toml", str(tmp_path / "out"),
                     "-o", str(tmp_path / "trained"), "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    assert "epoch 1: loss" in result.stdout + result.stderr
    assert set(os.listdir(tmp_path / "trained")) == OUTPUTS


# -- bad input: non-zero exit, a readable message, no traceback, nothing in OUTDIR ----------------


def fails(args: list[str], out: Path, capfd, *needles: str) -> str:
    code = main([*args, "-o", str(out)])
    err = capfd.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("error:"), err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, err)
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
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
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([*transform_args(project), "-o", str(out)]) == 2
    assert "--force" in capfd.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main([*transform_args(project), "-o", str(out), "--force", "--quiet"]) == 0
    assert set(os.listdir(out)) == OUTPUTS
    assert capfd.readouterr() == ("", "")  # --quiet: nothing but errors


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
    assert main([*transform_args(project), "-o", str(project / "out")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: pass 'snip'") and "targets" in err and "Traceback" not in err
