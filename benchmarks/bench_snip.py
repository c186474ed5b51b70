"""How much does the ``snip`` pass cost next to one plain forward+backward of the model?

For each model this script times, on the same batch:

- **eager**: one forward+backward of the original ``nn.Module`` in eval mode (BatchNorm on its
  running stats, dropout off: the mode SNIP scores in), cross-entropy loss, ``loss.backward()``,
  with grads set to None before each run;
- **snip**: ``chop.run(graph, "snip", data=[(inputs, targets)])`` on the graph ``chop.trace``
  captured from that model once, untimed, in train mode as a fresh model is (so the pass's own
  switch to eval mode and back is part of its cost);
- **graph**: the same graph's forward, loss and ``torch.autograd.grad`` alone, in the mode snip
  scores in and without torch.export's input check (which snip skips too), without the pass
  around it: what running the exported ATen graph costs next to the
  module, apart from the pass machinery.

After two warm-up rounds, the three are run in rotating order so that a shared machine's noise
falls on all, and the medians are compared against the target snip / eager <= 1.15 (BERT-base
size) or <= 1.3 (the coverage table's small models at batch 2). The script asserts that scoring left every parameter, buffer and
``requires_grad`` flag bit-identical, ``.grad`` unset and the graph back in train mode.

Run it from the repository root::

    python benchmarks/bench_snip.py                      # BERT-base and a ResNet-18-style CNN
    python benchmarks/bench_snip.py --models bert --batch 8 --seq 128 --repeats 9 --verbose

The defaults (BERT 8x64, CNN batch 64) take about 1-2 s per eager step on 2 idle CPU cores. When
other processes share the cores, torch's OpenMP threads stall and single runs vary by 3-10x:
raise --repeats, read --verbose (every run, the median of the per-pair ratios, the ratio of the
fastest runs), or measure CPU time of one thread (--threads 1 --clock cpu), which other processes
barely disturb. The small models' single calls (~2 ms) vary by ±20% between runs however they
are timed; ``--sample-ms 20`` times each sample over as many calls as fill ~20 ms of eager steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least, check_bert_seq, number_at_least, unique  # noqa: E402

import chop  # noqa: E402
from chop.pipeline.batches import call, cross_entropy, logits_of  # noqa: E402

TARGET = 1.15  # BERT-base-size models
SMALL_TARGET = 1.3  # every model of the structured-coverage table, at batch 2
WARMUP = 2  # untimed rounds: the second snip still touches fresh memory (the old scores are alive)


class Block(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or strided 1x1 conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.short = nn.Sequential(conv, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool): 11.2M parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU())
        widths = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
                  (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
        self.blocks = nn.Sequential(*(Block(*w) for w in widths))
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def bert_case(batch: int, seq: int):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig())  # BERT-base: 768 wide, 12 layers, 12 heads
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq * 3 // 4 :] = 0  # pad some rows, so the attention mask matters
    return model, {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (batch,)), \
        cross_entropy


def cnn_case(batch: int):
    return ResNet18(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)), cross_entropy


def table_case(name: str):
    """A model of benchmarks/coverage.py's table at batch 2, with class targets for its logits
    and the loss both runs use: the default cross-entropy, or for a contrastive model (CLIP,
    whose output has no ``logits``) cross-entropy of its image-to-text similarities."""
    import coverage

    model, make = coverage.MODELS[name]()
    inputs = make(2, 10)
    with torch.no_grad():
        out = call(model.eval(), inputs)
    loss = contrastive if hasattr(out, "logits_per_image") else cross_entropy
    logits = out.logits_per_image if loss is contrastive else logits_of(out)
    model.train()
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
    return model, inputs, targets, loss


def contrastive(outputs, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.logits_per_image, targets)


def eager_step(model: nn.Module, inputs, targets: torch.Tensor, loss=cross_entropy) -> None:
    loss(call(model, inputs), targets).backward()  # the loss snip is given (or its default)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    state = model.state_dict(keep_vars=True)
    return {k: (v.detach().clone(), v.requires_grad) for k, v in state.items()}


def bench(name: str, model: nn.Module, inputs, targets: torch.Tensor, loss, repeats: int,
          clock, sample_s: float = 0.0) -> dict:
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), None)
    graph = chop.trace(model, args, kwargs)  # untimed; starts in train mode, like the model
    model.eval()
    params = [p for p in graph.module.parameters() if p.requires_grad]
    graph.module.validate_inputs = False  # snip skips torch.export's input check: so here

    def graph_step() -> None:  # the graph's own fwd+bwd, without the pass around it
        with graph.mode(batch_norm=False, dropout=False, lean=True):
            value = loss(call(graph.module, inputs), targets)
            torch.autograd.grad(value, params, allow_unused=True)

    def eager() -> None:  # .grad reset inside the timing: charged to eager, not to snip
        model.zero_grad(set_to_none=True)
        eager_step(model, inputs, targets, loss)

    runs = {
        "eager": eager,
        "snip": lambda: chop.run(graph, "snip", data=[(inputs, targets)],
                                 loss=None if loss is cross_entropy else loss),
        "graph": graph_step,
    }
    before = snapshot(model)
    times: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    inner = 1
    for i in range(WARMUP + repeats):
        if i == WARMUP:  # calls per sample: a sample of ~sample_s averages out per-call jitter
            inner = max(1, round(sample_s / statistics.median(times["eager"])))
        for key in keys[i % 3:] + keys[:i % 3]:
            model.zero_grad(set_to_none=True)  # eager's last .grad: snip must not see (or set) any
            start = clock()
            for _ in range(inner):
                runs[key]()
            times[key].append((clock() - start) / inner)
            if key == "snip":
                assert all(p.grad is None for p in model.parameters()), "snip set .grad"
    model.zero_grad(set_to_none=True)
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, (value, flag) in before.items():
        assert torch.equal(value, after[key][0]) and flag == after[key][1], f"snip changed {key}"
    assert graph.training, "snip left the graph in eval mode"
    eager, snip = times["eager"][WARMUP:], times["snip"][WARMUP:]
    return {
        "model": name, "params": sum(p.numel() for p in model.parameters()),
        "batch": next(iter(inputs.values())).shape if isinstance(inputs, dict) else inputs.shape,
        "eager": statistics.median(eager), "snip": statistics.median(snip),
        "graph": statistics.median(times["graph"][WARMUP:]),
        "runs": {"eager": eager, "snip": snip},
        "paired": statistics.median(s / e for s, e in zip(snip, eager)),
        "fastest": min(snip) / min(eager), "inner": inner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert,cnn",
                        help="comma-separated, from: bert, cnn, table (every model of "
                             "benchmarks/coverage.py at batch 2) or a name of that table")
    parser.add_argument("--repeats", type=at_least(1), default=5,
                        help="timed runs of each, interleaved")
    parser.add_argument("--batch", type=at_least(1), default=8, help="BERT batch size")
    parser.add_argument("--seq", type=at_least(1), default=64, help="BERT sequence length")
    parser.add_argument("--cnn-batch", type=at_least(1), default=64,
                        help="CNN batch size (32x32 images)")
    parser.add_argument("--threads", type=at_least(1),
                        help="torch.set_num_threads (default: untouched)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (all threads)")
    parser.add_argument("--sample-ms", type=number_at_least(0), default=0.0,
                        help="time each sample over as many calls as fill this many ms of eager "
                             "fwd+bwd (default 0: one call per sample); e.g. 20 for the small "
                             "models, whose single ~2 ms calls vary by ±20%% between runs")
    parser.add_argument("--verbose", action="store_true", help="print every run and more ratios")
    opts = parser.parse_args()
    if "bert" in opts.models.split(","):
        check_bert_seq(parser, opts.seq)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    clock = time.perf_counter if opts.clock == "wall" else time.process_time
    cases = {
        "bert": ("BERT-base (seq-cls)", lambda: bert_case(opts.batch, opts.seq)),
        "cnn": ("ResNet-18 (32x32)", lambda: cnn_case(opts.cnn_batch)),
    }
    import coverage

    table = {}  # key -> coverage name ("bert" there is a tiny BERT: "bert-tiny" here)
    for name in coverage.MODELS:
        key = f"{name}-tiny" if name in cases else name
        table[key] = name
        cases[key] = (key, lambda name=name: table_case(name))  # rows say the key typed
    keys = unique([k for key in opts.models.split(",")
                   for k in (list(table) if key == "table" else [key])])
    for key in keys:  # all known before anything is measured
        if key not in cases:
            parser.error(f"unknown model {key!r}; choose from bert, cnn, table, " + ", ".join(table))
    needs = {"bert": "transformers", **{k: coverage.NEEDS[n] for k, n in table.items()
                                        if n in coverage.NEEDS}}
    keys, skipped = coverage.absent(keys, needs)
    if not keys:
        raise SystemExit("\n".join(skipped))
    for line in skipped:
        print(line)
    rows = []
    for key in keys:
        torch.manual_seed(0)
        name, make = cases[key]
        try:
            row = bench(name, *make(), opts.repeats, clock, opts.sample_ms / 1e3)
        except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
            print(f"{name}: not measured: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        row["target"] = SMALL_TARGET if key in table else TARGET
        rows.append(row)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opts.clock} clock, "
          f"median of {opts.repeats}"
          + (f", samples of ~{opts.sample_ms:g} ms of eager calls" if opts.sample_ms else "")
          + "\n")
    print("| model | params | batch | eager fwd+bwd s | snip s | ratio | target | graph fwd+bwd ÷ eager |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        ratio, target = r["snip"] / r["eager"], r["target"]
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] >= 10_000 else f"{r['params']:,}"
        print(f"| {r['model']} | {params} | {'x'.join(map(str, r['batch']))} | "
              f"{r['eager']:.4f} | {r['snip']:.4f} | {ratio:.3f} | "
              f"<= {target} {'ok' if ratio <= target else 'MISSED'} | {r['graph'] / r['eager']:.3f} |")
    for r in rows if opts.verbose else ():
        print(f"\n{r['model']}: median of per-pair ratios {r['paired']:.3f}, "
              f"ratio of fastest runs {r['fastest']:.3f}, {r['inner']} call(s) per sample")
        for key, values in r["runs"].items():
            print(f"  {key:5s} " + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
