"""chop.save and chop.summary: the CLI's files and table from Python, with the CLI's safety."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import chop
import zoo

FILES = {"model.pt2", "weights.safetensors", "masks.safetensors", "report.json", "sparsity.html",
         "graph.dot", ".chop-manifest.json"}


def pruned(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip{batches=3}, mask{sparsity=0.75}", data=mlp_batches)
    return graph


def test_save_writes_what_the_cli_writes_and_leaves_the_graph(mlp, mlp_batches, tmp_path):
    graph = pruned(mlp, mlp_batches)
    masks = {n.target: n.meta["chop"]["mask"].clone() for n in graph.weight_nodes()
             if "mask" in n.meta["chop"]}
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = graph.eval()(x)
    report = chop.save(graph, tmp_path / "out", mlp_batches[0][0], model=mlp)
    assert set(os.listdir(tmp_path / "out")) == FILES
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert report["totals"]["kept"] == sum(int(m.sum()) for m in masks.values()) == 416
    saved = load_file(tmp_path / "out" / "masks.safetensors")
    assert all(torch.equal(saved[k], masks[k]) for k in masks)
    weights = load_file(tmp_path / "out" / "weights.safetensors")
    model = type(mlp)()
    model.load_state_dict(weights, strict=True)  # the original names
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(torch.export.load(tmp_path / "out" / "model.pt2").module()(x),
                                   expected)
    assert all("mask" in n.meta["chop"] for n in graph.weight_nodes() if n.target in masks)

    with pytest.raises(chop.OutputError, match="already exists and is not empty"):
        chop.save(graph, tmp_path / "out", mlp_batches[0][0])
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(chop.OutputError, match="holds files chop did not write: mine.txt"):
        chop.save(graph, tmp_path / "out", mlp_batches[0][0], force=True)
    (tmp_path / "out" / "mine.txt").unlink()
    chop.save(graph, tmp_path / "out", mlp_batches[0][0], force=True)


@pytest.mark.parametrize("refused", [False, True])
def test_save_checks_each_file_on_two_samples_or_else_the_whole_batch(
        refused, mlp, mlp_batches, tmp_path, monkeypatch):
    from chop.cli import outputs

    graph = pruned(mlp, mlp_batches)
    seen = []

    def spy(module, inputs):  # every forward that computes or checks a file's outputs
        seen.append(tuple(inputs.shape))
        return real(module, inputs)

    real = outputs.call
    monkeypatch.setattr(outputs, "call", spy)
    if refused:  # cut inputs the graph refuses (a wrong width): the whole batch is run
        monkeypatch.setattr(outputs, "cut_batch", lambda module, x: x[:2, :3])
    chop.save(graph, tmp_path / "out", mlp_batches[0][0], model=mlp)
    # the graph's outputs, then model.pt2's and weights.safetensors' (the batch has 8 samples)
    assert seen == ([(2, 3)] + [(8, 16)] * 3 if refused else [(2, 16)] * 3)


class Counting(torch.nn.Module):
    """Bumps a call counter its output depends on, and writes its input in place."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        x.mul_(2)
        return self.fc(x) + self.calls


def test_save_of_a_model_that_writes_its_state_and_inputs_holds_the_state_it_checked(
        tmp_path):
    """The check's forward bumped the counter: model.pt2 then held 1 and gave outputs one
    higher than the graph's, a "bug in chop" error."""
    torch.manual_seed(0)
    model = Counting()
    graph = chop.trace(model, (torch.randn(2, 4),))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    x = torch.randn(6, 4)
    given = x.clone()
    chop.save(graph, tmp_path / "out", x, model=model)
    assert torch.equal(x, given)  # the inputs are left as they were
    assert float(load_file(tmp_path / "out" / "weights.safetensors")["calls"]) == 0
    program = torch.export.load(tmp_path / "out" / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(given.clone()), graph.eval()(given.clone()))


def _gpt2(pipeline: str):
    """A tiny GPT-2, its tokenizer, two padded sentences and its graph after ``pipeline``."""
    model, tokenizer = zoo.hf_model("gpt2"), zoo.hf_tokenizer()
    model.config.use_cache = False
    inputs = dict(tokenizer(["the cat was good", "a dog is so bad"], padding=True,
                            return_tensors="pt"))
    graph = chop.trace(model, (), kwargs=inputs)
    chop.run(graph, pipeline)
    return model, tokenizer, inputs, graph


def test_save_writes_a_transformers_model_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tokenizer, inputs, graph = _gpt2("magnitude, mask{sparsity=0.5}")
    report = chop.save(graph, tmp_path / "out", inputs, model=model, tokenizer=tokenizer)
    assert report["hf"] == {"written": True}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf").eval()
    other = {"input_ids": torch.randint(5, 40, (3, 7)), "attention_mask": torch.ones(3, 7,
                                                                                      dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**other).logits, graph.eval()(**other).logits)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "hf")("a cat")[
        "input_ids"] == tokenizer("a cat")["input_ids"]


def test_save_says_why_it_did_not_write_the_transformers_folder(tmp_path, caplog):
    pytest.importorskip("transformers")
    model, _, inputs, graph = _gpt2("magnitude, mask{granularity=channel, sparsity=0.5}, shrink")
    with caplog.at_level("WARNING", logger="chop"):
        report = chop.save(graph, tmp_path / "out", inputs, model=model)
    assert report["hf"]["written"] is False and not (tmp_path / "out" / "hf").exists()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf/ was not")]
    assert said == [f"hf/ was not written: {report['hf']['reason']}"]


def test_summary_is_the_table_and_a_picture(mlp, mlp_batches):
    graph = pruned(mlp, mlp_batches)
    summary = chop.summary(graph)
    text = str(summary)
    assert "MLP: per-layer sparsity" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    for node in graph.weight_nodes():
        if "mask" in node.meta["chop"]:
            mask = node.meta["chop"]["mask"]
            assert f"{int(mask.sum()):,}" in rows[node.target]
            assert f"{1 - mask.float().mean():.1%}" in rows[node.target]
    assert rows["total"].count(" 416 ") == 1
    page = summary._repr_html_()
    assert page.startswith('<div class="chop-sparsity">') and page.count("<svg") >= 3
    assert "layers.1.weight" in page and "body {" not in page  # styles stay inside the div
    assert summary.report["totals"]["kept"] == 416


@pytest.mark.parametrize(("trusted_loads", "error"), [(False, chop.TraceError),
                                                      (True, chop.InternalError)])
def test_save_of_a_program_that_does_not_load_back_writes_nothing(
        mlp, mlp_batches, tmp_path, monkeypatch, trusted_loads, error):
    """torch.export failing to load what it saved (Bart's data-dependent shape) is torch's
    limit, said as such; only an untrusted load failing where a trusted one works is a chop
    bug. Either way nothing is written."""
    import chop.cli.outputs as outputs

    real = outputs.load_program

    def load(path, *, trust=False):
        if trust and trusted_loads:
            return real(path, trust=True)
        raise chop.CheckpointError("model.pt2 is corrupt (expected no unbacked symbols)")

    monkeypatch.setattr(outputs, "load_program", load)
    graph = chop.run(chop.trace(mlp, (mlp_batches[0][0],)), "magnitude, mask{sparsity=0.5}")
    with pytest.raises(error, match="cannot load back" if error is chop.TraceError
                       else "does not load untrusted"):
        chop.save(graph, tmp_path / "out", (mlp_batches[0][0],))
    assert not (tmp_path / "out").exists()
