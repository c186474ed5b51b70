"""Channel flow on the ATen graph: which tensor positions carry which channels, and which must go
together. A walk over the graph plus one small rule per op family, as Torch-Pruning pairs its
DependencyGraph with per-op index mappings.

Atoms and tags
    Every output channel of a conv/linear/addmm (and every column of an embedding table) is an
    *atom*. Walking the graph in order, each tensor gets a :class:`~.rule.Tag`: the dims that
    carry channels and, for every position along them, its atom. Ops move atoms around (view,
    transpose, cat, split…), pass them through (activations, BatchNorm, pooling), or force atoms
    to be removed together (a residual add joins the atoms meeting at each position; attention
    joins a head's q, k and v, and a KV head with the query heads that share it). Those joins are
    edges (``Flow.edges``) of a graph whose connected components are the removable units
    (``Flow.labels``, found with vectorised union-find; ``Flow.coupling`` is the same graph in
    networkx, for inspection). Parameters
    (and BatchNorm's running stats) indexed by a channel are *members*: ``(name, dim, index) ->
    atom`` — a layer scale, a class token or a position embedding met by the channels too.

Boxes and folded dims
    A tag may span several dims (heads × head_dim). Shrink keeps a tensor a tensor only if the
    kept positions form a box, so after the walk every multi-dim tag is *settled*: each unit it
    holds must be whole hyperplanes along one dim (whole heads). Ops that index along one of its
    dims (a slice or cat for rotary, a select of q/k/v from a fused projection, a table that
    varies along head_dim) narrow the choice (``Walk.box``); if no op chose, each index along
    the outer dim is joined into one unit. A dim in ``Tag.folded`` is the batch times the
    channels (``nn.MultiheadAttention`` computes on ``[seq, batch·heads, head_dim]``): only the
    rules with ``folds = True`` follow it, and a view that spells it is respelt with ``-1``.

Blocking
    An op the walk has no rule for never guesses: the atoms of its tagged inputs are *blocked*
    with the reason, and they (and everything joined to them) are never removed. So are atoms
    that reach the model output, meet an untracked tensor that varies along them, are read by an
    op the walk does not track, or whose op a rule refuses (:class:`~.rule.Unsupported`, with
    the reason). A normalisation over the channels (LayerNorm, RMSNorm's mean) blocks them but
    keeps following them, so a residual stream says why it stays. An op whose result nobody
    reads (and that changes nothing in place) is skipped.

The walk (:mod:`.walk`)
    Graph traversal and bookkeeping only: atoms, the coupling graph, members, consumers, heads,
    blocking, multi-output ops (``getitem``), the output and untracked-reader checks, boxes. It
    knows no op; it asks :func:`~.rule.rule_for`.

Rules (:mod:`.rule`, one module per family under :mod:`.rules`)
    A :class:`~.rule.Rule` answers three questions about its ops, and nobody dispatches on op
    names or kinds elsewhere:

    - ``visit(walk, node)``: the output's tag from the inputs' tags, and which atoms join
      (through the walk's ``set``/``join``/``member``…); raise ``Unsupported(reason)`` to block.
      It records a :class:`~.rule.Step`: the rule itself, the operands, a ``transfer`` over
      tag-space tensors (one entry per channel position) and facts for later (``info``).
    - ``constant(node, step, consts, graph)``: how a per-channel constant (a channel whose
      producer rows are zero outputs ``act(bn(bias))``) transfers through the op; read by
      :func:`chop.passes.export.constants.channel_constants`. Default: positions move as
      ``step.transfer`` moves them.
    - ``rewrite(node, step, cut)``: what shrink edits on the node once channels go (view sizes,
      split sizes, slice bounds, depthwise ``groups``). Default: nothing.

    Adding an op family is one module under ``rules/`` with ``@register(aten.op, …)`` on its
    rule class, plus its import in ``rules/__init__.py``. An in-place variant (``aten.silu_``)
    uses the rule of its out-of-place op unless it has its own: torch.export points every later
    reader at the in-place op's result, so the two carry channels alike. A rule telling its ops
    apart compares :func:`~.rule.packet` (``aten.t`` for ``aten.t_``).
"""

from chop.passes.analysis.flow.rule import Rule, Step, Tag, Unsupported, register, rule_for
from chop.passes.analysis.flow.walk import Flow, MemberRecord, trace_channels

__all__ = ["Flow", "MemberRecord", "Rule", "Step", "Tag", "Unsupported", "register", "rule_for",
           "trace_channels"]
