"""Coverage: how much of each model chop can prune, by element, channel, head and 2:4, and
whether the shrunk model still computes what the masked one did.

Models: Hugging Face families built from small configs (nothing is downloaded), the CNN and
attention blocks written by hand in ``tests/helpers/zoo.py`` (MobileNetV3/EfficientNet blocks with
in-place activations, squeeze-excitation and stochastic depth, ConvNeXt, a torchvision-style
ViT with ``nn.MultiheadAttention`` and a class token, Swin's window attention with a relative
position bias, LSTM/GRU), and torchvision's models (``weights=None``) when torchvision is
importable (``--torchvision``).

Per model, with random saliency (seeded) and every pass at its defaults:

- ``traced``: the mode chop exported it in (``eval`` when the train-mode graph has stochastic
  depth or does not export), or why it did not trace;
- ``element``: ``mask{sparsity=0.5}, fold`` ran and fold reproduced the masked outputs (exactly,
  or how far off relative to the output's scale: a linear layer may take another kernel path
  once its weight is a parameter again);
- ``channel unprunable``: the share of the output channels of conv/linear layers that
  ``channel-groups`` refuses to remove, not counting channels that feed the model's outputs or
  a LayerNorm/RMSNorm-normalised stream (the raw share in brackets), and the first other reason;
- ``head``: heads found, and ``mask{granularity=head, sparsity=0.3}, shrink`` equal to the
  masked model (``n/a``: no heads);
- ``2:4``: layers pruned 2:4 of the layers selected (the rest do not have a multiple of 4
  inputs);
- ``params @50%``: parameters before → after ``mask{granularity=channel, sparsity=0.5},
  shrink`` (sparsity is the share of the selected layers' parameters);
- ``max diff shrunk vs masked``: the largest absolute difference in eval mode, on another
  batch size (and sequence length where the model takes tokens), relative to the output's
  scale in brackets.

Usage::

    python benchmarks/coverage.py                      # HF families + hand-written blocks
    python benchmarks/coverage.py --models llama,t5    # a selection (--list shows the names)
    python benchmarks/coverage.py --torchvision        # add torchvision's models (slow)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chop
from chop.passes.analysis.channel_groups import channel_groups

sys.path.append(str(ROOT / "tests" / "helpers"))
import zoo

Inputs = Callable[[int, int], dict[str, Any]]  # (batch, sequence) -> forward kwargs
Build = Callable[[], tuple[nn.Module, Inputs]]


# -- the models ----------------------------------------------------------------------------------

def _tokens(vocab: int = 120) -> Inputs:
    def make(batch: int, seq: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(batch * 100 + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return make


def _seq2seq(batch: int, seq: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return {"input_ids": torch.randint(0, 120, (batch, seq), generator=g),
            "decoder_input_ids": torch.randint(0, 120, (batch, max(seq // 2, 2)), generator=g)}


def _pixels(size: int, channels: int = 3) -> Inputs:
    def make(batch: int, seq: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(batch)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}
    return make


def _hf(kind: str) -> Build:
    def build() -> tuple[nn.Module, Inputs]:
        import transformers as T

        small = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
        decoder = dict(small, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        if kind in ("llama", "mistral", "qwen2"):
            cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                   "mistral": (T.MistralConfig, T.MistralForCausalLM),
                   "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[kind]
            return cls[1](cls[0](num_key_value_heads=2, **decoder)), _tokens()
        if kind == "phi3":
            return T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, **decoder)), _tokens()
        if kind == "phi":
            return T.PhiForCausalLM(T.PhiConfig(partial_rotary_factor=0.5, **decoder)), _tokens()
        if kind == "gpt2":
            return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4,
                                                  n_positions=64, use_cache=False,
                                                  bos_token_id=0, eos_token_id=0)), _tokens()
        if kind in ("bert", "roberta"):
            cls = {"bert": (T.BertConfig, T.BertForSequenceClassification),
                   "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification)}[kind]
            return cls[1](cls[0](num_labels=3, pad_token_id=1, **small)), _tokens()
        if kind == "distilbert":
            config = T.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=64, max_position_embeddings=64, num_labels=3)
            return T.DistilBertForSequenceClassification(config), _tokens()
        if kind == "t5":
            config = T.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, use_cache=False, decoder_start_token_id=0)
            return T.T5ForConditionalGeneration(config), _seq2seq
        if kind == "bart":
            config = T.BartConfig(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=64, use_cache=False)
            return T.BartForConditionalGeneration(config), _seq2seq
        if kind == "whisper":
            config = T.WhisperConfig(vocab_size=120, d_model=32, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                     max_target_positions=32, use_cache=False, pad_token_id=0,
                                     bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)

            def audio(batch: int, seq: int) -> dict[str, Any]:
                g = torch.Generator().manual_seed(batch)
                return {"input_features": torch.randn(batch, 8, 32, generator=g),
                        "decoder_input_ids": torch.randint(0, 120, (batch, max(seq // 2, 2)),
                                                           generator=g)}
            return T.WhisperForConditionalGeneration(config), audio
        if kind == "vit-hf":
            config = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
            return T.ViTForImageClassification(config), _pixels(16)
        if kind == "swin-hf":
            config = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                  num_heads=[2, 4], window_size=4, num_labels=3)
            return T.SwinForImageClassification(config), _pixels(32)
        if kind == "clip":
            config = T.CLIPConfig(
                text_config=dict(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=64),
                vision_config=dict(image_size=16, patch_size=4, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64), projection_dim=16)

            def both(batch: int, seq: int) -> dict[str, Any]:
                return {**_tokens()(batch, seq), **_pixels(16)(batch, seq)}
            return T.CLIPModel(config), both
        if kind == "wav2vec2":
            config = T.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)

            def wave(batch: int, seq: int) -> dict[str, Any]:
                g = torch.Generator().manual_seed(batch)
                return {"input_values": torch.randn(batch, 400, generator=g)}
            return T.Wav2Vec2ForCTC(config), wave
        if kind == "mamba":
            config = T.MambaConfig(vocab_size=120, hidden_size=32, state_size=8,
                                   num_hidden_layers=2, use_cache=False)

            def ids(batch: int, seq: int) -> dict[str, Any]:
                return {"input_ids": _tokens()(batch, seq)["input_ids"]}
            return T.MambaForCausalLM(config), ids
        raise KeyError(kind)
    return build


def _zoo(name: str) -> Build:
    def build() -> tuple[nn.Module, Inputs]:
        torch.manual_seed(0)
        entry = zoo.ZOO[name]
        return entry.build(), lambda batch, seq: {"x": entry.inputs(batch)[0][0]}
    return build


def _recurrent() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    return zoo.Recurrent(), lambda batch, seq: {"input_ids": _tokens()(batch, 7)["input_ids"]}


def _torchvision(name: str, size: int) -> Build:
    def build() -> tuple[nn.Module, Inputs]:
        import torchvision

        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        return model, lambda batch, seq: {"x": torch.randn(batch, 3, size, size,
                                                           generator=torch.Generator().manual_seed(batch))}
    return build


MODELS: dict[str, Build] = {
    **{k: _hf(k) for k in ("llama", "mistral", "qwen2", "phi3", "phi", "gpt2", "bert", "roberta",
                           "distilbert", "t5", "bart", "whisper", "vit-hf", "swin-hf", "clip",
                           "wav2vec2", "mamba")},
    **{f"{k} (block)": _zoo(k) for k in ("vgg", "resnet", "mobilenet", "inception", "mobilenetv3",
                                         "efficientnet", "convnext", "vit", "swin")},
    "lstm+gru (block)": _recurrent,
}
TORCHVISION = {
    "resnet50": 64, "wide_resnet50_2": 64, "densenet121": 64, "inception_v3": 96, "vgg11_bn": 64,
    "efficientnet_b0": 64, "efficientnet_v2_s": 64, "mobilenet_v3_small": 64,
    "mnasnet0_5": 64, "regnet_x_400mf": 64, "regnet_y_400mf": 64, "shufflenet_v2_x0_5": 64,
    "squeezenet1_0": 64, "googlenet": 64, "convnext_tiny": 64, "vit_b_16": 224, "swin_t": 224,
    "maxvit_t": 224,
}


# -- the measurements ----------------------------------------------------------------------------

def _out(result: Any) -> torch.Tensor:
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if hasattr(result, key) and getattr(result, key) is not None:
            return getattr(result, key)
    return result[0] if isinstance(result, (tuple, list)) else result


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()), float(b.abs().max())


def _run(graph: chop.Graph, inputs: dict[str, Any]) -> torch.Tensor:
    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        return _out(graph(**inputs))


def _unprunable(graph: chop.Graph) -> tuple[float, float, str]:
    """(share excluding outputs and normalised streams, raw share, first other reason)."""
    weights = {n.target for n in graph.weight_nodes()
               if n.meta["chop"].get("role") in ("linear", "conv")}
    total = blocked = counted = counted_blocked = 0
    other: dict[str, int] = {}
    for group in channel_groups(graph):
        for m in group.members:
            if m.role != "out" or m.name not in weights:
                continue
            for u, why in enumerate(group.blocked):
                rows = len(m.index[u])
                total += rows
                blocked += rows if why else 0
                excluded = why is not None and ("model output" in why or "normalis" in why)
                if not excluded:
                    counted += rows
                    if why:
                        counted_blocked += rows
                        key = why.split(": ", 1)[-1][:70]
                        other[key] = other.get(key, 0) + rows
    top = max(other, key=other.get) if other else ""
    return (100 * counted_blocked / max(counted, 1), 100 * blocked / max(total, 1), top)


def measure(name: str, build: Build) -> dict[str, str]:
    row = {"model": name}
    model, inputs = build()
    model.eval()
    start = time.perf_counter()
    try:
        graph = chop.trace(model, (), inputs(2, 10))
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        row["traced"] = f"no: {str(e).splitlines()[0][:60]}"
        return row
    row["traced"] = "train" if graph.traced_training else "eval"
    graph.eval()
    other = inputs(3, 13)
    try:
        _run(graph, other)
    except Exception:  # noqa: BLE001 - the model fixes its sequence length: keep it
        other = inputs(3, 10)

    def attempt(key: str, fn: Callable[[], str]) -> None:
        try:
            row[key] = fn()
        except Exception as e:  # noqa: BLE001
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            row[key] = f"fails: {text[:70]}"
            logging.getLogger("coverage").debug("%s %s\n%s", name, key, traceback.format_exc())

    def element() -> str:
        g = graph.copy()
        chop.run(g, "random{seed=0}, mask{sparsity=0.5}")
        before = _run(g, other)
        chop.run(g, "fold")
        err, scale = _diff(_run(g, other), before)
        return "exact" if err == 0 else f"fold off by {err / max(scale, 1e-12):.0e} (relative)"

    def channel() -> str:
        share, raw, why = _unprunable(graph)
        return f"{share:.0f}% ({raw:.0f}% raw)" + (f" {why}" if why and share > 0 else "")

    def shrunk(granularity: str, sparsity: float) -> tuple[int, int, float, float, dict]:
        g = graph.copy()
        chop.run(g, f"random{{seed=0}}, mask{{granularity={granularity}, sparsity={sparsity}}}")
        info = g.history[-1].info
        masked = _run(g, other)
        before = sum(p.numel() for p in g.module.parameters())
        chop.run(g, "shrink")
        after = sum(p.numel() for p in g.module.parameters())
        return (before, after, *_diff(_run(g, other), masked), info)

    def head() -> str:
        heads = sum(g.size for g in channel_groups(graph) if g.kind == "head")
        if not heads:
            return "n/a"
        before, after, err, scale, _ = shrunk("head", 0.3)
        return f"{heads} heads, {before}→{after}, off {err:.0e}"

    def two_four() -> str:
        g = graph.copy()
        chop.run(g, "random{seed=0}, mask{granularity='2:4'}")
        info = g.history[-1].info
        return f"{len(info['kept'])}/{len(info['kept']) + len(info['unprunable'])} layers"

    def fifty() -> str:
        before, after, err, scale, _ = shrunk("channel", 0.5)
        row["max diff shrunk vs masked"] = f"{err:.1e} ({err / max(scale, 1e-12):.0e})"
        return f"{before:,} → {after:,}"

    attempt("element", element)
    attempt("channel unprunable", channel)
    attempt("head", head)
    attempt("2:4", two_four)
    attempt("params @50%", fifty)
    row["seconds"] = f"{time.perf_counter() - start:.0f}"
    return row


COLUMNS = ["model", "traced", "element", "channel unprunable", "head", "2:4", "params @50%",
           "max diff shrunk vs masked", "seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: all but torchvision)")
    parser.add_argument("--torchvision", action="store_true", help="add torchvision's models")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    args = parser.parse_args()
    models = dict(MODELS)
    if args.torchvision or (args.models and any(m in TORCHVISION for m in args.models.split(","))):
        models.update({k: _torchvision(k, size) for k, size in TORCHVISION.items()})
    if args.list:
        print("\n".join(models))
        return
    names = args.models.split(",") if args.models else [
        k for k in models if args.torchvision or k not in TORCHVISION]
    warnings.filterwarnings("ignore")
    for name in ("chop", "torch", "torch._dynamo", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for name in names:
        try:
            row = measure(name, models[name])
        except Exception as e:  # noqa: BLE001 - building the model failed
            row = {"model": name, "traced": f"not built: {str(e).splitlines()[0][:60]}"}
        print("| " + " | ".join(row.get(c, "") for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
