"""chop.cli.config: TOML configs are validated completely; --set overrides; typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chop.cli.config import ConfigError, apply_overrides, load_config, parse_override

GOOD = '''
[model]
source = "models:Net"
kwargs = { num_classes = 10 }

[data]
source = "digits"
batch_size = 32

[pipeline]
passes = ["snip", "mask{scope=local}", "fold"]

[passes.snip]
batches = 2

[passes.mask]
sparsity = 0.9
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "c.toml" in message or "--set" in message
    return message


def test_good_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert [p.name for p in config.passes] == ["snip", "mask", "fold"]
    snip, mask, _ = config.passes
    assert snip.batches == 2
    assert mask.sparsity == 0.9 and mask.scope == "local"
    assert config.model.source == "models:Net" and config.model.kwargs == {"num_classes": 10}
    assert config.data.source == "digits" and config.data.batch_size == 32
    assert config.data.batches == 2  # defaults to what the passes use
    assert config.folder == tmp_path


def test_pipeline_string(tmp_path: Path) -> None:
    text = GOOD.replace('["snip", "mask{scope=local}", "fold"]', '"snip, mask, fold"')
    assert [p.name for p in load_config(write(tmp_path, text)).passes] == ["snip", "mask", "fold"]


def test_set_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), ["passes.mask.sparsity=0.95",
                                                 "data.shuffle=true", "model.kwargs.width=8"])
    assert config.passes[1].sparsity == 0.95
    assert config.data.shuffle is True
    assert config.model.kwargs == {"num_classes": 10, "width": 8}
    assert config.overrides["passes.mask.sparsity"] == 0.95
    assert config.train.fast_masks is True
    assert load_config(write(tmp_path, GOOD), ["train.fast_masks=false"]).train.fast_masks is False


@pytest.mark.parametrize("text, value", [
    ("a.b=0.5", 0.5), ("a.b=3", 3), ("a.b=true", True), ('a.b="x y"', "x y"),
    ("a.b=global", "global"), ("a.b=[1, 2]", [1, 2]),
])
def test_parse_override(text: str, value) -> None:
    assert parse_override(text) == (["a", "b"], value)


@pytest.mark.parametrize("text", ["nokey", "=1", "a..b=1", "a b=1"])
def test_bad_override(text: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(text)


def test_override_into_a_value() -> None:
    with pytest.raises(ConfigError, match="is a value, not a table"):
        apply_overrides({"data": {"source": "digits"}}, ["data.source.x=1"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")


def test_syntax_error(tmp_path: Path) -> None:
    assert "line 3" in error(tmp_path, "[data]\nbatch_size = 2\nsource = \n")


def test_unknown_section(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD + "\n[pipline]\n")
    assert "unknown section [pipline]" in message and "did you mean 'pipeline'" in message


@pytest.mark.parametrize("section, key", [("model", "sorce"), ("data", "batchsize"),
                                          ("pipeline", "pases")])
def test_unknown_key(tmp_path: Path, section: str, key: str) -> None:
    message = error(tmp_path, GOOD.replace(f"[{section}]\n", f"[{section}]\n{key} = 1\n"))
    assert f"{section}.{key}" in message and f"unknown key {key!r}" in message
    assert "allowed keys" in message


def test_unknown_pass_option(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD.replace("sparsity = 0.9", "sparsty = 0.9"))
    assert "passes.mask" in message and "did you mean 'sparsity'" in message


def test_an_unknown_pass_option_is_named_not_a_valid_one_its_message_lists(tmp_path: Path) -> None:
    text = GOOD.replace("sparsity = 0.9", "sparsity = 0.9\nscope = \"local\"\nbogus = 1")
    message = error(tmp_path, text)  # the message lists the options: scope and sparsity too
    assert "passes.mask.bogus" in message and "passes.mask.scope" not in message


def test_unknown_pass_table(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD + "\n[passes.snipp]\nbatches = 1\n")
    assert "unknown pass 'snipp'" in message and "did you mean 'snip'" in message


def test_table_for_a_pass_not_in_the_pipeline(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD + "\n[passes.random]\nseed = 1\n")
    assert "passes.random" in message and "not in the pipeline" in message


def test_unknown_pass_in_pipeline(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD.replace('"fold"]', '"flod"]'))
    assert "pipeline.passes" in message and "did you mean 'fold'" in message


@pytest.mark.parametrize("override, needles", [
    ("passes.mask.sparsity=1.0", ["passes.mask.sparsity", "[0, 1)", "--set"]),
    ("passes.mask.sparsity=-0.1", ["[0, 1)"]),
    ('passes.mask.sparsity="high"', ["'high'", "expected float"]),
    ("passes.mask.scope=globl", ["'globl'", "'global'"]),
    ("passes.snip.batches=0", ["batches=0", "at least 1"]),
    ("data.batch_size=0", ["data.batch_size", "out of range"]),
    ("data.batch_size=2.5", ["data.batch_size", "a float (2.5)"]),
    ("data.shuffle=1", ["data.shuffle", "true or false"]),
    ("data.shape=[1, 0]", ["data.shape", "positive integers"]),
    ("data.classes=1", ["data.classes", "at least 2"]),
    ("data.batches=1", ["data.batches", "pass 'snip' uses", "at least 2"]),
    ("model.source=3", ["model.source", "an integer (3)"]),
    ("model.kwargs=3", ["model.kwargs", "expected a table"]),
    ("pipeline.passes=[]", ["pipeline.passes", "non-empty list"]),
    ("pipeline.passes=[1]", ["pipeline.passes"]),
    ("train.fast_masks=1", ["train.fast_masks", "true or false"]),
    # torch's generators take 64-bit seeds: larger ones were an internal error (exit 3)
    ("data.seed=99999999999999999999", ["data.seed", "out of range", "2**64 - 1"]),
    ("train.seed=99999999999999999999", ["train.seed", "2**64 - 1"]),
    ("train.lr=inf", ["train.lr", "a positive (finite) number"]),
    # found before loading and tracing, not by the Pruner after them, without the key
    ('train.prune_criterion="snp"', ["train.prune_criterion", "unknown pass 'snp'"]),
    ('train.prune_criterion="fold"', ["train.prune_criterion", "not one criterion pass"]),
])
def test_bad_values(tmp_path: Path, override: str, needles: list[str]) -> None:
    message = error(tmp_path, GOOD, (override,))
    for needle in needles:
        assert needle in message, (needle, message)


def test_option_set_twice(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD.replace("sparsity = 0.9", 'scope = "global"'))
    assert "passes.mask.scope" in message and "set both" in message and "keep one" in message


def test_set_wins_over_the_pipeline_string(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), ["passes.mask.scope=global"])
    assert config.passes[1].scope == "global"


def test_missing_passes(tmp_path: Path) -> None:
    assert "pipeline.passes" in error(tmp_path, "[model]\nsource = \"a:b\"\n")


def test_model_is_optional(tmp_path: Path) -> None:
    text = GOOD.split("[data]")[1]
    assert load_config(write(tmp_path, "[data]" + text)).model is None


def test_loss_section_and_text_data_keys(tmp_path: Path) -> None:
    text = GOOD + ('\n[loss]\nsource = "losses:mine"\n')
    text = text.replace("batch_size = 32", 'batch_size = 32\ntext_field = "review"\n'
                        'label_field = "stars"\nmax_length = 48\neval_batches = 0')
    config = load_config(write(tmp_path, text))
    assert config.loss == "losses:mine"
    assert (config.data.text_field, config.data.label_field, config.data.max_length,
            config.data.eval_batches) == ("review", "stars", 48, 0)
    assert load_config(write(tmp_path, GOOD)).loss is None
    assert load_config(write(tmp_path, GOOD)).data.eval_batches == 4
    for bad in ('"mine"', '":mine"', "3", '"losses:"'):
        message = error(tmp_path, GOOD + f"\n[loss]\nsource = {bad}\n")
        assert "loss.source: expected a string \"module:callable\"" in message
    assert "unknown key 'sorce' in [loss] (did you mean 'source'?)" in error(
        tmp_path, GOOD + '\n[loss]\nsorce = "a:b"\n')
    assert "data.eval_batches: -1 is out of range" in error(
        tmp_path, GOOD.replace("batch_size = 32", "batch_size = 32\neval_batches = -1"))
    assert "data.label_field: expected a string" in error(
        tmp_path, GOOD.replace("batch_size = 32", "batch_size = 32\nlabel_field = 1"))


def test_each_train_key_is_checked_on_its_own_value(tmp_path: Path) -> None:
    """Every key's check ran for every key: at lr = 5 prune_end's compared 5 with
    prune_start = "a", a TypeError, an internal error (exit 3)."""
    message = error(tmp_path, GOOD + '\n[train]\nlr = 5\nprune_sparsity = 0.95\n'
                    'prune_start = "a"\n')
    assert "train.prune_start" in message and "an integer of at least 0" in message


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Editors on Windows save UTF-8 with a BOM: "Invalid statement (at line 1, column 1)"."""
    path = write(tmp_path, GOOD)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [p.name for p in load_config(path).passes] == \
        [p.name for p in load_config(write(tmp_path, GOOD)).passes]


def test_a_config_nested_past_the_stack_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "a = " + "[" * 100_000))
    assert parse_override("x.y=" + "[" * 100_000)[1].startswith("[[")  # a bare word
