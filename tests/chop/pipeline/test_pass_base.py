"""chop.pipeline.pass_base: options checked and coerced by their types, built from mappings,
described for ``chop passes``, printed back as pipeline text; Context.visiting; the declared
class attributes and their defaults."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass
from typing import ClassVar, Literal

import pytest
import torch.fx

import chop
from chop.errors import OptionError
from chop.pipeline.pass_base import Context, Pass, PassResult, option


@dataclass(frozen=True)
class Tune(Pass):
    """A pass with one option of each supported type."""

    name: ClassVar[str] = "tune"
    kind: ClassVar[str] = "transform"

    rate: float = option(0.5, "a float in [0, 1]")
    steps: int = option(3, "an integer")
    verbose: bool = option(False, "a flag")
    label: str = option("plain", "a string")
    scope: Literal["local", "global"] = option("local", "a choice")
    limit: int | None = option(None, "an integer or nothing")

    def check(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise OptionError(f"{self.name}: option rate={self.rate} is out of range [0, 1]")

    def apply(self, graph, ctx):
        return PassResult(modified=False, info={"rate": self.rate})


@dataclass(frozen=True)
class Bare(Pass):
    name: ClassVar[str] = "bare"
    kind: ClassVar[str] = "analysis"


@dataclass(frozen=True)
class Reshaper(Pass):
    name: ClassVar[str] = "reshaper"
    kind: ClassVar[str] = "export"
    reshapes: ClassVar[bool] = True

    def apply(self, graph, ctx):
        return PassResult(modified=True)


def test_defaults_and_lossless_coercion():
    p = Tune()
    assert p.options() == {"rate": 0.5, "steps": 3, "verbose": False, "label": "plain",
                           "scope": "local", "limit": None}
    q = Tune(rate=1, limit=7, scope="global")
    assert q.rate == 1.0 and isinstance(q.rate, float)  # int widened to float
    assert q.limit == 7 and q.scope == "global"
    assert q.options() == {**p.options(), "rate": 1.0, "limit": 7, "scope": "global"}
    import numpy as np  # a sweep over np.linspace(…, dtype=np.float32) gives numpy scalars

    n = Tune(rate=np.float32(0.9), steps=np.int64(4))
    assert (n.rate, n.steps) == (0.9, 4) and type(n.rate) is float and type(n.steps) is int


@pytest.mark.parametrize(("options", "message"), [
    ({"rate": "high"}, r"^tune: option rate='high' is not valid; expected float$"),
    ({"rate": True}, r"rate=True is not valid; expected float"),  # a bool is no number
    ({"steps": 2.0}, r"steps=2.0 is not valid; expected int$"),
    ({"steps": False}, r"steps=False is not valid; expected int"),
    ({"verbose": 1}, r"verbose=1 is not valid; expected bool$"),
    ({"label": 3}, r"label=3 is not valid; expected str$"),
    ({"scope": "everywhere"}, r"scope='everywhere' is not valid; expected one of 'local', 'global'$"),
    ({"limit": 1.5}, r"limit=1.5 is not valid; expected int or none$"),
])
def test_ill_typed_options_are_option_errors_that_say_what_is_allowed(options, message):
    with pytest.raises(OptionError, match=message):
        Tune(**options)


def test_check_runs_after_coercion():
    with pytest.raises(OptionError, match=r"rate=1.5 is out of range"):
        Tune(rate=1.5)
    with pytest.raises(OptionError, match=r"rate=-1.0 is out of range"):
        Tune(rate=-1)  # coerced to float before check() sees it


def test_passes_are_frozen_and_compare_by_options():
    p = Tune(steps=4)
    with pytest.raises(FrozenInstanceError):
        p.steps = 5
    assert p == Tune(steps=4) and p != Tune(steps=5)


def test_from_options_builds_and_rejects_unknown_names_with_a_hint():
    assert Tune.from_options({"rate": 0.25, "scope": "global"}) == Tune(rate=0.25, scope="global")
    with pytest.raises(OptionError, match=r"^tune has no option 'stesp' \(did you mean 'steps'\?\); "
                                          r"its options are: rate, steps, verbose, label, scope, limit$"):
        Tune.from_options({"stesp": 2})
    with pytest.raises(OptionError, match=r"^bare has no option 'x'; its options are: none$"):
        Bare.from_options({"x": 1})
    with pytest.raises(OptionError, match="expected int"):
        Tune.from_options({"steps": "two"})  # known names are still type-checked
    with pytest.raises(OptionError, match=r"^tune has no option 'stesp' \(did you mean 'steps'"):
        Tune(stesp=2)  # the constructor too: it was Python's TypeError, without the hint


def test_replace_changes_options_typed_and_checked_like_a_new_pass():
    p = Tune(steps=4, scope="global")
    q = p.replace(rate=1)
    assert q == Tune(steps=4, scope="global", rate=1.0) and isinstance(q.rate, float)
    assert p.rate == 0.5  # the original is unchanged
    with pytest.raises(OptionError, match=r"^tune has no option 'stesp' \(did you mean 'steps'\?\)"):
        p.replace(stesp=2)
    with pytest.raises(OptionError, match=r"^tune: option steps=2.0 is not valid; expected int$"):
        p.replace(steps=2.0)
    with pytest.raises(OptionError, match=r"rate=1.5 is out of range"):
        p.replace(rate=1.5)


def test_option_table_lists_name_type_default_and_doc():
    assert Tune.option_table() == [
        ("rate", "float", 0.5, "a float in [0, 1]"),
        ("steps", "int", 3, "an integer"),
        ("verbose", "bool", False, "a flag"),
        ("label", "str", "plain", "a string"),
        ("scope", "local|global", "local", "a choice"),
        ("limit", "int|none", None, "an integer or nothing"),
    ]
    assert Bare.option_table() == []


def test_str_shows_only_options_that_differ_from_the_defaults():
    assert str(Tune()) == "tune"
    assert str(Tune(rate=0.5, steps=3)) == "tune"  # set, but to the default
    assert str(Tune(rate=0.25, verbose=True)) == "tune{rate=0.25, verbose=true}"
    assert str(Tune(label="a b", scope="global")) == "tune{label='a b', scope=global}"
    assert str(Tune(label="snake_case-name")) == "tune{label=snake_case-name}"
    assert str(Bare()) == "bare"


def test_str_round_trips_through_the_pipeline_parser():
    from chop.passes.transform.mask import Mask

    p = Mask(sparsity=0.75, scope="global", include="fc|conv1")
    assert chop.parse_pipeline(str(p)) == [p]


def test_declared_attributes_default_to_a_plain_analysis():
    assert (Bare.requires, Bare.provides, Bare.preserves) == ((), (), "all")
    assert Bare.reshapes is False and Bare.accumulates is False
    assert Bare().data_batches() == 0
    with pytest.raises(NotImplementedError):
        Bare().apply(None, Context())


def test_reshapes_is_recorded_in_the_history(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, [Tune(), Reshaper()])
    assert [(r.name, r.reshaped) for r in graph.history] == [("tune", False), ("reshaper", True)]
    assert graph.history[0].options == Tune().options()
    assert graph.history[0].info == {"rate": 0.5}


def test_context_visiting_marks_and_restores_the_node():
    fx = torch.fx.Graph()
    a, b = fx.placeholder("a"), fx.placeholder("b")
    ctx = Context()
    assert ctx.node is None and ctx.data is None and ctx.loss is None and ctx.before == []
    with ctx.visiting(a) as yielded:
        assert yielded is a and ctx.node is a
        with ctx.visiting(b):
            assert ctx.node is b
        assert ctx.node is a  # the outer node again
    assert ctx.node is None
    with pytest.raises(ValueError), ctx.visiting(b):
        raise ValueError("boom")
    assert ctx.node is b  # an error keeps the node marked, for the manager's message


def test_context_track_defaults_to_the_identity():
    items = [1, 2, 3]
    assert Context().track(items, 3, "batches") is items
    assert Context().before is not Context().before  # no shared mutable default
