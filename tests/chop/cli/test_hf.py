"""Hugging Face model folders through chop: the folder in (transformers' own loading, locally
only, safetensors only), text tokenised with the folder's tokenizer and targets that make each
task's loss the model's own, the metric before and after, and the pruned model out as ``hf/``
that transformers loads back with the pruned graph's outputs; end to end through the CLI on a
tiny BERT classifier, GPT-2 and Llama (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo
from chop.cli import hf
from chop.cli.config import DataSpec
from chop.cli.main import main
from chop.errors import CheckpointError, ConfigError, DataError
from chop.pipeline.batches import cross_entropy

transformers = pytest.importorskip("transformers")

RECORDS = zoo.sentences(12, seed=5)


def encoded(folder: hf.Folder, records=RECORDS, **options):
    return hf.encoder(folder, DataSpec(source="t.jsonl", **options))(records, "t.jsonl")


def token_lists(folder: hf.Folder, texts) -> list[list[int]]:
    return folder.tokenizer(list(texts))["input_ids"]


# -- the folder in -----------------------------------------------------------------------------


def test_task_follows_the_architecture():
    tasks = {name: hf.task_of(name) for name in (
        "BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM", "BertForMaskedLM",
        "BertForTokenClassification", "BertModel")}
    assert tasks == {"BertForSequenceClassification": "classification",
                     "GPT2LMHeadModel": "causal-lm", "LlamaForCausalLM": "causal-lm",
                     "BertForMaskedLM": "masked-lm",
                     "BertForTokenClassification": "token-classification", "BertModel": ""}


def test_a_folder_loads_the_saved_model_and_tokenizer(hf_folders):
    folder = hf.load_folder(hf_folders["llama"])
    expected = zoo.hf_model("llama").state_dict()  # the same seed built what was saved
    got = folder.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not folder.model.training and folder.model.config.use_cache is False
    assert folder.config.use_cache is True  # hf/ is saved with the folder's own config
    assert folder.task == "causal-lm" and folder.metric == "perplexity"
    assert folder.tokenizer("the cat")["input_ids"] == [2, 25, 17, 3]  # [CLS] the cat [SEP]
    assert folder.info["kind"] == "folder" and len(folder.info["sha256"]) == 64


def test_a_folder_with_only_pickled_weights_needs_trust(hf_folders, tmp_path):
    shutil.copy(hf_folders["bert"] / "config.json", tmp_path / "config.json")
    state = zoo.hf_model("bert").state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(model.safetensors\), only "
                                              r"pytorch_model.bin, a pickle .*--trust-checkpoint"):
        hf.load_folder(tmp_path)
    loaded = hf.load_folder(tmp_path, trust=True).model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="save the model into it with model.save_pretrained"):
        hf.load_folder(tmp_path)


def test_an_architecture_transformers_lacks_is_refused(hf_folders, tmp_path):
    shutil.copy(hf_folders["bert"] / "model.safetensors", tmp_path)
    config = json.loads((hf_folders["bert"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["NopeModel"]}))
    with pytest.raises(CheckpointError, match="'NopeModel', which is not a model class of "
                                              "transformers .*; chop never runs code from a "
                                              "model folder"):
        hf.load_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["pipeline"]}))
    with pytest.raises(CheckpointError, match="'pipeline', which is not a model class"):  # not a model
        hf.load_folder(tmp_path)


EVIL = """
open({marker!r}, "w").write("ran")
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
class EvilConfig(BertConfig): model_type = "evilmodel"
class EvilModel(BertModel): config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast): pass
"""


def test_code_in_a_folder_never_runs_even_when_asked(hf_folders, tmp_path):
    """transformers asks on stdin whether to run a folder's code (auto_map) unless told not
    to: answering y ran it. A subprocess answers y to everything; nothing runs."""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    folders = []
    for name, file, entries in (
        ("model", "config.json", {"model_type": "evilmodel", "architectures": ["EvilModel"],
                                  "auto_map": {"AutoConfig": "evil.EvilConfig",
                                               "AutoModel": "evil.EvilModel"}}),
        ("tokenizer", "tokenizer_config.json", {
            "tokenizer_class": "EvilTokenizer",
            "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}}),
    ):
        folder = shutil.copytree(hf_folders["bert"], tmp_path / name)
        (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
        config = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**config, **entries}))
        folders.append(str(folder))
    script = ("import sys\nfrom pathlib import Path\nfrom chop.cli import hf\n"
              "from chop.errors import CheckpointError\n"
              "for path in sys.argv[1:]:\n    try:\n        hf.load_folder(Path(path))\n"
              "    except CheckpointError as e:\n        print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", script, *folders], input="y\n" * 20,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert "config.json needs code from the folder (auto_map)" in done.stdout
    assert done.stdout.count("refused:") == 1  # the tokenizer's: loaded without its code


# -- text in: each task's targets make chop's cross-entropy the model's own loss -----------------


def test_causal_lm_targets_are_the_next_tokens(hf_folders):
    folder = hf.load_folder(hf_folders["gpt2"])
    inputs, targets = encoded(folder)
    rows = token_lists(folder, (r["text"] for r in RECORDS))
    length = max(map(len, rows))
    assert inputs["input_ids"].shape == targets.shape == (12, length)
    for i, row in enumerate(rows):
        n = len(row)
        assert inputs["input_ids"][i, :n].tolist() == row
        assert inputs["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert targets[i].tolist() == row[1:] + [-100] * (length - n + 1)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():  # the model shifts its labels itself
        outputs = folder.model(**inputs, labels=labels)
    torch.testing.assert_close(cross_entropy(outputs, targets), outputs.loss)


def test_masked_lm_masks_a_seeded_share_of_the_plain_tokens(hf_folders):
    folder = hf.load_folder(hf_folders["bert-mlm"])
    records = zoo.sentences(64, seed=1)
    inputs, targets = encoded(folder, records)
    rows = token_lists(folder, (r["text"] for r in records))
    chosen = targets != -100
    mask_id, specials = folder.tokenizer.mask_token_id, set(folder.tokenizer.all_special_ids)
    assert chosen.any(1).all()  # every row scores at least one token
    for i, row in enumerate(rows):
        for j, token in enumerate(row):
            if chosen[i, j]:
                assert token not in specials and targets[i, j] == token
                assert inputs["input_ids"][i, j] == mask_id
            else:
                assert inputs["input_ids"][i, j] == token
        assert not chosen[i, len(row):].any()
    share = int(chosen.sum()) / sum(len(r) - 2 for r in rows)
    assert 0.10 < share < 0.22
    again_inputs, again = encoded(folder, records)
    assert torch.equal(again, targets) and torch.equal(again_inputs["input_ids"], inputs["input_ids"])
    assert not torch.equal(encoded(folder, records, seed=1)[1], targets)
    with torch.no_grad():
        outputs = folder.model(**inputs, labels=targets)
    torch.testing.assert_close(cross_entropy(outputs, targets), outputs.loss)


def test_classification_labels_are_indices_or_names(hf_folders):
    folder = hf.load_folder(hf_folders["bert"])
    labels = [r["label"] for r in RECORDS]
    inputs, targets = encoded(folder, label_field="label")
    assert targets.tolist() == labels and targets.dtype == torch.int64
    named = [{**r, "label": f"LABEL_{r['label']}"} for r in RECORDS]  # the config's label2id
    assert encoded(folder, named, label_field="label")[1].tolist() == labels
    csv = [{**r, "label": str(r["label"])} for r in RECORDS]  # CSV cells are strings
    assert encoded(folder, csv, label_field="label")[1].tolist() == labels
    with pytest.raises(DataError, match=r"record 0: label 'positive' is not a class index nor a "
                                        r"label name \(the config's labels: 'LABEL_0', 'LABEL_1'\)"):
        encoded(folder, [{**r, "label": "positive"} for r in RECORDS], label_field="label")
    with torch.no_grad():
        outputs = folder.model(**inputs, labels=targets)
    torch.testing.assert_close(cross_entropy(outputs, targets), outputs.loss)


def test_token_classification_labels_follow_the_words(hf_folders):
    folder = hf.load_folder(hf_folders["bert-tokens"])
    records = [{"words": ["the", "cat", "was", "good"], "tags": [0, 1, 0, 2]},
               {"words": ["a", "zebra"], "tags": [0, 1]}]  # zebra: [UNK], still one word
    inputs, targets = encoded(folder, records, text_field="words", label_field="tags")
    assert targets.tolist() == [[-100, 0, 1, 0, 2, -100], [-100, 0, 1, -100, -100, -100]]
    assert inputs["attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]
    with torch.no_grad():
        outputs = folder.model(**inputs, labels=targets)
    torch.testing.assert_close(cross_entropy(outputs, targets), outputs.loss)


def test_text_errors_say_what_to_set(hf_folders):
    bert, gpt2 = hf.load_folder(hf_folders["bert"]), hf.load_folder(hf_folders["gpt2"])
    with pytest.raises(DataError, match=r"record 0 has no 'review' \(its fields: 'text', 'label'"
                                        r"\); set \[data\] text_field"):
        encoded(bert, text_field="review", label_field="label")
    with pytest.raises(DataError, match="classification model, whose loss and accuracy need "
                                        r"labels; set \[data\] label_field"):
        encoded(bert)
    with pytest.raises(ConfigError, match="causal language model, whose targets come from the "
                                          "text itself; remove label_field"):
        encoded(gpt2, label_field="label")
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        encoded(dataclasses.replace(gpt2, tokenizer=None))


# -- the folder out after shrink ------------------------------------------------------------------


def test_fit_config_finds_uniform_widths_and_heads_or_says_why():
    llama = zoo.hf_model("llama")
    smaller = transformers.LlamaConfig(**{**llama.config.to_dict(), "intermediate_size": 24,
                                          "num_attention_heads": 2, "num_key_value_heads": 1})
    state = transformers.LlamaForCausalLM(smaller).state_dict()
    fitted = hf.fit_config(transformers.LlamaForCausalLM, llama.config, state)
    assert (fitted.intermediate_size, fitted.num_attention_heads, fitted.num_key_value_heads,
            fitted.head_dim) == (24, 2, 1, 8)
    uneven = {**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(16, 32)}
    assert hf.fit_config(transformers.LlamaForCausalLM, llama.config, uneven).startswith(
        "transformers' LlamaForCausalLM cannot express the shrunk shapes with one config value "
        "per dimension: with the closest config, model.layers.1.mlp.up_proj.weight would be "
        "24×32, but it is 16×32 (1 parameter(s) differ). Layers shrunk to different widths")
    csr = {k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.weight"}
    csr["model.layers.0.mlp.up_proj.crow_indices"] = torch.zeros(25, dtype=torch.int64)
    assert ("(1 of LlamaForCausalLM's are gone, e.g. model.layers.0.mlp.up_proj.weight; 1 are "
            "not its, e.g. model.layers.0.mlp.up_proj.crow_indices: a pass such as fold-bn") in (
        hf.fit_config(transformers.LlamaForCausalLM, llama.config, csr))
    bert = zoo.hf_model("bert")  # fewer heads of the same size: BERT's head size is fixed
    state = {k: v[:16] if "attention.self" in k else v for k, v in bert.state_dict().items()}
    assert "cannot express" in hf.fit_config(type(bert), bert.config, state)


def test_fit_config_sets_head_dim_for_configs_that_read_it_when_set():
    """Qwen2 (like Phi-3, GPT-NeoX…) has no head_dim in its config and computes hidden ÷ heads,
    or head_dim when set: hf/ was refused after head pruning ("cannot express")."""
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    assert getattr(config, "head_dim", None) is None
    smaller = transformers.Qwen2Config(**{**config.to_dict(), "head_dim": 8,
                                          "num_attention_heads": 2, "num_key_value_heads": 1})
    with torch.device("meta"):
        state = transformers.Qwen2ForCausalLM(smaller).state_dict()
    fitted = hf.fit_config(transformers.Qwen2ForCausalLM, config, state)
    assert (fitted.num_attention_heads, fitted.num_key_value_heads, fitted.head_dim,
            fitted.hidden_size) == (2, 1, 8, 32)
    assert getattr(config, "head_dim", None) is None  # the folder's own config is untouched


# -- end to end through the CLI ------------------------------------------------------------------

CONFIG = """
[data]
source = "{text}"
{label}batch_size = 16
batches = 2

[pipeline]
passes = {passes}

[passes.snip]
batches = 2

[passes.mask]
sparsity = {sparsity}
{extra}"""

AUTO = {"bert": "AutoModelForSequenceClassification", "gpt2": "AutoModelForCausalLM",
        "llama": "AutoModelForCausalLM", "bert-base": "AutoModel"}


def write_config(tmp_path: Path, hf_folders, kind: str, *, passes='["snip", "mask", "fold"]',
                 sparsity=0.8, extra="") -> Path:
    path = tmp_path / f"{kind}.toml"
    label = 'label_field = "label"\n' if kind in ("bert", "bert-base") else ""
    path.write_text(CONFIG.format(text=hf_folders["text"], label=label, passes=passes,
                                  sparsity=sparsity, extra=extra))
    return path


def new_inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    """Another batch size and length than the data: both dimensions are dynamic."""
    ids = torch.randint(5, 40, (3, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def held_out_metric(model, folder: Path, kind: str) -> float:
    """The task metric of ``model`` on the held-out records 32..95 of text.jsonl, computed with
    transformers alone: accuracy from the logits, perplexity from the model's own loss."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in (folder.parent / "text.jsonl").read_text().splitlines()]
    held = records[32:96]
    batch = tokenizer([r["text"] for r in held], padding=True, return_tensors="pt")
    with torch.no_grad():
        if kind == "bert":
            predicted = model(**batch).logits.argmax(-1)
            return float((predicted == torch.tensor([r["label"] for r in held])).float().mean())
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return math.exp(float(model(**batch, labels=labels, use_cache=False).loss))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_prune_a_model_folder_and_load_it_back_with_transformers(hf_folders, tmp_path, capfd, kind):
    config, out = write_config(tmp_path, hf_folders, kind), tmp_path / "out"
    assert main(["transform", "--config", str(config), str(hf_folders[kind]), "-o", str(out)]) == 0
    shown = capfd.readouterr().out.replace("\n", " ")

    masks = load_file(out / "masks.safetensors")
    numel = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(0.2 * numel + 0.5)
    auto = getattr(transformers, AUTO[kind])
    pruned = auto.from_pretrained(out / "hf").eval()  # no chop involved
    assert type(pruned).__name__ == json.loads((hf_folders[kind] / "config.json").read_text()
                                               )["architectures"][0]
    state = pruned.state_dict()
    for name, mask in masks.items():
        assert torch.count_nonzero(state[name][~mask]) == 0, name
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**new_inputs(), use_cache=False).logits
                                   if kind != "bert" else pruned(**new_inputs()).logits,
                                   program(**new_inputs()).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert tokenizer("the cat was good")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        hf_folders[kind])("the cat was good")["input_ids"]

    report = json.loads((out / "report.json").read_text())
    metric = "accuracy" if kind == "bert" else "perplexity"
    entry = report["metrics"]
    assert (entry["metric"], entry["batches"], entry["samples"]) == (metric, 4, 64)
    original = auto.from_pretrained(hf_folders[kind]).eval()
    assert entry["before"][metric] == pytest.approx(
        held_out_metric(original, hf_folders[kind], kind), rel=1e-4)
    assert entry["after"][metric] == pytest.approx(
        held_out_metric(pruned, hf_folders[kind], kind), rel=1e-4)
    assert f"{metric} on 64 held-out samples:" in shown and "after (" in shown
    assert report["hf"] == {"written": True, "path": "hf", "architecture": type(pruned).__name__,
                            "tokenizer": True}
    assert report["checkpoint"]["kind"] == "folder"
    listed = json.loads((out / ".chop-manifest.json").read_text())["files"]
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(listed)


def test_shrink_updates_the_config_where_transformers_can_express_it(hf_folders, tmp_path, capfd):
    extra = 'granularity = "channel"\nscope = "local"\n'
    config = write_config(tmp_path, hf_folders, "llama", passes='["snip", "mask", "shrink"]',
                          sparsity=0.5, extra=extra)
    out = tmp_path / "out"
    assert main(["transform", "--config", str(config), str(hf_folders["llama"]), "-o",
                 str(out), "--quiet"]) == 0
    shrunk = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert (shrunk.config.num_attention_heads, shrunk.config.num_key_value_heads) == (2, 1)
    assert shrunk.config.intermediate_size == 32 and shrunk.config.head_dim == 8
    assert sum(p.numel() for p in shrunk.parameters()) == sum(
        t.numel() for t in load_file(out / "weights.safetensors").values())
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**new_inputs(), use_cache=False).logits,
                                   torch.export.load(out / "model.pt2").module()(
                                       **new_inputs()).logits)

    # BERT's pooler shrinks too, and its head size is fixed: not expressible, said in one line
    config = write_config(tmp_path, hf_folders, "bert", passes='["snip", "mask", "shrink"]',
                          sparsity=0.5, extra=extra)
    assert main(["transform", "--config", str(config), str(hf_folders["bert"]), "-o",
                 str(tmp_path / "bert")]) == 0
    out, err = capfd.readouterr()
    shown = " ".join((out + err).split())
    assert "hf/ not written: transformers' BertForSequenceClassification cannot express the " \
           "shrunk shapes" in shown
    assert shown.count("cannot express the shrunk shapes") == 1  # not a warning as well
    assert not (tmp_path / "bert" / "hf").exists()
    report = json.loads((tmp_path / "bert" / "report.json").read_text())
    assert report["hf"]["written"] is False and "model.pt2 is the shrunk model" in report["hf"]["reason"]


TRAIN = "\n[train]\nepochs = 2\nlr = 5e-3\nbatch_size = 16\n"


def test_train_a_model_folder_and_an_outdir_of_one(hf_folders, tmp_path, capfd):
    config = write_config(tmp_path, hf_folders, "bert", extra=TRAIN)
    out = tmp_path / "trained"
    assert main(["train", "--config", str(config), str(hf_folders["bert"]), "-o", str(out)]) == 0
    shown = capfd.readouterr().out
    history = json.loads((out / "report.json").read_text())["train"]["history"]
    assert [r["epoch"] for r in history] == [1, 2] and set(history[0]["eval"]) == {"accuracy", "loss"}
    assert f"epoch 2: loss {history[1]['loss']:.4f}, train accuracy" in shown
    assert f"eval accuracy {history[1]['eval']['accuracy']:.1%}" in shown
    trained = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(**new_inputs()).logits, torch.export.load(
            out / "model.pt2").module()(**new_inputs()).logits)

    config = write_config(tmp_path, hf_folders, "gpt2", extra=TRAIN)
    pruned, again = tmp_path / "pruned", tmp_path / "again"
    assert main(["transform", "--config", str(config), str(hf_folders["gpt2"]), "-o", str(pruned),
                 "--quiet"]) == 0
    assert main(["train", "--config", str(config), str(pruned), "-o", str(again)]) == 0
    assert "eval perplexity" in capfd.readouterr().out
    report = json.loads((again / "report.json").read_text())
    assert report["checkpoint"]["kind"] == "outdir"
    masks = load_file(pruned / "masks.safetensors")
    state = transformers.AutoModelForCausalLM.from_pretrained(again / "hf").state_dict()
    before = load_file(pruned / "weights.safetensors")
    for name, mask in masks.items():  # still pruned where masked, and trained where kept
        assert torch.count_nonzero(state[name][~mask]) == 0
        assert not torch.equal(state[name][mask], before[name][mask])


LOSS_PY = """
import torch.nn.functional as F

def first_token(outputs, targets):
    return F.cross_entropy(outputs.last_hidden_state[:, 0, :2], targets)
"""


def test_a_model_without_a_head_needs_a_loss_of_your_own(hf_folders, tmp_path, capfd):
    config = write_config(tmp_path, hf_folders, "bert-base")
    out = tmp_path / "out"
    assert main(["transform", "--config", str(config), str(hf_folders["bert-base"]), "-o",
                 str(out)]) == 2
    err = capfd.readouterr().err.replace("\n", " ")
    assert "BertModel has no task head chop knows a loss for" in err
    assert '[loss] source = "module:callable"' in err and not out.exists()

    (tmp_path / "losses.py").write_text(LOSS_PY)
    config.write_text(config.read_text() + '\n[loss]\nsource = "losses:first_token"\n')
    assert main(["transform", "--config", str(config), str(hf_folders["bert-base"]), "-o",
                 str(out), "--quiet"]) == 0
    entry = json.loads((out / "report.json").read_text())["metrics"]
    assert entry["metric"] == "loss" and set(entry["before"]) == {"loss"}
    # the user's loss on the held-out records, weighted by batch, computed with transformers
    original = transformers.AutoModel.from_pretrained(hf_folders["bert-base"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folders["bert-base"])
    records = [json.loads(line) for line in hf_folders["text"].read_text().splitlines()][32:96]
    batch = tokenizer([r["text"] for r in records], padding=True, return_tensors="pt")
    with torch.no_grad():
        first = original(**batch).last_hidden_state[:, 0, :2]
    expected = float(F.cross_entropy(first, torch.tensor([r["label"] for r in records])))
    assert entry["before"]["loss"] == pytest.approx(expected, rel=1e-4)


def test_only_local_folders_and_files(hf_folders, tmp_path, capfd):
    config = write_config(tmp_path, hf_folders, "gpt2")
    for name in ("gpt2", "bert-base-uncased", "meta-llama/Llama-3.2-1B"):
        assert main(["transform", "--config", str(config), name, "-o", str(tmp_path / "o")]) == 2
        err = capfd.readouterr().err.replace("\n", " ")
        assert f"{name} does not exist: it is not a local folder or file, and chop never " \
               "downloads models" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["transform", "--config", str(config), str(empty), "-o", str(tmp_path / "o")]) == 2
    assert "is a folder without config.json" in capfd.readouterr().err
    assert not (tmp_path / "o").exists()


def test_text_data_needs_a_model_folder(hf_folders, tmp_path, capfd):
    from chop.cli.models import LeNet300100

    torch.save(LeNet300100().state_dict(), tmp_path / "model.pt")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nsource = "lenet-300-100"\n\n[data]\nsource = "{hf_folders["text"]}"'
                      '\n\n[pipeline]\npasses = ["snip", "mask"]\n')
    assert main(["transform", "--config", str(config), str(tmp_path / "model.pt"), "-o",
                 str(tmp_path / "o")]) == 2
    assert "is a text file, which needs a tokenizer" in capfd.readouterr().err


def test_hf_keeps_the_folders_dtype_generation_config_and_processor(hf_folders, tmp_path):
    """A bfloat16 folder's hf/ was written in float32 (and failed its check, exit 3); its
    generation_config.json was replaced by defaults and preprocessor_config.json dropped. The
    model.pt2 of a Hugging Face model loads in a fresh chop (its ModelOutput registered)."""
    folder = tmp_path / "llama16"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folders["llama"]).to(
        torch.bfloat16)
    model.generation_config.max_new_tokens, model.generation_config.do_sample = 7, True
    model.generation_config.top_k = 5
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(hf_folders["llama"]).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"mine": 1}')
    (tmp_path / "secret.json").write_text('{"key": "the user\'s"}')
    (folder / "processor_config.json").symlink_to(tmp_path / "secret.json")  # out of the folder
    out = tmp_path / "out"
    config = write_config(tmp_path, hf_folders, "llama")
    assert main(["transform", "--config", str(config), str(folder), "-o", str(out), "--quiet"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert back.dtype == torch.bfloat16
    assert (back.generation_config.max_new_tokens, back.generation_config.top_k) == (7, 5)
    assert (out / "hf" / "preprocessor_config.json").read_text() == '{"mine": 1}'
    assert not (out / "hf" / "processor_config.json").exists()
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "chop.cli", "report", str(out / "model.pt2")],
                           capture_output=True, text=True, timeout=300)  # a fresh process
    assert shown.returncode == 0, shown.stderr


def test_a_tokenizer_that_is_not_the_models_is_refused(hf_folders):
    folder = hf.load_folder(hf_folders["bert"])
    folder.model.config.vocab_size = 10  # the tokenizer's ids go beyond it
    with pytest.raises(DataError, match=r"t\.jsonl: the folder's tokenizer gives token id \d+, "
                                        r"but the model has vocab_size 10"):
        encoded(folder, text_field="text")
