"""Pooling and reduction rules: channels pass over other dims; a constant survives max, mean and
unpadded average pooling, not a sum or an average that counts padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chop.passes.export.constants import channel_constants
from zoo import traced_flow


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return (F.max_pool2d(y, 3, 1, 1), F.avg_pool2d(y, 3, 1, 1), F.avg_pool2d(y, 2),
                F.avg_pool2d(y, 3, 1, 1, count_include_pad=False), F.adaptive_avg_pool2d(y, 1),
                y.mean((2, 3)), y.amax(-1), y.sum((2, 3)))


def test_which_pools_and_reductions_keep_a_constant():
    model = Pools()
    with torch.no_grad():
        model.conv.weight[3] = 0
    graph, flow = traced_flow(model, torch.randn(2, 3, 4, 4))
    consts = channel_constants(graph, flow)
    outputs = next(n for n in graph.module.graph.nodes if n.op == "output").args[0]
    keeps = []
    for out in outputs:
        value, known = consts[out]
        assert flow.tags[out].atoms.tolist() == flow.members["conv.weight", 0].atoms.tolist()
        assert not known[:3].any()
        keeps.append(bool(known[3]))
        if known[3]:
            assert value[3] == model.conv.bias[3]
    assert keeps == [True, False, True, True, True, True, True, False]


def test_pooling_or_reducing_over_the_channels_blocks():
    class Over(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(4, 6), nn.Conv2d(3, 4, 1)

        def forward(self, x, image):
            return F.avg_pool1d(self.fc(x), 2), self.conv(image).mean(1)

    _, flow = traced_flow(Over(), torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    (pooled,) = {flow.blocked.get(a) for a in flow.members["fc.weight", 0].atoms.tolist()}
    assert pooled == "avg_pool1d (aten.avg_pool1d.default): pools over a channel dim"
    (reduced,) = {flow.blocked.get(a) for a in flow.members["conv.weight", 0].atoms.tolist()}
    assert reduced == ("mean (aten.mean.dim): normalises over these channels (a mean over "
                       "them, as in RMSNorm): removing one changes the others")
