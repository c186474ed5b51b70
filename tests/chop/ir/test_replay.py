"""chop.ir.replay: the buffers a graph's forward writes, saved and put back; how two outputs
differ."""

from __future__ import annotations

import torch
from torch import nn

import chop
from chop.ir.replay import WrittenBuffers, output_difference


class Stateful(nn.Module):
    """Bumps a counter, writes a row of a cache through a view; reads a buffer it never writes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(2, 3))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        y = self.fc(x) * self.scale
        self.cache[1].copy_(y[0].detach())
        return y + self.calls


def test_the_written_buffers_are_found_through_views_and_put_back() -> None:
    model = Stateful()
    graph = chop.trace(model, (torch.randn(2, 4),))
    written = WrittenBuffers(graph.module)
    assert written.names == ["cache", "calls"]  # not "scale", which it only reads
    graph.module(torch.randn(2, 4))
    assert float(graph.module.get_buffer("calls")) == 1
    written.restore()
    assert float(graph.module.get_buffer("calls")) == 0
    assert torch.equal(graph.module.get_buffer("cache"), torch.zeros(2, 3))
    model.calls.fill_(5)  # another module with buffers of those names: saved from it
    from_model = WrittenBuffers(graph.module, model)
    model.calls.fill_(7)
    from_model.restore()
    assert float(model.calls) == 5


def test_output_difference_is_relative_to_the_output_scale_and_says_what() -> None:
    y = {"logits": torch.tensor([1000.0, 0.001]), "ids": torch.tensor([1, 2])}
    assert output_difference({"logits": y["logits"] + 0.01, "ids": y["ids"]}, y) is None
    assert output_difference({"logits": y["logits"] + 1.0, "ids": y["ids"]}, y) == (
        "output 0 differs by up to 1 (the output's scale is 1e+03, tolerance 0.0001 of it)")
    assert output_difference({"logits": y["logits"], "ids": y["ids"] + 1}, y) == (
        "output 1 (integer) differs")
    assert output_difference([y["logits"]], y) == "1 outputs instead of 2"
    assert output_difference(torch.tensor([float("nan")]), torch.tensor([0.0])) == (
        "output 0 has NaN where the original has none (or the reverse)")


def test_output_difference_sees_past_infinities_and_compares_constants() -> None:
    inf = float("inf")
    y = torch.tensor([[1.0, 2.0, -inf]])
    assert output_difference(y.clone(), y) is None
    assert output_difference(torch.tensor([[100.0, -50.0, -inf]]), y) == (
        "output 0 differs by up to 99 (the output's scale is 2, tolerance 0.0001 of it)")
    assert output_difference(torch.tensor([[1.0, 2.0, inf]]), y) == (
        "output 0 has an infinity where the original has none (or the reverse)")
    assert output_difference({"y": y, "w": 0.4, "on": True}, {"y": y, "w": 0.0, "on": True}) == (
        "an output that is not a tensor is 0.4 instead of 0.0")
    assert output_difference((y, float("nan")), (y, float("nan"))) is None

