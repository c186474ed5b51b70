"""The README's Python example: SNIP-prune a small CNN to 90% sparsity and fold the masks."""

import torch
from torch import nn

import chop

model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
batches = [(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))) for _ in range(4)]

graph = chop.trace(model, (batches[0][0],))  # torch.export, with a dynamic batch dimension
chop.run(graph, "snip{batches=4}, mask{sparsity=0.9, scope=global}", data=batches)
for node in graph.weight_nodes():
    if "mask" in node.meta["chop"]:
        mask = node.meta["chop"]["mask"]
        print(f"{node.target:10} kept {int(mask.sum()):4d} of {mask.numel()}")
chop.run(graph, "fold")  # bake the masks into the weights
print(graph.eval()(torch.randn(64, 1, 8, 8)).shape)  # traced with a batch of 32, runs with 64
