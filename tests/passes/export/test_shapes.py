"""Node shapes after shrink: updated from the cut, they equal what fake-tensor propagation of the
whole graph computes, on every zoo model (heads, folded heads, splits, concat, depthwise…)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chop
from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import group_masks
from chop.passes.export import shapes
from chop.passes.export.shapes import propagate_shapes
from chop.passes.export.shrink import shrink
from zoo import CrossAttention, prune_half, trace


def masked(name, *args):
    """Zoo model ``name`` (or a module, traced with ``args``), with the lowest-scoring half of
    every group masked out."""
    graph = trace(name)[1] if isinstance(name, str) else chop.trace(name.eval(), args)
    groups = channel_groups(graph)
    for param, mask in group_masks(graph, groups, prune_half(graph, groups)).items():
        insert_mask(graph, graph.weight_node(param), mask)
    graph.recompile()
    return graph


def described(graph):
    """Each node's value as (type, shape, dtype, device, fake mode) and, for op results,
    requires_grad (FakeTensorProp's weights never require it, as traced ones do), the output
    node aside. Not the strides: a resized view (a transpose, a split's part) gets its own dense
    strides in the view's dim order, not its base's (no analysis reads the strides of node
    values; a re-export traces them anew)."""
    modes = {id(n.meta["val"].fake_mode) for n in graph.module.graph.find_nodes(op="placeholder")}

    def one(v, op):
        if isinstance(v, torch.Tensor):
            return (type(v).__name__, tuple(str(s) for s in v.shape), v.dtype, v.device.type,
                    id(getattr(v, "fake_mode", None)) in modes,
                    v.requires_grad if op == "call_function" else None)
        if isinstance(v, (list, tuple)):
            return tuple(one(x, op) for x in v)
        return str(v)

    return {n.name: one(n.meta.get("val"), n.op) for n in graph.module.graph.nodes
            if n.op != "output"}


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet", "inception", "mlp", "bert", "gpt2",
                                  "mobilenetv3", "efficientnet", "convnext", "vit", "swin"])
def test_shapes_from_the_cut_equal_fake_tensor_propagation(name, monkeypatch):
    graph = masked(name)
    monkeypatch.setattr(shapes, "propagate_shapes", lambda g: pytest.fail("fell back"))
    shrink(graph)
    mine = described(graph)
    propagate_shapes(graph)
    assert mine == described(graph)


def test_a_failure_falls_back_to_fake_tensor_propagation(monkeypatch):
    graph, reference = masked("resnet"), masked("resnet")
    shrink(reference)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(shapes, "_refresh", broken)
    shrink(graph)
    assert described(graph) == described(reference)


@pytest.mark.parametrize("fails", [False, True])
def test_the_fake_mode_gets_its_cache_back(fails, monkeypatch):
    graph = masked("resnet")
    mode = shapes._fake_mode(graph)
    assert mode.cache_enabled
    seen = []
    refresh = shapes._refresh

    def watched(*args):
        seen.append(mode.cache_enabled)  # off while the values are made: each is made once
        if fails:
            raise RuntimeError("boom")
        refresh(*args)

    monkeypatch.setattr(shapes, "_refresh", watched)
    shrink(graph)
    assert seen == [False] and mode.cache_enabled


class SpatialSplit(nn.Module):
    """A split along a dim without channels: the split node itself carries none, but its
    results shrink with its input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        top, bottom = self.conv1(x).relu().split(2, dim=2)
        return self.fc((self.conv2(top) + self.conv2(bottom)).mean((2, 3)))


@pytest.mark.parametrize("model, args", [
    (SpatialSplit(), (torch.randn(2, 3, 4, 4),)),
    (CrossAttention(), (torch.randn(2, 5, 8), torch.randn(2, 6, 8))),
], ids=["spatial-split", "cross-attention"])
def test_nodes_without_channels_whose_inputs_or_sizes_changed_run_their_op(model, args, monkeypatch):
    torch.manual_seed(0)
    graph = masked(model, *args)
    monkeypatch.setattr(shapes, "propagate_shapes", lambda g: pytest.fail("fell back"))
    shrink(graph)
    mine = described(graph)
    propagate_shapes(graph)
    assert mine == described(graph)
