"""chop.cli.report: per-layer records, exact quantiles, and reading reports back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import chop
from chop.cli.report import ReportError, build_report, quantile, read_report, saliency_summary


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def pruned_graph():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,))
    graph = chop.trace(Net(), x)
    chop.run(graph, "snip, mask{sparsity=0.75}", data=[(x, y)])
    return graph


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_quantile_is_the_lower_order_statistic(q: float) -> None:
    """torch.quantile is not the reference: it computes q·(n−1) in float32 (torch 2.14 picks
    the 899th of 1001 values for q = 0.9), so the reference is a Python sort."""
    score = torch.randn(1001)
    assert quantile(score, q) == sorted(score.tolist())[math.floor(q * 1000)]


def test_saliency_summary() -> None:
    summary = saliency_summary(torch.arange(11.0))
    assert summary == {"min": 0.0, "p50": 5.0, "mean": 5.0, "p90": 9.0, "max": 10.0}
    assert saliency_summary(None) is None


def test_build_report() -> None:
    graph = pruned_graph()
    report = build_report(graph, checkpoint={"sha256": "abc"})
    assert report["model"] == "Net" and report["checkpoint"] == {"sha256": "abc"}
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["conv.weight", "fc.weight"]  # biases and norms are not layers
    conv = report["layers"][0]
    assert conv["op"] == "conv2d" and conv["role"] == "conv" and conv["layer"] == "conv"
    assert conv["shape"] == [4, 1, 3, 3] and conv["numel"] == 36 and conv["pruned"] is True
    mask = graph.weight_node("conv.weight").meta["chop"]["mask"]
    assert conv["kept"] == int(mask.sum()) and conv["sparsity"] == 1 - conv["kept"] / 36
    totals = report["totals"]
    assert totals["numel"] == 36 + 320 and totals["kept"] == round(0.25 * 356)
    assert totals["parameters"] == sum(p.numel() for p in Net().parameters())
    assert [s["name"] for s in report["pipeline"]] == ["snip", "mask"]
    assert report["pipeline"][1]["options"]["scope"] == "global"
    json.dumps(report)  # JSON-ready


def test_read_report_of_each_kind(tmp_path: Path) -> None:
    graph = pruned_graph()
    report = build_report(graph)
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert read_report(tmp_path)["totals"] == report["totals"]

    state = {k: v.clone() for k, v in Net().state_dict().items()}
    state["fc.weight"][:, :10] = 0
    save_file(state, tmp_path / "w.safetensors")
    layers = {layer["name"]: layer for layer in read_report(tmp_path / "w.safetensors")["layers"]}
    assert layers["fc.weight"]["kept"] == 5 * 54 and layers["fc.weight"]["pruned"]
    assert not layers["conv.weight"]["pruned"]

    graph.eval()
    x = torch.randn(3, 1, 4, 4)
    torch.export.save(torch.export.export(graph.module, (x,)), tmp_path / "masked.pt2")
    layers = read_report(tmp_path / "masked.pt2")["layers"]  # weights used through mask muls
    assert [layer["name"] for layer in layers] == ["conv.weight", "fc.weight"]
    chop.run(graph, "fold")
    torch.export.save(torch.export.export(graph.module, (x,)), tmp_path / "folded.pt2")
    report = read_report(tmp_path / "folded.pt2")
    assert [layer["op"] for layer in report["layers"]] == ["conv2d", "linear"]
    assert report["totals"]["kept"] == build_report(graph)["totals"]["kept"]


def test_read_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist; pass a chop transform output folder, "
                                          "a report.json, a .pt2 or a checkpoint"):
        read_report(tmp_path / "nothere")  # was: a checkpoint error, for checkpoints only
    with pytest.raises(ReportError, match="has no report.json"):
        read_report(tmp_path)
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(ReportError, match="not a chop report"):
        read_report(tmp_path / "x.json")
    (tmp_path / "deep.json").write_text("[" * 100_000)  # deeper than Python's stack
    with pytest.raises(ReportError, match="cannot read report .*deep.json"):
        read_report(tmp_path / "deep.json")


def test_reports_are_strict_json_without_nan_or_infinity() -> None:
    """A constant score's rank correlation is NaN and an inf weight's saliency mean is inf:
    json.dumps wrote them as NaN and Infinity, which JSON parsers refuse."""
    from chop.cli.report import to_json

    report = {"info": {"spearman": math.nan}, "saliency": {"max": math.inf, "min": -math.inf},
              "value": torch.tensor(math.nan), "ok": [1.5, 2]}
    assert json.loads(to_json(report)) == {"info": {"spearman": None},
                                           "saliency": {"max": None, "min": None},
                                           "value": None, "ok": [1.5, 2]}
    graph = pruned_graph()
    meta = graph.weight_node("fc.weight").meta["chop"]
    meta["saliency"] = torch.full_like(meta["saliency"], math.inf)
    text = to_json(build_report(graph))
    assert "Infinity" not in text and "NaN" not in text


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.fc(self.norm(self.emb(ids).mean(1))))


def test_tied_weights_and_buffers_are_counted_once_in_every_kind_of_file(tmp_path: Path) -> None:
    """A .pt2 holds a tie as two parameters over one memory, a .pt state dict as two names of
    one tensor: both were counted twice, and BatchNorm's running statistics as parameters."""
    torch.manual_seed(0)
    model = Tied().eval()
    with torch.no_grad():
        model.fc.weight[:8] = 0
    parameters = sum(p.numel() for p in model.parameters())  # the embedding once
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    ids = torch.randint(0, 50, (2, 5))
    torch.export.save(torch.export.export(model, (ids,)), tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    for name in ("m.pt2", "m.pt"):
        report = read_report(tmp_path / name)
        assert (report["totals"]["parameters"], report["totals"]["nonzero"]) == (
            parameters, nonzero), name
        names = [layer["name"] for layer in report["layers"]]
        assert "head.weight" not in names and {"emb.weight", "fc.weight"} <= set(names), name
    graph = chop.Graph(torch.export.load(tmp_path / "m.pt2").module(), training=False)
    assert [n.target for n in graph.weight_nodes()].count("emb.weight") == 1
    assert graph.module.get_parameter("head.weight") is graph.module.get_parameter("emb.weight")


def test_kept_counts_the_weights_that_stay_non_zero() -> None:
    """Masking an already sparse model to a lower sparsity kept the mask's count: 50% where
    the weights were 96% zeros, and model.pt2's report of the same output said 96%."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,))
    model = Net()
    with torch.no_grad():
        model.fc.weight[:, :48] = 0  # 75% of fc already zero
    graph = chop.trace(model, x)
    chop.run(graph, "random, mask{sparsity=0.5}", data=[(x, y)])
    fc = next(layer for layer in build_report(graph)["layers"] if layer["name"] == "fc.weight")
    mask = graph.weight_node("fc.weight").meta["chop"]["mask"]
    assert fc["kept"] == int(torch.count_nonzero(model.fc.weight * mask)) < int(mask.sum())
