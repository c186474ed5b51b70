"""SNIP on a model sharded with FSDP2, one process per GPU (or per CPU process, with gloo):

    torchrun --standalone --nproc-per-node 2 examples/fsdp_snip.py

Each process holds a shard of every weight. chop.Pruner scores the shards with SNIP on each
process's own batch (FSDP2 reduces the gradients as in training) and selects with histograms
summed over the processes, so the masks are exactly those one process would make for the whole
model on all the batches: 90% of the weights pruned, counted over all layers.
"""

import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import chop

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
torch.manual_seed(0)  # the same model in every process before sharding
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer)
fully_shard(model)
g = torch.Generator().manual_seed(dist.get_rank())  # each process scores its own batch
batches = [(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))]
pruner = chop.Pruner(model, 0.9, criterion="snip", data=batches)
pruner.prune(0.9)  # now; or call its step hooks from the training loop

kept = torch.tensor([sum(int(m.sum()) for m in pruner.masks.values())])  # this process's shards
total = torch.tensor([sum(m.numel() for m in pruner.masks.values())])
dist.all_reduce(kept)
dist.all_reduce(total)
if dist.get_rank() == 0:
    print(f"kept {int(kept)} of {int(total)} weights ({1 - int(kept) / int(total):.1%} pruned)")
del pruner, model  # free the sharded state before leaving the group: freed after it (at exit,
gc.collect()  # by the garbage collector) it can abort the process
dist.barrier()
dist.destroy_process_group()
