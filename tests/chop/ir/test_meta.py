"""chop.ir.meta: the typed node.meta["chop"] entries, their checks, and what chop.trace records."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Graph as FxGraph

from chop.ir import meta


def fresh_node(name: str = "w"):
    graph = FxGraph()
    return graph.get_attr(name)


WEIGHT = torch.zeros(3, 4)


def test_entries_creates_one_dict_and_returns_it_again():
    node = fresh_node()
    assert "chop" not in node.meta
    first = meta.entries(node)
    assert first == {} and node.meta["chop"] is first
    first["role"] = "linear"
    assert meta.entries(node) is first and meta.entries(node)["role"] == "linear"


def test_keys_and_analyses():
    assert set(meta.KEYS) == {"role", "op", "saliency", "mask", "channel_groups", "effective"}
    assert all(key.name == name for name, key in meta.KEYS.items())
    assert set(meta.ANALYSES) <= set(meta.KEYS)
    assert "role" not in meta.ANALYSES and "op" not in meta.ANALYSES  # facts of the model
    assert {"saliency", "mask"} <= set(meta.ANALYSES)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("saliency", torch.rand(3, 4), None),
    ("saliency", torch.rand(3, 4, dtype=torch.float64), None),
    ("saliency", torch.ones(3, 4, dtype=torch.long), "expected a float tensor, got torch.int64"),
    ("saliency", torch.rand(4, 3), "shape (4, 3) differs from the weight's (3, 4)"),
    ("saliency", [[0.0] * 4] * 3, "expected a tensor, got list"),
    ("mask", torch.ones(3, 4, dtype=torch.bool), None),
    ("mask", torch.ones(3, 4), "expected a bool tensor, got torch.float32"),
    ("mask", torch.ones(12, dtype=torch.bool), "shape (12,) differs"),
    ("effective", torch.ones(3, 4, dtype=torch.bool), None),
    ("effective", torch.ones(3, 4, dtype=torch.uint8), "expected a bool tensor"),
    ("role", "linear", None),
    ("role", 1, "expected a string, got int"),
    ("op", "conv2d", None),
    ("op", None, "expected a string, got NoneType"),
    ("channel_groups", {0: torch.arange(3)}, None),
    ("channel_groups", {0: torch.arange(3), 1: torch.full((4,), -1)}, None),
    ("channel_groups", [torch.arange(3)], "expected a dict of dim -> group ids, got list"),
    ("channel_groups", {2: torch.arange(3)}, "dim 2 is not a dim of the weight (3, 4)"),
    ("channel_groups", {"0": torch.arange(3)}, "dim '0' is not a dim"),
    ("channel_groups", {0: torch.arange(4)}, "dim 0: expected 3 group ids (long)"),
    ("channel_groups", {0: torch.zeros(3)}, "dim 0: expected 3 group ids (long)"),
])
def test_each_key_checks_its_values(key, value, problem):
    found = meta.KEYS[key].check(value, WEIGHT)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_problems_names_the_node_and_key_and_ignores_foreign_entries():
    node = fresh_node("fc.weight")
    assert meta.problems(node, WEIGHT) == []  # no chop entries at all
    entries = meta.entries(node)
    entries.update(mask=torch.ones(3, 4, dtype=torch.bool), role="linear",
                   my_plugin_key=object())  # a third-party key is not judged
    assert meta.problems(node, WEIGHT) == []
    entries["saliency"] = torch.ones(3, 4, dtype=torch.int32)
    entries["op"] = 3
    found = meta.problems(node, WEIGHT)
    assert len(found) == 2
    assert found[0].startswith(f"node {node.name} (fc.weight): meta['chop']['op']: ") or \
        found[1].startswith(f"node {node.name} (fc.weight): meta['chop']['op']: ")
    assert any("meta['chop']['saliency']: expected a float tensor" in f for f in found)


def test_trace_records_roles_and_ops_that_pass_the_checks(cnn_graph):
    recorded = {n.target: (meta.entries(n)["role"], meta.entries(n)["op"])
                for n in cnn_graph.weight_nodes()}
    assert recorded["conv1.weight"] == ("conv", "conv2d")
    assert recorded["conv1.bias"] == ("bias", "conv2d")
    assert recorded["bn1.weight"] == ("norm", "batch_norm")
    assert recorded["bn1.bias"] == ("bias", "batch_norm")
    assert recorded["fc.weight"] == ("linear", "linear")
    for node in cnn_graph.weight_nodes():
        assert meta.problems(node, cnn_graph.parameter(node)) == []
