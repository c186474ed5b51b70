"""A model zoo for the structured-pruning tests: small, built in code, one of each coupling kind.

Each entry says how to build the model and its inputs (``inputs(batch)``), so tests can trace
with one batch size and check with another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class VGG(nn.Module):
    """conv-BN-ReLU ×4 with two max-pools, flatten, two linears (channels -> feature blocks)."""

    def __init__(self, widths: tuple[int, ...] = (16, 16, 32, 32), hidden: int = 64,
                 classes: int = 10, size: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        spatial = size // 2 ** (len(widths) // 2)
        self.classifier = nn.Sequential(nn.Linear(cin * spatial * spatial, hidden), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = conv_bn(cout, cout, 3)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class ResNet(nn.Module):
    """A stem, an identity block, a downsampling block with a 1×1 shortcut, global pooling."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNet(nn.Module):
    """Depthwise-separable blocks and an inverted residual (expand, depthwise, project, add),
    plus a grouped 1×1 conv."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.dw1 = conv_bn(16, 16, 3, groups=16)
        self.pw1 = conv_bn(16, 24, 1)
        self.expand = conv_bn(24, 48, 1)
        self.dw2 = conv_bn(48, 48, 3, groups=48)
        self.project = conv_bn(48, 24, 1)
        self.grouped = conv_bn(24, 32, 1, groups=4)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        x = F.relu6(self.pw1(F.relu6(self.dw1(x))))
        x = x + self.project(F.relu6(self.dw2(F.relu6(self.expand(x)))))
        x = F.relu(self.grouped(x))
        return self.fc(x.mean((2, 3)))


class Inception(nn.Module):
    """Parallel branches concatenated along channels, and a split of one conv's channels."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b3 = nn.Conv2d(16, 12, 3, padding=1)
        self.bp = nn.Conv2d(16, 4, 1)
        self.mix = nn.Conv2d(24, 16, 1)
        self.side = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        pool = F.max_pool2d(x, 3, 1, 1)
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.bp(pool))], 1)
        a, b = self.mix(x).split([8, 8], dim=1)
        x = torch.cat([F.relu(a), F.relu(self.side(F.relu(b)))], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlatMLP(nn.Module):
    """Flatten an image, three linears."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32)
        self.fc3 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.gelu(self.fc2(x)))


class Opaque(nn.Module):
    """A cumulative sum over channels: an op channel-groups does not understand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        y = torch.cumsum(self.conv2(y), dim=1)
        return self.fc(y.mean((2, 3)))


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (mode "row"): drop whole examples of a residual branch
    with probability ``p`` in training, scaling the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(survival).div_(survival)


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: a per-channel scale from the pooled feature map."""

    def __init__(self, channels: int, squeezed: int, gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.gate = gate(inplace=True) if gate is nn.Hardsigmoid else gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return scale * x


class MobileNetV3(nn.Module):
    """MobileNetV3's inverted residual with in-place hardswish, squeeze-excitation and the
    classifier's in-place dropout (torchvision, ``inplace=True`` everywhere)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.Hardswish(inplace=True))
        self.expand = nn.Sequential(*conv_bn(16, 32, 1), nn.Hardswish(inplace=True))
        self.dw = nn.Sequential(*conv_bn(32, 32, 3, groups=32), nn.Hardswish(inplace=True))
        self.se = SqueezeExcite(32, 8)
        self.project = conv_bn(32, 16, 1)
        self.head = nn.Sequential(nn.Linear(16, 24), nn.Hardswish(inplace=True),
                                  nn.Dropout(0.2, inplace=True), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class EfficientNet(nn.Module):
    """EfficientNet's MBConv: in-place SiLU, squeeze-excitation with a sigmoid gate and
    stochastic depth on the residual branch."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.SiLU(inplace=True))
        self.expand = nn.Sequential(*conv_bn(16, 48, 1), nn.SiLU(inplace=True))
        self.dw = nn.Sequential(*conv_bn(48, 48, 3, groups=48), nn.SiLU(inplace=True))
        self.se = SqueezeExcite(48, 4, nn.Sigmoid)
        self.project = conv_bn(48, 16, 1)
        self.drop = StochasticDepth(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.drop(self.project(self.se(self.dw(self.expand(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNeXt(nn.Module):
    """ConvNeXt's block: depthwise 7×7, channels-last LayerNorm, an MLP, layer scale and
    stochastic depth on the residual branch."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.drop = StochasticDepth(0.1)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + self.drop(self.scale * y)
        return self.fc(x.mean((2, 3)))


class ViT(nn.Module):
    """torchvision's ViT: a patch conv, a class token concatenated in front, a position
    embedding, and encoder blocks with ``nn.MultiheadAttention`` and an MLP."""

    def __init__(self, classes: int = 10, dim: int = 32, heads: int = 4, layers: int = 2,
                 size: int = 16, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, heads, 0.1, batch_first=True),
            "ln2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim),
        }) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            y = b["ln1"](x)
            x = x + b["attn"](y, y, y, need_weights=False)[0]
            x = x + b["fc2"](F.gelu(b["fc1"](b["ln2"](x))))
        return self.head(self.norm(x)[:, 0])


class WindowAttention(nn.Module):
    """Swin's window attention: a fused qkv projection split into (3, heads, head_dim), q @ kᵀ
    plus a relative position bias table (one column per head) indexed by a buffer, softmax,
    @ v."""

    def __init__(self, classes: int = 10, dim: int = 16, heads: int = 4, window: int = 4):
        super().__init__()
        self.heads, self.window = heads, window
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # [b, n = window², dim]
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.fc(x.mean(1))


class CrossAttention(nn.Module):
    """T5's cross-attention mask: zeros spelt with one row per head, the same for every head
    (shrink respells the zeros' sizes; nothing the mask reads shrinks)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x, memory):
        b, n, _ = x.shape
        m = memory.shape[1]
        q = self.q(x).view(b, n, 2, 4).transpose(1, 2)
        k, v = (p(memory).view(b, m, 2, 4).transpose(1, 2) for p in (self.k, self.v))
        mask = torch.zeros(1, 2, n, m).masked_fill(memory[:, None, None, :, 0] > 2, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, 8))


class Scaled(nn.Module):
    """A linear layer times a number input, which torch.export fixes at its traced value (its
    guards refuse another)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.fc(x) * scale


class Recurrent(nn.Module):
    """An embedding, a 2-layer bidirectional LSTM, a GRU and a linear head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(120, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True, dropout=0.3)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.fc = nn.Linear(5, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.embed(input_ids))
        x, _ = self.gru(x)
        return self.fc(x[:, -1])


def bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def images(batch: int, size: int = 16, channels: int = 3) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, channels, size, size, generator=g),), {}


def tokens(batch: int, seq: int = 10) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 120, (batch, seq), generator=g)
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class Entry:
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]


ZOO: dict[str, Entry] = {
    "vgg": Entry(VGG, images),
    "resnet": Entry(ResNet, images),
    "mobilenet": Entry(MobileNet, images),
    "inception": Entry(Inception, images),
    "mlp": Entry(FlatMLP, lambda b: images(b, size=8, channels=1)),
    "bert": Entry(bert, tokens),
    "gpt2": Entry(gpt2, tokens),
    "opaque": Entry(Opaque, images),
    "mobilenetv3": Entry(MobileNetV3, images),
    "efficientnet": Entry(EfficientNet, images),
    "convnext": Entry(ConvNeXt, images),
    "vit": Entry(ViT, images),
    "swin": Entry(WindowAttention, lambda b: images(b, size=8)),
}


_TRACED: dict[str, tuple[nn.Module, Any]] = {}


def trace(name: str) -> tuple[nn.Module, Any]:
    """Zoo model ``name`` (seeded) and a fresh :class:`chop.Graph` of it in eval mode, with
    BatchNorm statistics and biases made non-trivial so that they matter in equivalence checks.

    torch.export runs once per model per session; each call wraps a deep copy of that traced
    module (its own parameters), so tests may edit their graph freely.
    """
    import chop

    if name not in _TRACED:
        torch.manual_seed(0)
        model = ZOO[name].build().eval()
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                if key.endswith("running_mean"):
                    buffer.copy_(torch.randn_like(buffer) * 0.1)
                elif key.endswith("running_var"):
                    buffer.copy_(torch.rand_like(buffer) + 0.5)
            for key, param in model.named_parameters():
                if key.endswith("bias"):
                    param.copy_(torch.randn_like(param) * 0.1)
        args, kwargs = ZOO[name].inputs(2)
        graph = chop.trace(model, args, kwargs)
        _TRACED[name] = (model, graph)
    model, graph = _TRACED[name]
    return model, graph.copy()


def prune_half(graph: Any, groups: Any, seed: int = 0, granularity: str | None = None
               ) -> dict[int, torch.Tensor]:
    """Keep decisions removing the lowest-scoring half of each group's prunable channels, with
    random saliency on every conv/linear weight (scored with ``group_scores``)."""
    from chop.ir import meta
    from chop.passes.analysis.group_select import group_scores

    g = torch.Generator().manual_seed(seed)
    for node in graph.weight_nodes():
        if meta.entries(node).get("role") in ("linear", "conv"):
            meta.entries(node)["saliency"] = torch.rand(graph.parameter(node).shape, generator=g)
    keep = {}
    for gid, score in group_scores(graph, groups, granularity=granularity).items():
        group = groups[gid]
        prunable = group.prunable
        if not prunable.any():
            continue
        score = score.masked_fill(~prunable, float("inf"))
        decision = torch.ones(group.size, dtype=torch.bool)
        decision[score.argsort()[: int(prunable.sum()) // 2]] = False
        keep[gid] = decision
    return keep


def output(result: Any) -> torch.Tensor:
    """The main output tensor of a zoo model (``.logits`` of a transformers output)."""
    return result.logits if hasattr(result, "logits") else result


def traced_flow(model: nn.Module, *args: torch.Tensor) -> tuple[Any, Any]:
    """``model`` traced in eval mode with ``args``, and its channel flow (``trace_channels``)."""
    import chop
    from chop.passes.analysis.flow import trace_channels

    graph = chop.trace(model.eval(), args)
    return graph, trace_channels(graph)


# -- processes ---------------------------------------------------------------------------------
# The distributed tests run a module-level function of their own file on 2 ranks of a real gloo
# process group. Starting processes (and importing torch in them) takes seconds, so one pool of
# ranks serves the whole session (the ``ranks`` fixture of tests/conftest.py); each call gets a
# fresh process group with its own collective timeout.


def _rank_main(rank: int, world: int, tasks: Any, results: Any) -> None:
    """A rank of :class:`Ranks`: runs ``fn(rank, world, *args)`` for each task it is sent."""
    import datetime
    import importlib.util
    import pickle
    import traceback

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    torch.set_num_threads(1)  # the ranks share the machine's cores
    modules: dict[str, Any] = {}
    while (task := tasks.get()) is not None:
        path, name, args, store, timeout = pickle.loads(task)
        joined = False
        try:
            if path not in modules:
                spec = importlib.util.spec_from_file_location(f"ranks_{len(modules)}", path)
                modules[path] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(modules[path])
            # Joining gets a long timeout (a loaded machine connects slowly), and no rank starts
            # the test before every rank has joined: one that failed at once would otherwise
            # close its connections while the others still make theirs. Only then does the
            # test's own collective timeout apply.
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=60))
            try:
                dist.barrier()
                _set_pg_timeout(datetime.timedelta(seconds=timeout))
                joined = True
                outcome = ("ok", getattr(modules[path], name)(rank, world, *args))
            finally:
                dist.destroy_process_group()
        except BaseException as e:  # reported to the test, which decides
            outcome = ("error", type(e).__name__, str(e), traceback.format_exc())
        results.put(pickle.dumps((rank, outcome, joined)))
        if not joined:  # torch keeps state of a failed join that breaks the next one: restart
            return


class Ranks:
    """``world`` processes that run test functions on the ranks of a gloo process group.

    ``run(fn, *args)`` calls the module-level function ``fn(rank, world, *args)`` of a test file
    on every rank inside a fresh process group (collectives give up after ``timeout`` seconds)
    and returns the ranks' results in rank order; a rank that raises fails the test with its
    traceback, unless ``check=False``: then each rank's ``("ok", result)`` or ``("error", type
    name, message, traceback)`` is returned. Ranks that do not answer within ``deadline``
    seconds are killed and the test fails (never hangs).
    """

    def __init__(self, world: int = 2):
        import multiprocessing
        import tempfile

        self.world, self._calls = world, 0
        self._dir = tempfile.TemporaryDirectory()
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._tasks = [self._context.Queue() for _ in range(self.world)]
        self._results = self._context.Queue()
        self._procs = [self._context.Process(target=_rank_main, daemon=True, args=(
            r, self.world, self._tasks[r], self._results)) for r in range(self.world)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, timeout: float = 60.0, deadline: float = 120.0,
            check: bool = True) -> list[Any]:
        import os
        import pickle
        import queue

        self._calls += 1
        store = os.path.join(self._dir.name, f"store{self._calls}")
        task = pickle.dumps((fn.__code__.co_filename, fn.__name__, args, store, timeout))
        for tasks in self._tasks:
            tasks.put(task)
        outcomes: list[Any] = [None] * self.world
        failed_join = False
        for _ in range(self.world):
            try:
                rank, outcome, joined = pickle.loads(self._results.get(timeout=deadline))
            except queue.Empty:  # stuck: start fresh ranks for the next test
                self._stop()
                self._start()
                raise AssertionError(f"the ranks did not finish {fn.__name__} in {deadline} s"
                                     ) from None
            outcomes[rank] = outcome
            failed_join = failed_join or not joined
        if failed_join:  # those ranks have ended; fresh ones serve the next test
            self._stop()
            self._start()
        if not check:
            return outcomes
        for rank, outcome in enumerate(outcomes):
            if outcome[0] == "error":
                raise AssertionError(f"rank {rank} raised {outcome[1]}: {outcome[2]}\n{outcome[3]}")
        return [outcome[1] for outcome in outcomes]

    def _stop(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for p in self._procs:
            p.join(1)
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        self._stop()
        self._dir.cleanup()


# -- Hugging Face model folders ------------------------------------------------------------------
# Tiny transformers saved with save_pretrained, each with a word-level tokenizer trained on the
# test's own sentences (nothing is downloaded), and JSON-lines text for them.

_GOOD = ("good", "great", "fine", "happy", "bright", "warm")
_BAD = ("bad", "poor", "sad", "dark", "cold", "grim")
_NOUNS = ("cat", "dog", "day", "film", "song", "park", "book", "meal")
_FILL = ("the", "a", "was", "is", "very", "quite", "and", "this", "that", "so")


def sentences(count: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` records ``{"text": ..., "label": 0 or 1}``: a sentence of 4-9 words that holds
    good words (label 1) or bad ones (label 0), seeded."""
    import random

    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = i % 2
        words = [rng.choice(_FILL) for _ in range(rng.randint(2, 5))]
        words += [rng.choice(_NOUNS), rng.choice(_GOOD if label else _BAD)]
        words += [rng.choice(_GOOD if label else _BAD)] * rng.randint(0, 1)
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def hf_tokenizer() -> Any:
    """A word-level fast tokenizer over the words of :func:`sentences`, with BERT's special
    tokens ([CLS] text [SEP]), built with the tokenizers library."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate([*specials, *_GOOD, *_BAD, *_NOUNS, *_FILL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


TINY = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}


def hf_model(kind: str) -> nn.Module:
    """A tiny seeded transformers model: ``bert`` (sequence classifier, 2 labels),
    ``bert-mlm``, ``bert-tokens`` (token classifier, 3 labels), ``bert-base`` (no head),
    ``gpt2`` or ``llama`` (causal LMs)."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
            eos_token_id=3, pad_token_id=0))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3, **TINY))
    bert = transformers.BertConfig(**TINY, num_labels=3 if kind == "bert-tokens" else 2)
    return {"bert": transformers.BertForSequenceClassification,
            "bert-mlm": transformers.BertForMaskedLM,
            "bert-tokens": transformers.BertForTokenClassification,
            "bert-base": transformers.BertModel}[kind](bert)


def hf_folder(path: Any, kind: str, tokenizer: bool = True) -> Any:
    """:func:`hf_model` ``kind`` saved with save_pretrained into ``path`` (with the tokenizer);
    returns ``path``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf_model(kind).save_pretrained(path)
    if tokenizer:
        hf_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Any, records: list[dict[str, Any]]) -> Any:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
