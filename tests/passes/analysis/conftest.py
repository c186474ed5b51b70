"""Fixtures for the criterion tests: a tiny MLP and a one-layer attention model small enough for
full Hessians, a CNN with non-trivial BatchNorm statistics, and a check that scoring leaves a
model bit-identical."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn


class TinyMLP(nn.Module):
    """4 -> 5 -> 3 with tanh: 43 parameters, so its full Hessian is 43 x 43."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture
def tiny() -> TinyMLP:
    torch.manual_seed(3)
    return TinyMLP()


@pytest.fixture
def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(2)]


class Attention(nn.Module):
    """One two-head self-attention layer through F.scaled_dot_product_attention (243
    parameters). On 4-d inputs even the CPU picks a fused kernel, which has no double backward:
    the second-order criteria must switch to the math kernel."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v)  # (batch, heads, seq, 4)
        return self.head(y.transpose(1, 2).flatten(2).mean(1))


@pytest.fixture
def attention() -> Attention:
    torch.manual_seed(0)
    return Attention()


@pytest.fixture
def attention_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4,), generator=g))]


@pytest.fixture
def bn_cnn(cnn):
    """The shared ResidualCNN with running statistics that are not the initial 0 / 1."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bn in (cnn.bn1, cnn.bn2):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=g))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
    return cnn


@pytest.fixture
def unchanged() -> Callable[[nn.Module], object]:
    """``with unchanged(model): ...`` asserts that the block leaves the model's parameters,
    buffers, requires_grad flags and .grad bit-identical (one .grad is set beforehand)."""

    @contextmanager
    def check(model: nn.Module) -> Iterator[None]:
        first = next(iter(model.parameters()))
        first.grad = torch.full_like(first, 7.0)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        flags = {k: p.requires_grad for k, p in model.named_parameters()}
        grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
        yield
        for key, value in model.state_dict().items():
            assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
        assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
        for key, p in model.named_parameters():
            assert (p.grad is None) == (grads[key] is None), key
            assert p.grad is None or torch.equal(p.grad, grads[key]), key

    return check


def saliency(graph) -> dict[str, torch.Tensor]:
    return {n.target: n.meta["chop"]["saliency"] for n in graph.weight_nodes()
            if "saliency" in n.meta.get("chop", {})}


@pytest.fixture
def saliency_of() -> Callable:
    return saliency


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these models are tiny, and on a busy machine extra threads
    only add synchronisation cost (double backward and vmap suffer most)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
