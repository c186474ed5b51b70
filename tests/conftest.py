"""Shared models and data for the tests: small, real, built in code (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import chop
import zoo


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores as torch threads, and so do the
    processes its tests start (``OMP_NUM_THREADS``): OpenMP threads that outnumber the cores
    spin waiting for each other, and one test then takes ten times as long."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


class ResidualCNN(nn.Module):
    """Conv + BatchNorm + ReLU, a residual add, dropout and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        y = nn.functional.max_pool2d(y, 2).flatten(1)
        return self.fc(self.drop(y))


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (16, 32, 32, 4)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.fixture
def cnn() -> ResidualCNN:
    torch.manual_seed(0)
    return ResidualCNN()


@pytest.fixture
def cnn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g))
            for _ in range(3)]


@pytest.fixture
def cnn_graph(cnn: ResidualCNN, cnn_batches) -> chop.Graph:
    return chop.trace(cnn, (cnn_batches[0][0][:2],))


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def mlp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]


@pytest.fixture(scope="session")
def ranks() -> Iterator[zoo.Ranks]:
    """Two processes running test functions as the ranks of a gloo process group (zoo.Ranks),
    started once per session."""
    pool = zoo.Ranks(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Any]:
    """Tiny Hugging Face model folders (zoo.hf_folder: save_pretrained with a tokenizer built in
    code), one per kind, and ``text.jsonl`` (96 zoo.sentences) beside them; made once per
    session: copy a folder before changing it."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    folders: dict[str, Any] = {kind: zoo.hf_folder(root / kind, kind) for kind in (
        "bert", "gpt2", "llama", "bert-mlm", "bert-tokens", "bert-base")}
    folders["text"] = zoo.write_jsonl(root / "text.jsonl", zoo.sentences(96))
    return folders
