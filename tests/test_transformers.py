"""BERT and GPT-2 built from small configs: trace, snip, mask, fold and run (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

import chop

transformers = pytest.importorskip("transformers")


def bert():
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def token_batches(labels: int | None, batch: int = 4, seq: int = 12, count: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 120, (batch, seq), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        targets = torch.randint(0, labels, (batch,), generator=g) if labels else ids
        out.append((inputs, targets))
    return out


@pytest.mark.parametrize(("build", "labels"), [(bert, 3), (gpt2, None)], ids=["bert", "gpt2"])
def test_transformer_traces_prunes_folds_and_runs(build, labels):
    model = build()
    batches = token_batches(labels)
    graph = chop.trace(model, (), kwargs=batches[0][0])
    eager = copy.deepcopy(model).eval()
    graph.eval()
    other = {"input_ids": torch.randint(0, 120, (7, 20)), "attention_mask": torch.ones(7, 20, dtype=torch.long)}
    torch.testing.assert_close(graph(**other).logits, eager(**other).logits)  # new batch and length

    chop.run(graph, "snip{batches=2}, mask{sparsity=0.8}", data=batches)
    masks = {n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes() if "mask" in n.meta["chop"]}
    roles = {n.target: n.meta["chop"]["role"] for n in graph.weight_nodes()}
    assert masks and all(roles[name] == "linear" for name in masks)  # no embeddings/norms/biases
    assert not any("wte" in name or "embeddings" in name or "lm_head" in name for name in masks)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(0.2 * total + 0.5)

    with torch.no_grad():
        for name, mask in masks.items():
            eager.get_parameter(name).mul_(mask)
    masked = graph(**other).logits
    torch.testing.assert_close(masked, eager(**other).logits)
    chop.run(graph, "fold")
    torch.testing.assert_close(graph(**other).logits, masked, rtol=0, atol=0)


def test_gpt2_conv1d_weights_are_linear_and_the_tied_head_is_an_embedding():
    graph = chop.trace(gpt2(), (), kwargs=token_batches(None)[0][0])
    roles = {n.target: (n.meta["chop"]["role"], n.meta["chop"]["op"]) for n in graph.weight_nodes()}
    assert roles["transformer.h.0.attn.c_attn.weight"] == ("linear", "addmm")
    assert roles["transformer.wte.weight"] == ("embedding", "embedding")  # tied with lm_head
    assert "lm_head.weight" not in roles  # one node for the shared parameter
    node = graph.weight_node("transformer.wte.weight")
    assert sorted(str(u.target) for u in node.users) == ["aten.embedding.default", "aten.linear.default"]


def test_bert_train_mode_uses_dropout_and_eval_disables_it():
    model = bert()
    inputs = token_batches(3)[0][0]
    graph = chop.trace(model, (), kwargs=inputs)
    torch.manual_seed(1)
    a = graph(**inputs).logits
    b = graph(**inputs).logits
    assert not torch.equal(a, b)  # dropout (incl. attention dropout) is active in train mode
    graph.eval()
    torch.testing.assert_close(graph(**inputs).logits, graph(**inputs).logits, rtol=0, atol=0)
