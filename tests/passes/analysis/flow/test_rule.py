"""The rule interface: finding a node's rule, the default constant transfer, and the Cut that
rules rewrite nodes from."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from chop.errors import InternalError
from chop.passes.analysis.flow.rule import RULES, Cut, Moved, Step, Tag, packet, rule_for

aten = torch.ops.aten


def node_of(target):
    graph = torch.fx.Graph()
    return graph.call_function(target, (graph.placeholder("x"),))


def test_rule_for_finds_registered_ops_and_in_place_variants_only():
    assert rule_for(node_of(aten.relu.default)) is RULES[aten.relu]
    assert rule_for(node_of(aten.relu_.default)) is RULES[aten.relu]
    assert rule_for(node_of(aten.unsqueeze_.default)) is RULES[aten.unsqueeze]
    assert packet(node_of(aten.t_.default)) is aten.t  # what a rule compares against
    assert rule_for(node_of(aten.cumsum.default)) is None
    assert rule_for(node_of(aten.cumsum_.default)) is None
    assert rule_for(node_of(aten.__and__.Tensor)) is None
    assert rule_for(node_of(torch.relu)) is None  # not an ATen op of an exported graph


def test_the_default_constant_moves_with_the_transfer_and_fills_are_unknown():
    graph = torch.fx.Graph()
    a = graph.placeholder("a")
    step = Step(Moved(), [a, None], lambda ts: torch.cat(ts), fill={1: torch.tensor([7, 8])})
    consts = {a: (torch.tensor([1.5, 2.5]), torch.tensor([True, False]))}
    value, known = step.rule.constant(None, step, consts, None)
    assert value.tolist() == [1.5, 2.5, 0.0, 0.0] and known.tolist() == [True, False, False, False]


def test_cut_gives_removed_positions_and_new_sizes_and_refuses_a_non_box():
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    tags = {x: Tag((1, 3), torch.arange(6).reshape(2, 3))}
    cut = Cut(tags, torch.tensor([False, False, True, False, False, True]))
    assert cut.gone(x).tolist() == [[False, False, True], [False, False, True]]
    assert cut.any(x) and not cut.any(y)
    assert cut.sizes(x) == {1: 2, 3: 2}
    ragged = Cut(tags, torch.tensor([True, False, False, False, False, False]))
    with pytest.raises(InternalError, match="kept at x do not form a box"):
        ragged.sizes(x)
