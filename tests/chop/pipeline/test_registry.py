from __future__ import annotations

import dataclasses

from chop.pipeline import registry
from chop.pipeline.pass_base import Pass


def test_every_key_is_its_pass_name_and_a_frozen_pass():
    for name, cls in registry.all_passes().items():
        assert cls.name == name
        assert issubclass(cls, Pass) and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen
        assert cls.kind in ("analysis", "transform", "export")
        assert (cls.__doc__ or "").strip(), f"{name} needs a one-line doc for `chop passes`"
        for option, _, _, doc in cls.option_table():
            assert doc, f"{name}.{option} needs a doc"


def test_contract_pass_names_exist():
    assert {"snip", "magnitude", "random", "mask", "fold"} <= set(registry.PASSES)


def test_providers():
    saliency = registry.providers("saliency")
    assert saliency[:3] == ["snip", "magnitude", "random"]  # registry order
    assert {"synflow", "grasp", "snip2", "gradient", "exact-salience", "snip-momentum"} <= set(saliency)
    assert registry.providers("mask")[0] == "mask"
