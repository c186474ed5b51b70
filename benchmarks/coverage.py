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
  scale in brackets;
- ``Torch-Pruning @50%`` (side by side, when ``torch_pruning`` is importable; "absent"
  otherwise; ``--no-torch-pruning`` drops it): on a deep copy of the eager model in eval mode,
  ``MetaPruner(model, inputs, MagnitudeImportance(p=2), pruning_ratio=0.5)`` with the example
  inputs as a dict of keyword arguments and the output layers ignored (the layers of the copy
  that the model's output reaches without passing another linear/conv/recurrent layer: the
  classifier, ``lm_head``, the last convs of a residual stream), attention as in Torch-Pruning's
  Hugging Face BERT example where the module names its query/key/value linears (``num_heads``
  of each, ``prune_head_dims=True``, ``prune_num_heads=False``, the module's head size
  attributes updated after the step; ``nn.MultiheadAttention`` given its ``num_heads``), then
  ``step()`` and a forward on the other batch: ``params A → B`` when that gives finite outputs
  of the unpruned output's shape (``wrong shape`` when only the trailing dimensions differ),
  ``crash`` when the constructor or the step raises, ``broken forward`` when the forward does,
  ``timeout`` past ``--tp-timeout`` seconds (constructor and step; ``signal.setitimer``).

A line under the table counts the models chop handles (``head`` and ``params @50%`` without
"fails") and those where Torch-Pruning gave a usable model. Models whose package (transformers,
torchvision) is absent are said once above the table and left out of both.

Usage::

    python benchmarks/coverage.py                      # HF families + hand-written blocks
    python benchmarks/coverage.py --models llama,t5    # a selection (--list shows the names)
    python benchmarks/coverage.py --torchvision        # add torchvision's models (slow)
    python benchmarks/coverage.py --no-torch-pruning   # without the Torch-Pruning column
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import signal
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from arguments import number_at_least, unique

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


HF = ("llama", "mistral", "qwen2", "phi3", "phi", "gpt2", "bert", "roberta", "distilbert", "t5",
      "bart", "whisper", "vit-hf", "swin-hf", "clip", "wav2vec2", "mamba")  # need transformers
MODELS: dict[str, Build] = {
    **{k: _hf(k) for k in HF},
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
NEEDS = {**dict.fromkeys(HF, "transformers"), **dict.fromkeys(TORCHVISION, "torchvision")}
INSTALL = {"transformers": " (pip install 'chop[hf]')"}  # torchvision: no extra of chop's


def absent(names: list[str], needs: dict[str, str]) -> tuple[list[str], list[str]]:
    """``names`` less those whose optional package (``needs[name]``) is not importable, and a
    line per such package: "<names>: <package> absent, skipped (how to install it)"."""
    missing = []
    for module in unique([needs[n] for n in names if n in needs]):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    lines = [f"{', '.join(n for n in names if needs.get(n) == m)}: {m} absent, skipped"
             f"{INSTALL.get(m, '')}" for m in missing]
    return [n for n in names if needs.get(n) not in missing], lines


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


def measure(name: str, build: Build, tp: str | float | None = None) -> dict[str, str]:
    """One row; ``tp``: Torch-Pruning's time limit in seconds, "absent", or None (no column)."""
    row = {"model": name}
    model, inputs = build()
    model.eval()
    if isinstance(tp, str):
        row[TP] = tp
    elif tp is not None:
        try:
            row[TP], usable = run_torch_pruning(model, inputs, tp)
        except Exception as e:  # noqa: BLE001 - e.g. the unpruned model's own forward
            row[TP], usable = f"crash: {_first_line(e)}", False
        row["_tp usable"] = "yes" if usable else ""
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


# -- Torch-Pruning, side by side -----------------------------------------------------------------

class _Timeout(BaseException):  # not an Exception: Torch-Pruning's own handlers do not swallow it
    pass


def _first_line(e: BaseException, width: int = 60) -> str:
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:width]


_STOPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d, nn.RNNBase)


def _output_layers(model: nn.Module, inputs: dict[str, Any]) -> list[str]:
    """Names of the layers whose output reaches the model's output without passing another
    linear/conv/recurrent layer (found on the autograd graph of one forward)."""
    made: dict[Any, str] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    made.setdefault(t.grad_fn, name)
        return record

    stops = [n for n, m in model.named_modules() if isinstance(m, _STOPS) or
             type(m).__name__ == "Conv1D"]  # transformers' GPT-2 projection
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in stops]
    try:
        with torch.enable_grad():
            out = _out(model(**inputs))
    finally:
        for h in handles:
            h.remove()
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in made:
            found.append(made[fn])
            continue
        todo.extend(f for f, _ in fn.next_functions)
    return sorted(set(found))


def _attention(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], list[int]]]:
    """(module, its query/key/value linears, their head counts) for the attention modules that
    name them, as Torch-Pruning's Hugging Face examples build ``num_heads``."""
    found = []
    for m in model.modules():
        config = getattr(m, "config", None)
        for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
                      ("q_lin", "k_lin", "v_lin")):
            lins = [getattr(m, n, None) for n in names]
            if not all(isinstance(lin, nn.Linear) for lin in lins):
                continue
            heads = next((getattr(m, a) for a in ("num_attention_heads", "num_heads", "n_heads")
                          if isinstance(getattr(m, a, None), int)), None)
            heads = heads or getattr(config, "num_attention_heads", None)
            kv = getattr(m, "num_key_value_heads", None) or getattr(config, "num_key_value_heads",
                                                                     None) or heads
            if heads:
                found.append((m, lins, [heads, kv, kv]))
    return found


def _tp_heads_after(pruner: Any, attention: list) -> None:
    """Update the head sizes the attention modules reshape with (Torch-Pruning's BERT example
    sets ``num_attention_heads``, ``attention_head_size`` and ``all_head_size``)."""
    for m, (q, _, _), _ in attention:
        heads = pruner.num_heads.get(q)
        if not heads:
            continue
        for a in ("num_attention_heads", "num_heads", "n_heads"):
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, heads)
        for a in ("attention_head_size", "head_dim", "key_value_proj_dim"):
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, q.out_features // heads)
        for a in ("all_head_size", "inner_dim"):
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, q.out_features)


def run_torch_pruning(model: nn.Module, inputs: Inputs, limit: float) -> tuple[str, bool]:
    """The Torch-Pruning cell, and whether it gave a usable model."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    example = inputs(2, 10)
    other = inputs(3, 13)
    try:
        with torch.no_grad():
            reference = _out(model(**other))
    except Exception:  # noqa: BLE001 - the model fixes its sequence length: keep it
        other = inputs(3, 10)
        with torch.no_grad():
            reference = _out(model(**other))
    before = sum(p.numel() for p in model.parameters())

    def expire(signum: int, frame: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)  # fires again each second if swallowed
    try:
        try:
            ignored = [model.get_submodule(n) for n in _output_layers(model, example)]
            kwargs: dict[str, Any] = {}
            attention = _attention(model)
            heads = {lin: h for _, lins, hs in attention for lin, h in zip(lins, hs)}
            heads.update({m: m.num_heads for m in model.modules()
                          if isinstance(m, nn.MultiheadAttention)})
            if heads:  # Torch-Pruning's examples/transformers/prune_hf_bert.py
                kwargs.update(num_heads=heads, prune_head_dims=True, prune_num_heads=False)
            pruner = tp.pruner.MetaPruner(model, example,
                                          importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=0.5, ignored_layers=ignored, **kwargs)
            pruner.step()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    except _Timeout:
        return "timeout", False
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        logging.getLogger("coverage").debug("torch-pruning\n%s", traceback.format_exc())
        return f"crash: {_first_line(e)}", False
    after = sum(p.numel() for p in model.parameters())
    try:
        _tp_heads_after(pruner, attention)
        with torch.no_grad():
            out = _out(model(**other))
    except Exception as e:  # noqa: BLE001
        logging.getLogger("coverage").debug("torch-pruning forward\n%s", traceback.format_exc())
        return f"broken forward: {_first_line(e)}", False
    if not isinstance(out, torch.Tensor):
        return f"broken forward: output is {type(out).__name__}", False
    if out.shape[:1] != reference.shape[:1] or out.dim() != reference.dim():
        return f"broken forward: output {tuple(out.shape)}, not {tuple(reference.shape)}", False
    if not torch.isfinite(out).all():
        return "broken forward: non-finite outputs", False
    if out.shape != reference.shape:
        return f"{before:,} → {after:,}, wrong shape {tuple(out.shape)}", False
    return f"{before:,} → {after:,}" + (" (nothing pruned)" if after == before else ""), True


TP = "Torch-Pruning @50%"
COLUMNS = ["model", "traced", "element", "channel unprunable", "head", "2:4", "params @50%",
           "max diff shrunk vs masked", "seconds", TP]


def _chop_handles(row: dict[str, str]) -> bool:
    return all(k in row and not row[k].startswith("fails") for k in ("head", "params @50%"))


def _unchanged(cell: str) -> bool:
    """``A → A``: the cell reports no parameter removed."""
    counts = cell.split(" (")[0].split(" → ")
    return len(counts) == 2 and counts[0] == counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: all but torchvision)")
    parser.add_argument("--torchvision", action="store_true", help="add torchvision's models")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    parser.add_argument("--no-torch-pruning", action="store_true",
                        help="leave out the Torch-Pruning column")
    parser.add_argument("--tp-timeout", type=number_at_least(0, inclusive=False),
                        default=120.0,
                        help="seconds for Torch-Pruning's constructor and step per model")
    args = parser.parse_args()
    models = dict(MODELS)
    if args.torchvision or (args.models and any(m in TORCHVISION for m in args.models.split(","))):
        models.update({k: _torchvision(k, size) for k, size in TORCHVISION.items()})
    if args.list:
        print("\n".join(models))
        return
    names = unique(args.models.split(",")) if args.models else [
        k for k in models if args.torchvision or k not in TORCHVISION]
    for name in names:
        if name not in models:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)} or "
                         f"torchvision's {', '.join(TORCHVISION)} (--list shows the names)")
    warnings.filterwarnings("ignore")
    for name in ("chop", "torch", "torch._dynamo", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    names, skipped = absent(names, NEEDS)  # left out of the table and of the count
    if not names:
        raise SystemExit("\n".join(skipped))
    for line in skipped:
        print(line + "\n")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tp: str | float | None = None
    if not args.no_torch_pruning:
        try:
            import torch_pruning  # noqa: F401
            tp = args.tp_timeout
        except ImportError:
            tp = "absent"
    columns = [c for c in COLUMNS if c != TP or tp is not None]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    for name in names:
        try:
            row = measure(name, models[name], tp)
        except Exception as e:  # noqa: BLE001 - building the model failed
            row = {"model": name, "traced": f"not built: {str(e).splitlines()[0][:60]}"}
            if tp is not None:
                row[TP] = "absent" if isinstance(tp, str) else ""
        rows.append(row)
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |", flush=True)
    handled = [r for r in rows if _chop_handles(r)]
    same = sum(_unchanged(r["params @50%"]) for r in handled)
    summary = (f"chop handles {len(handled)}/{len(rows)} models"
               + (f" ({same} with nothing pruned at 50%)" if same else ""))
    if isinstance(tp, str):
        summary += "; Torch-Pruning absent"
    elif tp is not None:
        usable = [r for r in rows if r.get("_tp usable")]
        same = sum(_unchanged(r[TP]) for r in usable)
        summary += (f"; Torch-Pruning gave a usable model for {len(usable)}/{len(rows)}"
                    + (f" ({same} with nothing pruned)" if same else ""))
    rule = 'chop: head and params @50% without "fails"'
    if isinstance(tp, float):
        rule += "; Torch-Pruning: its pruned model runs with finite outputs of the unpruned shape"
    print(f"\n{summary} ({rule})")


if __name__ == "__main__":
    main()
