"""chop.cli.spine: the steps every command shares. Bad configs fail before the output folder is
touched; loading a model names what is wrong; data errors name the config; .pt2 programs with a
fixed batch size are refused unless the data matches."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from chop.cli import spine
from chop.cli.checkpoint import load_checkpoint
from chop.cli.config import load_config
from chop.cli.models import LeNet300100
from chop.cli.outputs import Output
from chop.errors import CheckpointError, ConfigError, DataError, MissingMetadataError, OutputError
from chop.ir.graph import Graph

CONFIG = """
[model]
source = "lenet-300-100"
kwargs = { in_features = 16, num_classes = 4 }

[data]
source = "synthetic"
batch_size = 4
shape = [16]
classes = 4

[pipeline]
passes = ["magnitude", "mask"]
"""


def write(folder: Path, text: str = CONFIG, name: str = "prune.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def lenet_checkpoint(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = folder / "lenet.pt"
    torch.save(LeNet300100(16, 4).state_dict(), path)
    return path


def test_prepare_returns_the_config_and_a_new_default_outdir(tmp_path):
    config_path = write(tmp_path)
    config, out = spine.prepare(config_path, ["passes.mask.sparsity=0.75"], None, "-out",
                                [], force=False)
    assert config.passes[1].sparsity == 0.75 and config.overrides == {"passes.mask.sparsity": 0.75}
    assert out.path == (tmp_path / "prune-out").resolve()
    assert not out.path.exists()  # checked, not created
    (tmp_path / "prune-out").mkdir()
    (tmp_path / "prune-out" / "old.txt").write_text("x")
    _, out = spine.prepare(config_path, [], None, "-out", [], force=False)
    assert out.path == (tmp_path / "prune-out-2").resolve()


@pytest.mark.parametrize("bad", [
    CONFIG + "\n[trian]\nepochs = 1\n",  # a typo'd section
    CONFIG.replace('passes = ["magnitude", "mask"]', 'passes = ["magnitude", "mask{sparsity=2}"]'),
    "not toml [",
])
def test_prepare_refuses_a_bad_config_before_touching_the_output_folder(tmp_path, bad):
    config_path = write(tmp_path, bad)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=str(config_path)):
        spine.prepare(config_path, [], out, "-out", [], force=True)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.toml"]  # no default outdir either


def test_prepare_refuses_an_outdir_that_holds_an_input(tmp_path):
    config_path = write(tmp_path)
    with pytest.raises(OutputError, match=r"holds the input .*prune\.toml"):
        spine.prepare(config_path, [], tmp_path, "-out", [], force=True)
    (tmp_path / "ckpt").mkdir()
    checkpoint = lenet_checkpoint(tmp_path / "ckpt")
    with pytest.raises(OutputError, match=r"holds the input .*lenet\.pt"):
        spine.prepare(config_path, [], tmp_path / "ckpt", "-out", [checkpoint], force=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        spine.prepare(config_path, [], tmp_path / "full", "-out", [checkpoint], force=False)
    assert (tmp_path / "full" / "a").read_text() == "x"


def test_load_model_builds_the_model_and_loads_the_state_dict(tmp_path):
    config = load_config(write(tmp_path))
    path = lenet_checkpoint(tmp_path, seed=3)
    loaded = spine.load_model(config, path, trust=False)
    assert isinstance(loaded.model, LeNet300100)
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.info["kind"] == "state_dict" and loaded.info["path"] == str(path)
    assert len(loaded.info["sha256"]) == 64


def test_load_model_errors(tmp_path):
    config = load_config(write(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        spine.load_model(config, tmp_path / "missing.pt", trust=False)
    wrong = tmp_path / "wrong.pt"
    torch.save(LeNet300100(784, 10).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"does not match LeNet300100: .*shape mismatches"):
        spine.load_model(config, wrong, trust=False)
    no_model = load_config(write(tmp_path, "[data]" + CONFIG.split("[data]")[1], "nomodel.toml"))
    assert no_model.model is None
    with pytest.raises(ConfigError, match=r"nomodel\.toml: checkpoint .*lenet\.pt is a state dict, "
                                          r"so the config needs a \[model\] section"):
        spine.load_model(no_model, lenet_checkpoint(tmp_path), trust=False)
    bad_source = load_config(write(tmp_path, CONFIG.replace('"lenet-300-100"', '"lenet-300"'), "bad.toml"))
    with pytest.raises(ConfigError, match=r"did you mean 'lenet-300-100'"):
        spine.load_model(bad_source, lenet_checkpoint(tmp_path), trust=False)


def test_a_pickled_module_needs_trust_and_then_ignores_model(tmp_path, caplog):
    config = load_config(write(tmp_path))
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(16, 4)), path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        spine.load_model(config, path, trust=False)
    with caplog.at_level(logging.WARNING, logger="chop"):
        loaded = spine.load_model(config, path, trust=True)
    assert isinstance(loaded.model, nn.Sequential) and loaded.info["kind"] == "module"
    assert "[model] is not used" in caplog.text


def test_load_data_prefixes_errors_with_the_config(tmp_path):
    config = load_config(write(tmp_path, CONFIG.replace('"synthetic"', '"samples.pt"')))
    with pytest.raises(DataError, match=rf"^{config.path}: \[data\]: data file .*samples\.pt does not exist") as info:
        spine.load_data(config)
    assert isinstance(info.value.__cause__, DataError)
    batches, held = spine.load_data(load_config(write(tmp_path)))
    assert len(batches) == 1 and batches[0][0].shape == (4, 16) and batches[0][1].shape == (4,)
    assert len(held) == 4 and all(x.shape == (4, 16) for x, _ in held)  # eval_batches = 4
    assert not any(torch.equal(x, batches[0][0]) for x, _ in held)


def test_capture_traces_the_model_and_keeps_its_state_dict_keys(tmp_path):
    config = load_config(write(tmp_path))
    loaded = spine.load_model(config, lenet_checkpoint(tmp_path), trust=False)
    x = torch.randn(4, 16)
    graph, keys = spine.capture(loaded, config, x)
    assert keys == list(loaded.model.state_dict())
    torch.testing.assert_close(graph(x), loaded.model(x))
    with pytest.raises(CheckpointError, match="holds no model to trace"):
        spine.capture(spine.Loaded(loaded.checkpoint, None), config, x)


def test_run_pipeline_reports_each_pass_and_write_makes_the_outputs(tmp_path):
    config = load_config(write(tmp_path))
    loaded = spine.load_model(config, lenet_checkpoint(tmp_path), trust=False)
    batches, _ = spine.load_data(config)
    graph, keys = spine.capture(loaded, config, batches[0][0])
    seen = []
    spine.run_pipeline(config, graph, batches, spine.Hooks(on_pass=lambda p, i, n: seen.append((p.name, i, n))))
    assert seen == [("magnitude", 0, 2), ("mask", 1, 2)]
    assert [r.name for r in graph.history] == ["magnitude", "mask"]
    out = tmp_path / "out"
    with Output(out) as target:
        result = spine.write(graph, config, target, batches[0][0], keys, loaded,
                             data={"batches": 1})
    assert result.outdir == out and result.graph is graph
    assert result.report["config"] == {"path": str(config.path), "overrides": {}}
    assert result.report["data"] == {"batches": 1}
    assert {p.name for p in out.iterdir()} == {"model.pt2", "weights.safetensors", "masks.safetensors",
                                              "report.json", "sparsity.html", "graph.dot",
                                              ".chop-manifest.json"}


def export_fixed(tmp_path: Path, batch: int) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    program = torch.export.export(model, (torch.randn(batch, 16),))  # no dynamic batch
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, path)
    return path


def test_program_graph_refuses_a_fixed_batch_that_differs_from_the_data(tmp_path):
    config = load_config(write(tmp_path))  # batch_size = 4
    checkpoint = load_checkpoint(export_fixed(tmp_path, 3))
    with pytest.raises(CheckpointError, match=r"fixed\.pt2 was exported with a fixed batch size of 3 "
                                              r"\(input .*\); set \[data\] batch_size = 3 in "):
        spine.program_graph(checkpoint, config)
    with pytest.raises(CheckpointError, match="fixed batch size of 3"):
        spine.capture(spine.Loaded(checkpoint), config, torch.randn(4, 16))


def test_program_graph_wraps_a_matching_program(tmp_path):
    config = load_config(write(tmp_path))
    checkpoint = load_checkpoint(export_fixed(tmp_path, 4))
    graph = spine.program_graph(checkpoint, config)
    assert isinstance(graph, Graph) and graph.name == "fixed" and not graph.training
    x = torch.randn(4, 16)
    torch.testing.assert_close(graph(x), checkpoint.program.module()(x))
    graph, keys = spine.capture(spine.Loaded(checkpoint), config, x)
    assert keys == list(graph.module.state_dict()) and {"0.weight", "0.bias"} <= set(keys)


def test_program_graph_needs_a_program(tmp_path):
    config = load_config(write(tmp_path))
    with pytest.raises(CheckpointError, match="is not a torch.export program"):
        spine.program_graph(load_checkpoint(lenet_checkpoint(tmp_path)), config)


def test_prepare_refuses_a_pipeline_that_cannot_run_before_loading_anything(tmp_path):
    """Hole 6: a pipeline with `mask` but no criterion was refused only after loading and
    tracing (~24 s on a real model)."""
    config_path = write(tmp_path, CONFIG.replace('["magnitude", "mask"]', '["mask", "fold"]'))
    with pytest.raises(MissingMetadataError, match=rf"^{config_path}: \[pipeline\] passes: pass "
                                                   r"'mask' needs 'saliency'.*e\.g\. \"snip, mask\""):
        spine.prepare(config_path, [], tmp_path / "out", "-out", [tmp_path / "missing.pt"],
                      force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.toml"]


def test_prepare_refuses_an_outdir_that_holds_a_file_the_config_names(tmp_path):
    """Hole 2: --force on a folder holding the data file or the model's .py deleted them."""
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "nets.py").write_text("from chop.cli.models import LeNet300100 as Net\n")
    torch.save({"inputs": torch.randn(8, 16), "targets": torch.zeros(8, dtype=torch.long)},
               tmp_path / "cfg" / "data" / "samples.pt")
    text = CONFIG.replace('"lenet-300-100"', '"nets:Net"').replace('"synthetic"', '"data/samples.pt"')
    config_path = write(tmp_path / "cfg", text)
    for out, held in ((tmp_path / "cfg" / "data", "samples.pt"), (tmp_path / "cfg" / "nets.py", "nets.py")):
        with pytest.raises(OutputError, match=rf"(holds|is) the input .*{held}; writing there"):
            spine.prepare(config_path, [], out, "-out", [], force=True)
    assert (tmp_path / "cfg" / "data" / "samples.pt").is_file()


def test_load_data_checks_batches_against_each_other_and_the_loss(tmp_path):
    (tmp_path / "mixed.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return [(torch.randn(4, 16), torch.zeros(4, dtype=torch.long)),\n"
        "            (torch.randn(4, 8), torch.zeros(4, dtype=torch.long))]\n"
    )
    text = CONFIG.replace('source = "synthetic"\nbatch_size = 4\nshape = [16]\nclasses = 4',
                          'source = "mixed:batches"\nbatches = 2')
    config = load_config(write(tmp_path, text))
    with pytest.raises(DataError, match=r"\[data\]: batch 1 has inputs float32\[4, 8\] but batch 0 "
                                        r"has float32\[4, 16\]; every batch must have the same"):
        spine.load_data(config)
    torch.save({"inputs": torch.randn(8, 16), "targets": torch.randn(8)}, tmp_path / "reg.pt")
    config = load_config(write(tmp_path, CONFIG.replace('"synthetic"', '"reg.pt"')))
    with pytest.raises(DataError, match=r"\[data\]: the targets are float32\[4\], but chop's command "
                                        r"line scores and trains with cross-entropy over integer "
                                        r"class labels; save the targets as integer class indices"):
        spine.load_data(config)
    assert len(spine.load_data(config, targets=False)[0]) == 1  # magnitude needs no targets
    assert len(spine.load_data(config, loss=torch.nn.functional.mse_loss)[0]) == 1  # [loss]


def test_program_graph_refuses_data_of_another_shape(tmp_path):
    """Hole 6: data of the wrong shape for a .pt2 failed inside the first pass with torch's
    guard message (`Guard failed: x.size()[1] == 16`)."""
    path = tmp_path / "model.pt2"
    program = torch.export.export(nn.Sequential(nn.Linear(16, 4)), (torch.randn(4, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    config = load_config(write(tmp_path))
    checkpoint = load_checkpoint(path)
    with pytest.raises(DataError, match=r"\[data\]: the batches' input input_1 is float32\[4, 8\], "
                                        r"but .*model\.pt2 takes input_1: float32\[batch, 16\]; give "
                                        r"\[data\] samples of the shape and dtype"):
        spine.program_graph(checkpoint, config, torch.randn(4, 8))
    graph = spine.program_graph(checkpoint, config, torch.randn(4, 16))
    assert graph(torch.randn(3, 16)).shape == (3, 4)
