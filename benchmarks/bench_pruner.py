"""What does the :class:`~chop.training.Pruner` add to a training step?

A training step here is forward, cross-entropy loss, backward and an Adam step of an eager
``nn.Module``, as a user's loop runs it. With the Pruner, the loop also calls its hooks
(``on_step_begin``, ``on_before_optimizer_step``, ``on_after_optimizer_step``) and the Pruner
prunes at **every** step (``frequency=1``, cube schedule from 0 to ``--sparsity`` over the
``--steps`` steps): the criterion scores, the selection keeps exact counts, the masks are
applied to the weights in place and to their gradients (the first two criteria below take the
Pruner's eager path: no pass run per step, see :mod:`chop.training.pruner`). Criteria:

- ``magnitude``: |w|, scored at every pruning step;
- ``snip-momentum{source=grad}``: INC's running SNIP score from the step's own ``.grad``, scored
  at every step (``score_every_step``) — the per-step criterion with the least extra work;
- ``snip-momentum``: the same from one extra forward+backward on the step's batch;

and, as the floor, global magnitude pruning written by hand for the model in a dozen lines of
eager torch (:class:`HandWritten`: no ties, options or checks), to show what pruning at every
step costs with no library around it.

Models: LeNet-5 (the 8×8-input one of ``examples/models.py``, batch 32) and BERT-small
(4 layers, 512 wide, 8 heads, sequence classification; 8×128 tokens). Every variant trains
its own copy of the model, ``--steps`` steps on fixed random batches after ``--warmup``
untimed steps (the Pruner's first step traces the model), and the variants run in
**lockstep**: step i of every variant, in a new (seeded) order at each step, before step
i + 1 of any. A stretch of load on a shared machine then slows every variant alike, where
loops run one after another each met different load. Each variant's ratio is the median
over steps of its step ÷ the no-Pruner step of the same index (paired), over ``--rounds``
rounds; ``× floor`` is the same against the hand-written floor's step (what the library
adds over a bare loop doing the same pruning). Load average and thread count are printed with
the figures. ``--threads 1 --clock cpu`` times the process's CPU time, which other processes
change less than the wall time.
Target (issue 13): the Pruner adds at most 25% to a LeNet-5 step and 10% to a BERT-small one.

``--fused`` trains every variant with torch's fused Adam: the default Adam's ``sqrt`` runs far
more slowly on the zero moments of pruned entries (``bench_train_step.py``), a cost of pruned
training under that optimizer rather than of the Pruner.

Usage: ``python benchmarks/bench_pruner.py [--models lenet5,bert-small] [--steps 100]
[--rounds 3] [--threads N] [--clock wall|cpu] [--fused]``
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from arguments import at_least, percent, sparsity_arg, unique  # noqa: E402

from chop.errors import ChopError  # noqa: E402
from chop.pipeline.batches import call, logits_of  # noqa: E402
from chop.training.pruner import Pruner, criterion_pass  # noqa: E402
from chop.training.schedule import Schedule  # noqa: E402

TARGETS = {"lenet5": 1.25, "bert-small": 1.10}
CRITERIA = ("magnitude", "snip-momentum{source=grad}", "snip-momentum")


def lenet5(batch: int):
    from models import LeNet5

    g = torch.Generator().manual_seed(0)
    return LeNet5(), [(torch.randn(batch, 1, 8, 8, generator=g),
                       torch.randint(0, 10, (batch,), generator=g)) for _ in range(4)]


def bert_small(batch: int, seq: int = 128):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                        intermediate_size=2048)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                        torch.randint(0, 2, (batch,), generator=g)))
    return BertForSequenceClassification(config), batches


MODELS = {"lenet5": ("LeNet-5 (8×8)", lambda: lenet5(32)),
          "bert-small": ("BERT-small (4×512)", lambda: bert_small(8))}
NEEDS = {"bert-small": ("transformers", "hf")}  # model: (optional module, chop's extra)


def absent(key: str) -> str | None:
    """Why model ``key`` cannot run here (an optional dependency is missing), or None."""
    if key not in NEEDS:
        return None
    module, extra = NEEDS[key]
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{key}: {module} absent, skipped (pip install 'chop[{extra}]')"
    return None


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace, models: dict
            ) -> tuple[list[str], dict[str, str]]:
    """``--models``: known names (else a parser error before anything runs), those whose
    optional dependency is absent set apart, with why; exits when no model can run."""
    keys = unique(args.models.split(","))
    for key in keys:
        if key not in models:
            parser.error(f"unknown model {key!r}; choose from {', '.join(models)}")
    skipped = {key: why for key in keys if (why := absent(key))}
    keys = [key for key in keys if key not in skipped]
    if not keys:
        raise SystemExit("\n".join(skipped.values()))
    return keys, skipped


class HandWritten:
    """The floor: global magnitude pruning of the linear/conv weights written by hand for this
    one model, with the Pruner's hooks and as few op calls as eager torch allows: at each step
    one ``cat`` of the (already masked) weights, ``abs_``, one ``kthvalue`` (the threshold kept
    as a tensor: no sync), one comparison, and multi-tensor ops (``_foreach_copy_``,
    ``_foreach_mul_``) that write the masks and apply them to the weights, to the gradients
    before the optimizer step and to the weights after it. Pruned weights are zero, so they rank
    last. No ties handling (every weight at the threshold is kept), no options, no checks: what
    pruning at every step costs with no library around it."""

    def __init__(self, model: torch.nn.Module, schedule: Schedule):
        self.weights = [m.weight for m in model.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        self.factors = [torch.ones_like(w) for w in self.weights]  # masks as 0/1 weights
        self.sizes = [w.numel() for w in self.weights]
        self.schedule, self.step = schedule, 0

    @torch.no_grad()
    def on_step_begin(self, step: int, batch=None) -> None:
        self.step = step
        keep = round((1 - self.schedule.sparsity_at(step)) * sum(self.sizes))
        flat = torch.cat([w.reshape(-1) for w in self.weights]).abs_()
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
        kept = (flat >= threshold).to(flat.dtype).split(self.sizes)
        torch._foreach_copy_(self.factors, [k.view(w.shape) for k, w in zip(kept, self.weights)])
        torch._foreach_mul_(self.weights, self.factors)

    @torch.no_grad()
    def on_before_optimizer_step(self) -> None:
        torch._foreach_mul_([w.grad for w in self.weights], self.factors)

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        torch._foreach_mul_(self.weights, self.factors)

    @property
    def masks(self) -> dict[int, torch.Tensor]:
        return {i: f.bool() for i, f in enumerate(self.factors)}


FLOOR = "hand-written magnitude (floor)"


def loop(make, batches, criterion: str | None, steps: int, warmup: int, sparsity: float,
         clock=time.perf_counter, fused: bool = False) -> Iterator[float | None]:
    """Train a copy of the model ``warmup + steps`` steps, pruning at every step with
    ``criterion`` (None: no Pruner); yields after each step its seconds (None for a warm-up
    step), so that the caller can run several loops in lockstep."""
    torch.manual_seed(0)
    model = make()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    pruner = None
    if criterion == FLOOR:
        pruner = HandWritten(model, Schedule(sparsity, "cube", 0, warmup + steps - 1))
    elif criterion is not None:
        pruner = Pruner(model, sparsity, criterion=criterion, schedule="cube", start_step=0,
                        end_step=warmup + steps - 1, frequency=1,
                        example_inputs=batches[0][0], data=None)
        pruner.on_train_begin()
    for step in range(warmup + steps):
        inputs, targets = batches[step % len(batches)]
        start = clock()
        if pruner is not None:
            pruner.on_step_begin(step, (inputs, targets))
        loss = F.cross_entropy(logits_of(call(model, inputs)), targets)
        loss.backward()
        if pruner is not None:
            pruner.on_before_optimizer_step()
        optimizer.step()
        if pruner is not None:
            pruner.on_after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        yield clock() - start if step >= warmup else None
    if pruner is not None:
        kept = sum(int(m.count_nonzero()) for m in pruner.masks.values())
        total = sum(m.numel() for m in pruner.masks.values())
        reached = 1 - kept / total if total else 0.0  # at sparsity 0 nothing is masked
        assert abs(reached - sparsity) < 1e-3, (kept, total)


def lockstep(make, batches, variants: list, steps: int, warmup: int, sparsity: float,
             clock, seed: int = 0, fused: bool = False) -> dict[str | None, list[float]]:
    """Per-step seconds of every variant's loop, the loops run in lockstep (see the module
    doc); index i of each list is the same step."""
    loops = {v: loop(make, batches, v, steps, warmup, sparsity, clock, fused)
             for v in variants}
    times: dict[str | None, list[float]] = {v: [] for v in variants}
    order, rng = list(variants), random.Random(seed)
    for _ in range(warmup + steps):
        rng.shuffle(order)  # a new order each step: no variant always follows the same one
        for v in order:
            seconds = next(loops[v])
            if seconds is not None:
                times[v].append(seconds)
    for rest in loops.values():  # run each to its end: the sparsity check after the loop
        for _ in rest:
            pass
    return times


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet5,bert-small")
    parser.add_argument("--criteria", default=";".join(CRITERIA),
                        help="criterion pipeline items, separated by ';'")
    parser.add_argument("--steps", type=at_least(1), default=100)
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--rounds", type=at_least(1), default=3,
                        help="lockstep runs of every variant")
    parser.add_argument("--sparsity", type=sparsity_arg, default=0.9)
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (all threads)")
    parser.add_argument("--fused", action="store_true",
                        help="torch's fused Adam for every variant (see bench_train_step.py: "
                             "the default Adam's sqrt is slow on pruned entries' zero moments)")
    args = parser.parse_args()
    keys, skipped = checked(parser, args, MODELS)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    criteria = unique([c.strip() for c in args.criteria.split(";") if c.strip()])
    if not criteria:
        parser.error(f"--criteria {args.criteria!r}: no criterion given")
    for c in criteria:  # before any model is built
        try:
            criterion_pass(c)
        except ChopError as e:
            parser.error(f"--criteria {c!r}: {str(e).splitlines()[0]}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{os.cpu_count()} CPUs; "
          f"{args.steps} steps × {args.rounds} rounds in lockstep, pruning every step to "
          f"{percent(args.sparsity)}, Adam{' (fused)' if args.fused else ''}; "
          f"load average {load()}\n")
    for why in skipped.values():
        print(why + "\n")
    print("| model | variant | median step ms | × no Pruner (paired) | × floor (paired) "
          "| target |")
    print("|---|---|---:|---:|---:|---|")
    for key in keys:
        title, build = MODELS[key]
        model, batches = build()

        def make(model=model):  # each variant trains its own copy
            return copy.deepcopy(model)

        variants = [None, FLOOR, *criteria]
        times: dict[str | None, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v, seconds in lockstep(make, batches, variants, args.steps, args.warmup,
                                       args.sparsity, clock, seed=r, fused=args.fused).items():
                times[v] += seconds
        for v in variants:
            ratio, floor = (statistics.median(t / b for t, b in zip(times[v], times[base]))
                            for base in (None, FLOOR))
            target = TARGETS[key]
            verdict = ("" if v is None
                       else f"≤ {target:.2f} {'ok' if ratio <= target else 'MISSED'}")
            print(f"| {title} | {v or 'no Pruner'} | {statistics.median(times[v]) * 1e3:.2f} | "
                  f"{ratio:.2f} | {'' if v is None else f'{floor:.2f}'} | {verdict} |", flush=True)
        print(f"| | load average after {title}: {load()} | | | | |")


if __name__ == "__main__":
    main()
