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


# -- structured pruning: heads (with rotary, GQA, fused projections, relative biases) and MLPs -----


SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, use_cache=False, pad_token_id=0,
             bos_token_id=0, eos_token_id=0)


def ids(batch, seq, seed=0):
    return torch.randint(0, 120, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decoder(build):
    def inputs(batch, seq):
        x = ids(batch, seq)
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}
    return build, inputs


def family(name):
    """(model, inputs(batch, seq), parameters one removed unit of a group takes away): each cost
    written from the architecture (hidden 32, head_dim 8, 2 KV heads of 2 query heads, MLP 64)."""
    torch.manual_seed(0)
    kv_group = 2 * 8 * 32 + 8 * 32 + 8 * 32 + 32 * 2 * 8  # q rows of 2 heads, k, v rows, o columns
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        return (*decoder(model), lambda g: kv_group if g.kind == "head" else 3 * 32)
    if name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **SMALL))
        return (*decoder(model), lambda g: kv_group + 16 + 8 + 8 if g.kind == "head" else 3 * 32)
    if name in ("qwen3", "gemma3"):  # q_norm/k_norm: an RMSNorm of each head's vector
        build, config = {"qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
                         "gemma3": (transformers.Gemma3ForCausalLM,
                                    transformers.Gemma3TextConfig)}[name]
        model = build(config(num_key_value_heads=2, head_dim=8, **SMALL))
        return (*decoder(model), lambda g: kv_group if g.kind == "head" else 3 * 32)
    if name == "phi3":  # fused qkv_proj (sliced) and gate_up_proj (chunked)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, **SMALL))
        return (*decoder(model), lambda g: kv_group if g.kind == "head" else 3 * 32)
    if name == "falcon":  # x @ wᵀ linear layers, a fused query_key_value, no biases
        config = transformers.FalconConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, new_decoder_architecture=True, use_cache=False)
        return (*decoder(transformers.FalconForCausalLM(config)), lambda g: 2 * 32)
    if name == "t5":
        config = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, use_cache=False, decoder_start_token_id=0)

        def inputs(batch, seq):
            return {"input_ids": ids(batch, seq), "decoder_input_ids": ids(batch, seq - 3, 1)}

        def cost(g):  # self-attention heads share one relative bias table across the 2 layers
            head = 3 * 8 * 32 + 32 * 8
            if any("relative_attention_bias" in n for n in g.layers()):
                return 2 * head + 32  # both layers, and the table's column (32 buckets)
            return head if g.kind == "head" else 2 * 32
        return transformers.T5ForConditionalGeneration(config), inputs, cost
    if name == "whisper":
        config = transformers.WhisperConfig(
            vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
            use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            decoder_start_token_id=0)

        def inputs(batch, seq):
            g = torch.Generator().manual_seed(batch)
            return {"input_features": torch.randn(batch, 8, 32, generator=g),
                    "decoder_input_ids": ids(batch, seq)}

        def cost(g):  # k_proj has no bias; conv1's channels are read by conv2 (kernel 3)
            if g.kind == "head":
                return (8 * 32 + 8) + 8 * 32 + (8 * 32 + 8) + 32 * 8
            return 8 * 3 + 1 + 32 * 3 if "model.encoder.conv1.weight" in g.layers() else 32 + 1 + 32
        return transformers.WhisperForConditionalGeneration(config), inputs, cost
    if name == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, num_labels=3)

        def inputs(batch, seq):
            return {"pixel_values": torch.randn(batch, 3, 16, 16,
                                                generator=torch.Generator().manual_seed(batch))}
        return (transformers.ViTForImageClassification(config), inputs,
                lambda g: 3 * (8 * 32 + 8) + 32 * 8 if g.kind == "head" else 32 + 1 + 32)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma3", "phi3", "falcon", "t5",
                                  "whisper", "vit"])
def test_channel_pruning_shrinks_exactly_with_parameter_counts_from_the_architecture(name):
    from chop.passes.analysis.channel_groups import stored_channel_groups

    model, inputs, cost = family(name)
    graph = chop.trace(model.eval(), (), inputs(2, 10))
    graph.eval()
    chop.run(graph, "random{seed=0}, mask{granularity=channel, sparsity=0.5}")
    info = graph.history[-1].info
    for layer, why in info["unprunable"].items():  # only vocabulary/class rows, or a normalised
        if name == "falcon" and "indexes after a full slice" in why:  # stream; Falcon's
            assert "self_attention" in layer, layer  # fused qkv, split by indexing its heads
            continue
        assert "model output" in why or "normalises over these channels" in why, why
    masks = {n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes() if "mask" in n.meta["chop"]}
    removed = 0
    for group in stored_channel_groups(graph):
        out = next((m for m in group.members if m.role == "out" and m.name in masks), None)
        if out is not None:
            gone = sum(not masks[out.name].index_select(out.dim, i).any() for i in out.index)
            assert gone < group.size  # never a whole group
            removed += gone * cost(group)
    assert removed > 0 and info["removed"]["params"] >= info["removed"]["of"] // 2
    other = inputs(3, 14)  # another batch and sequence length
    with torch.no_grad():
        expected = graph(**other)
    dense = sum(p.numel() for p in model.parameters())
    chop.run(graph, "shrink")
    assert sum(p.numel() for p in graph.module.parameters()) == dense - removed
    with torch.no_grad():
        got = graph(**other)
    key = "logits"
    torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=1e-4, atol=1e-5)


def test_falcon_loses_heads_where_transformers_splits_its_fused_projection_by_views():
    """transformers 5.25's Falcon views its fused query_key_value per key/value group (before,
    it indexed the heads out: no head could go, and the error says why)."""
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip("Falcon splits its fused query_key_value by indexing before transformers 5.25")
    model, inputs, _ = family("falcon")
    graph = chop.trace(model.eval(), (), inputs(2, 10))
    graph.eval()
    chop.run(graph, "random{seed=1}, mask{granularity=head, sparsity=0.5}")
    other = inputs(3, 14)
    with torch.no_grad():
        expected = graph(**other).logits
    dense = sum(p.numel() for p in graph.module.parameters())
    chop.run(graph, "shrink")
    layers = [f"transformer.h.{i}.self_attention" for i in range(2)]
    # each layer keeps one of its two key/value groups (the floor): its 2 query heads, 1 key
    # and 1 value head of 8 rows of query_key_value (64 -> 32 rows), 2 heads' columns of dense
    assert [tuple(graph.parameter(f"{a}.query_key_value.weight").shape) for a in layers] == [
        (32, 32), (32, 32)]
    assert [tuple(graph.parameter(f"{a}.dense.weight").shape) for a in layers] == [
        (32, 16), (32, 16)]
    assert sum(p.numel() for p in graph.module.parameters()) == dense - 2 * (32 * 32 + 32 * 16)
    with torch.no_grad():
        torch.testing.assert_close(graph(**other).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_head_granularity_prunes_gqa_groups(name):
    """Qwen3 also normalises each head's q and k (q_norm/k_norm): a whole head still goes."""
    model, inputs, _ = family(name)
    graph = chop.trace(model.eval(), (), inputs(2, 10))
    graph.eval()
    chop.run(graph, "random{seed=1}, mask{granularity=head, sparsity=0.5}")
    info = graph.history[-1].info
    assert set(info["kept"]) == {f"model.layers.{i}.self_attn.{p}_proj.weight"
                                 for i in range(2) for p in "qkvo"}
    other = inputs(3, 14)
    with torch.no_grad():
        expected = graph(**other).logits
    chop.run(graph, "shrink")
    shapes = [tuple(graph.parameter(f"model.layers.{i}.self_attn.k_proj.weight").shape) for i in range(2)]
    assert shapes == [(8, 32), (8, 32)]  # one of the two kv heads left in each layer (the floor)
    with torch.no_grad():
        torch.testing.assert_close(graph(**other).logits, expected, rtol=1e-4, atol=1e-5)
