"""Benchmark structured pruning end to end: chop's ``snip, mask{granularity=channel}, shrink``
against Torch-Pruning's Taylor ``MetaPruner`` (constructor + one backward + ``step``), side by side.

Models (``--models``): ResNet-50 (built as torchvision builds it, see ``bench_shrink.py``;
``--batch`` images of 224×224) and BERT-base (``BertForSequenceClassification(BertConfig())``,
built from the config, nothing downloaded; ``--batch`` × ``--seq`` tokens); with torchvision
installed, any of its classifiers as ``torchvision:<name>`` (untrained, 224×224 images, the
last linear layer left alone by both). Both score the same batch. chop: ``chop.trace``
(reported separately), then
``chop.run(graph, "snip, mask{granularity=channel, sparsity=S}, shrink", data=...)``; the
stage times are the pass manager's (``graph.history``), so ``mask`` includes the channel
coupling analysis and ``shrink`` its check of the shrunk output against the masked one (two
eval forwards on 2 samples, printed apart as well: Torch-Pruning checks nothing).
Torch-Pruning (when ``torch_pruning`` is importable; "absent" otherwise): ``MetaPruner`` with
``TaylorImportance`` at ``pruning_ratio=S``, traced on the batch's first sample and the
classifier ignored, as in its examples (its backward takes the whole batch); BERT as
in its Hugging Face BERT example (``num_heads`` of every query/key/value, ``prune_head_dims``,
not ``prune_num_heads``; the pooler ignored; heads' sizes updated after the step).

The two do not remove the same amount: chop's ``sparsity`` is the share of the prunable layers'
*parameters* removed (one global budget), Torch-Pruning's ``pruning_ratio`` the share of each
layer's *channels*; parameters and FLOPs (``torch.utils.flop_counter``, per batch, eval mode)
before and after are printed for both.

Runs are interleaved: each repeat prunes a fresh copy with chop, then with Torch-Pruning (the
order alternates per repeat), each after a full ``gc.collect()`` so that neither pays for the
other's garbage; medians. (chop pauses Python's cyclic garbage collector while it traces and
while passes run; Torch-Pruning leaves it on.) ``chop ÷ TP`` compares chop's snip+mask+shrink with
Torch-Pruning's constructor+backward+step; ``incl. trace`` adds chop's trace.

``--round-to 8 16``: for each, chop's pipeline with ``mask{..., round_to=R}`` once more (not
timed against TP): its parameters, FLOPs, the latency of the shrunk model (interleaved with the
unrounded one, ``--latency-repeats``) and how far its output is from the unrounded shrunk
model's (max |Δ| ÷ max |y|, and top-1 agreement of the logits).

Usage: ``python benchmarks/bench_structured.py [--models resnet50 bert torchvision:NAME]
[--repeats 3] [--sparsity 0.5] [--batch 4] [--seq 128] [--round-to 8 16] [--profile resnet50]``
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least, check_bert_seq, sparsity_arg, unique  # noqa: E402
from bench_shrink import ResNet50  # noqa: E402

import chop  # noqa: E402
from chop.kernels.timing import interleaved_seconds  # noqa: E402


def resnet50(batch: int, seq: int) -> tuple[nn.Module, tuple, torch.Tensor, str]:
    """The model, its inputs, targets and its classifier's name."""
    model = ResNet50()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g)
    return model, (x,), torch.randint(0, 1000, (batch,), generator=g), "fc"


def bert(batch: int, seq: int) -> tuple[nn.Module, tuple, torch.Tensor, str]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    model = transformers.BertForSequenceClassification(transformers.BertConfig())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return model, (ids,), torch.randint(0, 2, (batch,), generator=g), "classifier"


def torchvision_model(name: str):
    """``torchvision:<name>``: that torchvision classifier, untrained (nothing downloaded), on
    224×224 images; its last linear layer (SqueezeNet: its last conv) is the classifier both
    leave alone."""

    def build(batch: int, seq: int) -> tuple[nn.Module, tuple, torch.Tensor, str]:
        import torchvision

        extra = {"aux_logits": False, "init_weights": False} if name in (
            "inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **extra)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 224, 224, generator=g)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        classifier = ([n for n, m in layers if isinstance(m, nn.Linear)] or [layers[-1][0]])[-1]
        return model, (x,), torch.randint(0, 1000, (batch,), generator=g), classifier

    return build


MODELS = {"resnet50": resnet50, "bert": bert}


def model_builder(parser: argparse.ArgumentParser, name: str):
    """The builder of ``--models`` entry ``name``; None (said why) when it cannot run here; a
    parser error when there is no such model."""
    if name == "bert":
        try:
            import transformers  # noqa: F401
        except ImportError:
            print(f"{name}: transformers absent, skipped (pip install 'chop[hf]')\n")
            return None
    if name in MODELS:
        return MODELS[name]
    if name.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError:
            print(f"{name}: torchvision absent, skipped\n")
            return None
        known = torchvision.models.list_models(module=torchvision.models)  # its classifiers
        if name.removeprefix("torchvision:").lower() not in known:
            parser.error(f"unknown model {name!r}; torchvision {torchvision.__version__} has no "
                         "such classifier (see torchvision.models.list_models(torchvision.models))")
        return torchvision_model(name.removeprefix("torchvision:"))
    parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)} or "
                 "torchvision:<name> (e.g. torchvision:mobilenet_v2)")


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


def flops(fn: Any, inputs: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_chop(model: nn.Module, inputs: tuple, targets: torch.Tensor, sparsity: float,
             round_to: int = 1) -> dict[str, Any]:
    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    graph = chop.trace(model, inputs)
    traced = time.perf_counter() - start
    options = f"granularity=channel, sparsity={sparsity}" + (f", round_to={round_to}" if round_to > 1 else "")
    chop.run(graph, f"snip, mask{{{options}}}, shrink", data=[(inputs, targets)])
    times = {"trace": traced, **{r.name: r.seconds for r in graph.history[-3:]}}
    return {"times": times, "check": graph.history[-1].info["total"]["check_s"], "graph": graph}


def run_tp(model: nn.Module, inputs: tuple, targets: torch.Tensor, sparsity: float,
           classifier: str) -> dict[str, Any]:
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    ignored = [model.get_submodule(classifier)]  # of this copy
    bert_attn = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
    if bert_attn:  # Torch-Pruning's examples/transformers/prune_hf_bert.py
        kwargs["num_heads"] = {lin: m.num_attention_heads for m in bert_attn
                               for lin in (m.query, m.key, m.value)}
        kwargs.update(prune_head_dims=True, prune_num_heads=False, head_pruning_ratio=sparsity,
                      output_transform=lambda out: logits(out).sum())
        ignored.append(model.bert.pooler)
    example = tuple(x[:1] for x in inputs)  # its examples trace one sample, not the batch
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.TaylorImportance(),
                                  pruning_ratio=sparsity, ignored_layers=ignored, **kwargs)
    built = time.perf_counter()
    model.zero_grad()
    F.cross_entropy(logits(model(*inputs)), targets).backward()
    backward = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter()
    for m in bert_attn:
        m.num_attention_heads = pruner.num_heads[m.query]
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features
    model.zero_grad(set_to_none=True)
    times = {"constructor": built - start, "backward": backward - built, "step": stepped - backward}
    return {"times": times, "model": model}


def have_tp() -> str | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return tp.__version__


def report(name: str, model: nn.Module, inputs: tuple, targets: torch.Tensor, classifier: str,
           args: argparse.Namespace) -> None:
    chop_times: list[dict[str, float]] = []
    tp_times: list[dict[str, float]] = []
    checks: list[float] = []  # seconds of shrink's output check (part of its time)
    last: dict[str, Any] = {}
    tp_failed = None  # Torch-Pruning's error on this model: chop's figures are still printed
    for r in range(args.repeats):
        order = ["chop", "tp"] if r % 2 == 0 else ["tp", "chop"]
        for who in order:
            gc.collect()  # neither pays for the garbage the other left
            if who == "chop":
                last["chop"] = run_chop(model, inputs, targets, args.sparsity)
                chop_times.append(last["chop"]["times"])
                checks.append(last["chop"]["check"])
            elif have_tp() and tp_failed is None:
                try:
                    last["tp"] = run_tp(model, inputs, targets, args.sparsity, classifier)
                except Exception as e:  # noqa: BLE001 - its own bug on this model, reported
                    tp_failed = f"{type(e).__name__}: {e}".strip()
                    continue
                tp_times.append(last["tp"]["times"])

    def med(samples: list[dict[str, float]], key: str) -> float:
        return statistics.median(s[key] for s in samples)

    chop_total = statistics.median(sum(v for k, v in s.items() if k != "trace") for s in chop_times)
    chop_all = statistics.median(sum(s.values()) for s in chop_times)
    stages = " + ".join(f"{k} {med(chop_times, k):.2f}" for k in chop_times[0] if k != "trace")
    print(f"### {name}\n")
    check = statistics.median(checks)
    samples = min(args.batch, 2)  # shrink checks the first two samples of the batch
    print(f"chop: trace {med(chop_times, 'trace'):.2f} s; {stages} = {chop_total:.2f} s "
          f"(incl. trace {chop_all:.2f} s; shrink's check of its output on {samples} "
          f"sample{'s' if samples > 1 else ''}: {check:.2f} s)")
    if tp_times:
        tp_total = statistics.median(sum(s.values()) for s in tp_times)
        tp_stages = " + ".join(f"{k} {med(tp_times, k):.2f}" for k in tp_times[0])
        print(f"Torch-Pruning: {tp_stages} = {tp_total:.2f} s")
        print(f"chop ÷ TP: {chop_total / tp_total:.2f} (incl. trace {chop_all / tp_total:.2f}; "
              f"without shrink's check, which Torch-Pruning does not do: "
              f"{(chop_total - check) / tp_total:.2f})")
    elif tp_failed:
        print(f"Torch-Pruning: failed on this model ({tp_failed[:200]}); chop alone")
    else:
        print("Torch-Pruning: absent")
    graph = last["chop"]["graph"]
    with torch.no_grad():
        dense_flops = flops(model.eval(), inputs)
        rows = [("dense", params(model), dense_flops)]
        with graph.mode(batch_norm=False, dropout=False):
            rows.append(("chop", params(graph.module), flops(graph.module, inputs)))
        broken = None  # Torch-Pruning's pruned model may not run (its own bug on this model)
        if "tp" in last:
            pruned = last["tp"]["model"].eval()
            try:
                rows.append(("Torch-Pruning", params(pruned), flops(pruned, inputs)))
            except Exception as e:  # noqa: BLE001 - reported below the table
                broken = f"{type(e).__name__}: {e}".strip()
    print("\n| model | parameters | ratio | FLOPs per batch | ratio |\n|---|---:|---:|---:|---:|")
    for label, p, f in rows:
        print(f"| {label} | {p:,} | {rows[0][1] / p:.2f}× | {f:,} | {dense_flops / f:.2f}× |")
    if broken:
        print(f"\nTorch-Pruning's pruned model does not run ({broken[:200]}); its row is left "
              "out")
    if args.round_to:
        rounded(graph, model, inputs, targets, args)
    print(f"\nload average: {load()}\n")


def rounded(base: chop.Graph, model: nn.Module, inputs: tuple, targets: torch.Tensor,
            args: argparse.Namespace) -> None:
    """``round_to`` variants next to the unrounded shrunk model: size, latency, deviation."""
    variants = {"round_to=1": base}
    for r in args.round_to:
        variants[f"round_to={r}"] = run_chop(model, inputs, targets, args.sparsity, r)["graph"]
    for g in variants.values():
        g.eval()
    times = interleaved_seconds({k: (lambda g=g: g(*inputs)) for k, g in variants.items()},
                                repeats=args.latency_repeats, warmup=1)
    with torch.no_grad():
        ref = logits(base(*inputs))
        print("\n| variant | parameters | FLOPs per batch | latency ms | speedup vs round_to=1 "
              "| max abs Δ ÷ max abs y | top-1 agree |\n|---|---:|---:|---:|---:|---:|---:|")
        for k, g in variants.items():
            y = logits(g(*inputs))
            dev = float((y - ref).abs().max() / ref.abs().max())
            agree = float((y.argmax(-1) == ref.argmax(-1)).float().mean())
            print(f"| {k} | {params(g.module):,} | {flops(g.module, inputs):,} | "
                  f"{times[k] * 1e3:.1f} | {times['round_to=1'] / times[k]:.2f}× | {dev:.3g} | "
                  f"{agree:.0%} |")


def profile(model: nn.Module, inputs: tuple, targets: torch.Tensor, args: argparse.Namespace) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_chop(model, inputs, targets, args.sparsity)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile_lines)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_lines)


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"from {', '.join(MODELS)}, or torchvision:<name> (needs torchvision)")
    parser.add_argument("--sparsity", type=sparsity_arg, default=0.5)
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--seq", type=at_least(1), default=128)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--round-to", type=at_least(1), nargs="*", default=[])
    parser.add_argument("--latency-repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--profile", default=None,
                        help="cProfile one chop run of this model instead of benchmarking")
    parser.add_argument("--profile-lines", type=at_least(1), default=40)
    args = parser.parse_args()
    args.models = unique(args.models)
    if "bert" in ([args.profile] if args.profile else args.models):
        check_bert_seq(parser, args.seq)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.profile:
        build = model_builder(parser, args.profile)
        if build is None:
            raise SystemExit(1)
        model, inputs, targets, _ = build(args.batch, args.seq)
        profile(model, inputs, targets, args)
        return
    # says why one is skipped; an unknown one is a parser error
    builds = [(name, model_builder(parser, name)) for name in args.models]
    if not any(build for _, build in builds):
        raise SystemExit(1)
    version = have_tp()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"Torch-Pruning {version or 'absent'}; sparsity {args.sparsity}; batch {args.batch}; "
          f"median of {args.repeats} interleaved repeats; load average {load()}\n")
    for name, build in builds:
        torch.manual_seed(0)  # the same weights whichever models run before
        if build is None:
            continue
        model, inputs, targets, classifier = build(args.batch, args.seq)
        report(name, model, inputs, targets, classifier, args)


if __name__ == "__main__":
    main()
