"""The IR: :func:`trace` captures a model with torch.export into a :class:`Graph`.

A :class:`Graph` wraps the fx ``GraphModule`` that ``torch.export`` produces (``graph.module``).
In that module every parameter appears once as a ``get_attr`` node whose target is the
parameter's qualified name, exactly as in ``model.state_dict()``: these are the *weight nodes*
every pass works on. The ops are ATen ops (``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``,
…), one vocabulary for every pass to recognise.

Three things torch.export does not give us, and :class:`Graph` adds:

- **A dynamic batch.** torch.export specialises every shape unless told otherwise; :func:`trace`
  marks the batch dimension of every tensor input (and the sequence dimension of integer token
  inputs) as dynamic, so a graph traced with a batch of 2 runs and trains with a batch of 64.
- **Train and eval modes.** An exported graph bakes the ``training`` flag of ``batch_norm``,
  the ``train`` flag of ``dropout`` (in place or not) and of recurrent layers (their dropout
  between layers) and the ``dropout_p`` of attention into its nodes, and the module's own
  ``eval()`` raises. :func:`trace` exports in train mode, records the train-mode value of each
  such argument, and :meth:`Graph.train` / :meth:`Graph.eval` rewrite them in place (including
  BatchNorm's ``num_batches_tracked`` counter, which eval mode must not bump).
  ``graph.module.train()`` / ``.eval()`` are routed to the same switch. A model whose
  train-mode graph draws other random numbers (stochastic depth) or does not export at all
  (LayerDrop, SpecAugment) is exported in eval mode instead (``graph.traced_training`` is
  False; see :func:`trace`).
- **Weight roles.** Each weight node records in ``node.meta["chop"]`` how it is used
  (``role``: linear, conv, embedding, norm, bias, other; ``op``: the consuming ATen op), which
  is what decides the default prunable set. A recurrent layer's ``weight_ih``/``weight_hh``
  (in the weight list of ``aten.lstm``/``gru``/``rnn_*``) are ``linear``, its biases ``bias``.

Like ``ExportedProgram.module()``, ``graph.module`` shares parameter and buffer tensors with the
traced model: training the graph trains the model's parameters. chop passes themselves never
change a parameter in place (``fold`` replaces the parameters it folds).
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import sys
import types
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule, Node
from torch.nn.modules import module as torch_module

from chop.errors import LintError, TraceError
from chop.ir import meta
from chop.ir.replay import WrittenBuffers, copied_inputs, cut_inputs, output_difference

log = logging.getLogger("chop")
aten = torch.ops.aten

# How each ATen op uses its parameter arguments: op packet -> {argument index: role}.
_PARAM_USES: dict[Any, dict[int, str]] = {
    aten.linear: {1: "linear", 2: "bias"},
    aten.addmm: {0: "bias", 2: "linear"},  # Hugging Face Conv1D (GPT-2): x @ W + b, W is [in, out]
    aten.mm: {1: "linear"},
    aten.matmul: {1: "linear"},
    aten.embedding: {0: "embedding"},
    aten.batch_norm: {1: "norm", 2: "bias"},
    aten.instance_norm: {1: "norm", 2: "bias"},
    aten.layer_norm: {2: "norm", 3: "bias"},
    aten.group_norm: {2: "norm", 3: "bias"},
    aten.rms_norm: {2: "norm"},
    # recurrent layers hold their weights in a list argument: (w_ih, w_hh[, b_ih, b_hh]) per
    # layer and direction; 2-D entries are weights, 1-D ones biases (see _param_role)
    **{op: {2: "recurrent", 3: "recurrent"} for op in (aten.lstm, aten.gru, aten.rnn_tanh,
                                                        aten.rnn_relu)},
    **{
        op: {1: "conv", 2: "bias"}
        for op in (
            aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution,
            aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
        )
    },
}
# When a parameter has several uses, the most specific role wins (a tied embedding/lm-head
# weight is an embedding; pruning it would prune the input embedding too).
_ROLE_ORDER = ("embedding", "norm", "bias", "conv", "linear", "other")

# Arguments that differ between train and eval mode: op packet -> (kind, index, keyword).
_MODE_ARGS: dict[Any, tuple[str, int, str]] = {
    aten.batch_norm: ("batch_norm", 5, "training"),
    # InstanceNorm with running statistics: batch statistics in train mode, the running ones in
    # eval mode (the argument sits where batch_norm's does; without running stats always True)
    aten.instance_norm: ("batch_norm", 5, "use_input_stats"),
    **{op: ("dropout", 2, "train") for op in (
        aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout,
        aten.dropout_, aten.feature_dropout_, aten.alpha_dropout_, aten.feature_alpha_dropout_)},
    aten.scaled_dot_product_attention: ("dropout", 4, "dropout_p"),
    # recurrent layers: the dropout between layers; (data, batch_sizes, …) forms shift it by one
    **{op: ("dropout", 6, "train") for op in (aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)},
}
_RECURRENT = (aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
# Random ops that no mode argument switches off (stochastic depth's bernoulli_, LayerDrop's
# rand): a graph holding one is traced again in eval mode.
_RANDOM = {getattr(aten, n) for n in (
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform", "uniform_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "multinomial", "native_dropout", "random_",
    "poisson", "rrelu_with_noise", "rrelu", "_fused_dropout") if hasattr(aten, n)}
_MODE_KEY = "chop_mode"  # node.meta entry: (kind, index, keyword, train-mode value, eval value)
COPY_TARGET = "chop_copy_target"  # node.meta entry: the node's target in a copy (Graph.copy)


def _packet(node: Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def node_arg(node: Node, index: int, keyword: str, default: Any = None) -> Any:
    """Argument ``keyword`` of an op node, given by keyword or at position ``index``."""
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    return node.args[index] if len(node.args) > index else default


def set_node_arg(node: Node, index: int, keyword: str, value: Any) -> None:
    """Set argument ``keyword`` of an op node where it was given (keyword or position)."""
    if keyword in node.kwargs or len(node.args) <= index:
        node.update_kwarg(keyword, value)
    else:
        node.update_arg(index, value)


@dataclass
class PassRecord:
    """One pass run on a graph: what ran, with which options, for how long."""

    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)
    reshaped: bool = False  # the pass changed parameter shapes or storage (``Pass.reshapes``)


def _hooked(module: nn.Module) -> bool:
    """True when calling ``module`` runs hooks other than torch.export's own (its input check,
    and the pair that registers ``nn.Module`` inputs as pytree nodes, which do nothing when the
    inputs are tensors): the module's other hooks, or global module hooks."""
    return bool(
        module._backward_hooks or module._backward_pre_hooks
        or any(getattr(h, "__module__", None) != _UNLIFT
               for hooks in (module._forward_pre_hooks, module._forward_hooks)
               for h in hooks.values())
        or torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks
        or torch_module._global_backward_pre_hooks or torch_module._global_backward_hooks
    )


_UNLIFT = "torch.export._unlift"  # the module of the hooks torch.export puts on its modules


class Graph:
    """A captured model: the fx ``GraphModule`` plus the state chop keeps beside it.

    Attributes:
        module: the fx GraphModule, callable like the model (same inputs, same outputs).
        history: the passes run on this graph so far, in order (:class:`PassRecord`).
        name: the traced model's class name, for messages and reports.
    """

    def __init__(self, module: GraphModule, *, training: bool = True, name: str = "model",
                 traced_training: bool = True):
        self.module = module
        self.name = name
        self.history: list[PassRecord] = []
        self.traced_training = traced_training  # exported in train mode (else eval, see trace)
        self._mode = (True, True) if traced_training else (False, False)  # as traced
        self._lean = False  # running the lean code of the mode (see mode())
        self._nodes_mode = self._mode  # the mode the nodes' arguments are in (see _set_mode)
        # What is cached about the graph's structure (see _current): the generated code of
        # each mode, so that switching back and forth does not run fx's code generation each
        # time (it costs more than a forward of a small model); the nodes with a mode argument;
        # the weight nodes; where each parameter lives; the submodules.
        self._codes: dict[tuple[tuple[bool, bool], bool], tuple] = {}  # (mode, lean) -> code
        self._code_installed: str | None = None
        self._code_nodes = -1
        self._mode_nodes: list[tuple[Node, tuple]] | None = None
        self._weights: list[Node] | None = None
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._by_path: dict[str, nn.Module] | None = None  # the submodules by name
        self._submodules: list[nn.Module] | None = None
        self._memo: dict[Any, Any] = {}  # see memo()
        self._spec_seen: tuple = (None, None)  # (module, input spec) _spec_direct is for
        self._ties: tuple | None = None  # (module, whether a parameter has several names)
        self._spec_direct: tuple[int, frozenset[str]] | None = None
        self._annotate()
        graph = self

        def _train(gm: GraphModule, mode: bool = True) -> GraphModule:
            graph.train(mode)
            return gm

        def _eval(gm: GraphModule) -> GraphModule:
            graph.train(False)
            return gm

        _train.graph = graph  # type: ignore[attr-defined]  # see graph_of
        module.train = types.MethodType(_train, module)  # type: ignore[method-assign]
        module.eval = types.MethodType(_eval, module)  # type: ignore[method-assign]

        def _copied(twin_module: GraphModule) -> None:  # after copy.deepcopy(module)
            twin_module._deepcopy_hooks.remove(_copied)  # its own Graph registers its own
            graph._adopt(twin_module)

        _copied.chop = True  # type: ignore[attr-defined]
        hooks = module.__dict__.setdefault("_deepcopy_hooks", [])
        hooks[:] = [h for h in hooks if not getattr(h, "chop", False)]  # one Graph per module
        hooks.append(_copied)
        self.train(training)

    # -- weights -----------------------------------------------------------------------------

    def weight_nodes(self) -> list[Node]:
        """The ``get_attr`` nodes of parameters, in graph order; ``node.target`` is the name."""
        self._current()
        if self._weights is None:
            params = dict(self.module.named_parameters())
            self._weights = [n for n in self.module.graph.nodes
                             if n.op == "get_attr" and n.target in params]
        return list(self._weights)

    def weight_node(self, name: str) -> Node:
        """The weight node of parameter ``name`` (a ``state_dict`` key)."""
        for node in self.weight_nodes():
            if node.target == name:
                return node
        raise KeyError(f"{self.name} has no parameter named {name!r}")

    def parameter(self, node: Node | str) -> nn.Parameter:
        """The parameter behind a weight node (or a parameter name)."""
        name = node if isinstance(node, str) else node.target
        try:
            module, attr = self.owner(name)
        except AttributeError:
            return self.module.get_parameter(name)  # raises fx's error
        found = module._parameters.get(attr)  # read afresh: parameters get replaced
        return found if found is not None else self.module.get_parameter(name)

    def owner(self, name: str) -> tuple[nn.Module, str]:
        """The submodule that parameter or buffer ``name`` is an attribute of, and the
        attribute (``AttributeError`` if there is no such submodule). Looked up once per name
        while the graph's structure holds (passes never replace a submodule), from one walk
        over the submodules: passes read hundreds of tensors, and ``get_submodule`` walks the
        path each time. Read the tensor from it afresh: passes replace tensors."""
        where = self._owners.get(name)
        if where is None:
            path, _, attr = name.rpartition(".")
            if self._by_path is None:
                self._by_path = dict(self.module.named_modules(remove_duplicate=False))
            module = self._by_path.get(path)
            where = self._owners[name] = (
                module if module is not None else self.module.get_submodule(path), attr)
        return where

    def replace_parameter(self, name: str, value: torch.Tensor) -> None:
        """Point parameter ``name`` at a new tensor, leaving the old one (and the model) alone;
        every other name of the same parameter (a tied embedding and LM head) follows. A
        parameter stored channels-last (the ``channels-last`` pass) stays so: the new value is
        restrided when it is not (``weight * mask`` of a 1×1 kernel comes out row-major)."""
        old = self.parameter(name)
        layout = channels_last_format(old)
        if layout is not None and value.dim() == old.dim() and value.stride() != strides_of(
                value.shape, layout):
            value = value.clone(memory_format=layout)
        self._retarget(name, nn.Parameter(value, requires_grad=old.requires_grad))

    def remove_parameter(self, name: str) -> None:
        """Delete parameter ``name`` and every other name of the same parameter (a tie), once
        no node reads it."""
        self._retarget(name, None)

    def _retarget(self, name: str, new: nn.Parameter | None) -> None:
        """Every name of the parameter ``name`` (one, or several for a tie) now holds ``new``;
        None deletes them."""
        module, attr = self.owner(name)
        old = getattr(module, attr)
        for holder in list(self.module.modules() if self._tied() else [module]):
            for key, param in list(holder._parameters.items()):
                if param is old:
                    if new is None:
                        del holder._parameters[key]
                    else:
                        holder._parameters[key] = new

    def _tied(self) -> bool:
        """Whether some parameter of the module has more than one name (passes make no new
        ties, so this is looked up once per module)."""
        if self._ties is None or self._ties[0] is not self.module:
            names = sum(1 for _ in self.module.named_parameters(remove_duplicate=False))
            self._ties = (self.module, names != sum(1 for _ in self.module.parameters()))
        return self._ties[1]

    # -- modes -------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """True when batch_norm and dropout both run in train mode."""
        return all(self._mode)

    def train(self, mode: bool = True) -> Graph:
        """Switch batch_norm and dropout to train (``mode=True``) or eval mode."""
        self._set_mode(batch_norm=mode, dropout=mode)
        return self

    def eval(self) -> Graph:
        """Switch batch_norm and dropout to eval mode."""
        return self.train(False)

    @contextmanager
    def mode(self, *, batch_norm: bool, dropout: bool, lean: bool = False) -> Iterator[Graph]:
        """Run a block with batch_norm and dropout in the given modes, then restore them.

        ``lean``: inside, the module runs code that leaves out what only checks (torch.export's
        input guards, its tensor metadata asserts), dtype casts to the dtype a tensor already
        has, and values nothing uses, and that calls common ops through the Python bindings
        eager code calls (the same ATen overloads, without the boxed call). It computes the
        same values with fewer and cheaper op calls, which is what a small model's forward
        costs. For blocks that only run the module, such as scoring: a wrong input then fails
        inside an op rather than with torch.export's message, and once a mode's lean code is
        cached, entering it only installs that code, so the fx graph's nodes keep the mode
        arguments of the mode outside the block.
        """
        before = self._mode, self._lean
        self._set_mode(batch_norm=batch_norm, dropout=dropout, lean=lean)
        try:
            yield self
        finally:
            self._set_mode(batch_norm=before[0][0], dropout=before[0][1], lean=before[1])

    def _set_mode(self, *, batch_norm: bool, dropout: bool, lean: bool = False) -> None:
        mode = (batch_norm, dropout)
        self._current()
        if mode == self._mode and lean == self._lean:
            if self.module.training != all(mode):
                self._train_flags(all(mode))
            return
        self._codes[self._mode, self._lean] = _code_of(self.module)  # the code we leave
        code = self._codes.get((mode, lean))
        if not (lean and code is not None):
            # A lean block only runs the module, so its cached code is all it needs: the nodes'
            # mode arguments stay as they are (editing them at every scoring is wasted work)
            # and are brought to the mode when code is generated or a plain mode is entered.
            self._edit_nodes(mode)
        plain = not (lean or self._lean)
        self._mode, self._lean = mode, lean
        if code is not None:
            _install_code(self.module, code)
        elif lean:
            _install_code(self.module, _lean_code(self.module))
        elif plain and not self._mode_args():
            pass  # no argument depends on the mode (no BatchNorm with statistics, no dropout
            # of p > 0: most LLM configs): the plain code we leave is this mode's code too
        else:
            self.module.recompile()
        self._code_installed = self.module._code
        self._train_flags(all(mode))

    def _edit_nodes(self, mode: tuple[bool, bool]) -> None:
        """Set the mode arguments of the graph's nodes to ``mode`` (batch_norm, dropout)."""
        if mode == self._nodes_mode:
            return
        _set_mode_args(self._mode_args(), mode)
        self._nodes_mode = mode

    def _mode_args(self) -> list[tuple[Node, tuple]]:
        """The nodes with an argument that differs between train and eval mode, each with
        its ``meta[_MODE_KEY]`` (remembered while the graph's structure holds)."""
        if self._mode_nodes is None:
            self._mode_nodes = [(n, n.meta[_MODE_KEY]) for n in self.module.graph.nodes
                                if _MODE_KEY in n.meta]
        return self._mode_nodes

    def _train_flags(self, flag: bool) -> None:
        """``nn.Module.train(self.module, flag)`` without its recursion over the submodules."""
        if self._submodules is None:
            self._submodules = list(self.module.modules())
        for module in self._submodules:
            object.__setattr__(module, "training", flag)  # what nn.Module.train sets

    def _current(self) -> None:
        """Drop what is cached about the graph's structure when it changed. fx's rule is that
        an edit of the graph is followed by ``recompile()``, which makes new code: so the
        caches hold while the module's code is the one installed last here and the graph has
        as many nodes. (Parameters are looked up afresh in their owner each time.)"""
        module = self.module
        if module._code is self._code_installed and module.graph._len == self._code_nodes:
            return
        self._codes.clear()
        self._mode_nodes = self._weights = self._submodules = self._by_path = None
        self._owners.clear()
        self._memo.clear()
        self._code_installed, self._code_nodes = module._code, module.graph._len

    # -- plumbing ----------------------------------------------------------------------------

    def copy(self, memo: dict[int, Any] | None = None) -> Graph:
        """An independent copy: its own parameters, buffers and chop metadata, same mode. A node
        whose ``meta[COPY_TARGET]`` holds a target (one rewritten in place for the length of a
        block, as :func:`~chop.training.loop.fast_masks` does) has that target in the copy.

        ``memo``: the ``copy.deepcopy`` memo of a larger copy, so that what else it copies
        (an optimizer, the traced model) shares the copy's parameters as the originals do."""
        traced = self.traced_training  # the copy starts with the arguments as traced
        with self.mode(batch_norm=traced, dropout=traced):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation
                module = copy.deepcopy(self.module, {} if memo is None else memo)
        twin = graph_of(module)  # made by the copy's hook (_adopt)
        assert twin is not None, "a copy of a Graph's module has a Graph"
        return twin.train(self.training)

    def __deepcopy__(self, memo: dict[int, Any]) -> Graph:
        """``copy.deepcopy(graph)`` is :meth:`copy` (a field-by-field copy would reach the fake
        tensors of the node metadata and the cached code, which do not copy)."""
        twin = memo[id(self)] = self.copy(memo)
        return twin

    def _adopt(self, module: GraphModule) -> Graph:
        """Make ``module``, a ``copy.deepcopy`` of this graph's module (fx's own, called directly
        or by :meth:`copy`), a graph of its own: chop metadata of its own (fx copies
        ``node.meta`` shallowly), the targets of ``COPY_TARGET``, the mode arguments as traced,
        then a :class:`Graph` over it in this graph's mode, with its history; its ``train`` and
        ``eval`` switch that graph's mode."""
        edited = False
        for node in module.graph.nodes:
            if "chop" in node.meta:
                node.meta["chop"] = dict(node.meta["chop"])
            if COPY_TARGET in node.meta:  # rewritten in place for a while: not in the copy
                node.target, edited = node.meta.pop(COPY_TARGET), True
        traced = (self.traced_training, self.traced_training)
        if self._nodes_mode != traced:  # a Graph reads the traced mode off its nodes
            _set_mode_args([(n, n.meta[_MODE_KEY]) for n in module.graph.nodes
                            if _MODE_KEY in n.meta], traced)
            edited = True
        if edited:
            module.recompile()
        twin = Graph(module, training=self.training, name=self.name,
                     traced_training=self.traced_training)
        twin.history = list(self.history)
        return twin

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module. Tensors passed as traced (positionally or by keyword) go straight to
        its ``forward`` when nothing else hooks the call: torch.export's pre-hook would only
        re-flatten them to confirm their structure (a large part of a small graph's call), and
        the graph's own ``_guards_fn`` still checks their shapes. Anything else takes the module's
        full call, with its checks and messages."""
        module = self.module
        direct = self._direct_inputs()
        if (direct is not None and len(args) == direct[0] and kwargs.keys() == direct[1]
                and all(isinstance(a, torch.Tensor) for a in args)
                and all(isinstance(v, torch.Tensor) for v in kwargs.values())
                and not _hooked(module)):
            return module.forward(*args, **kwargs)
        return module(*args, **kwargs)

    def _direct_inputs(self) -> tuple[int, frozenset[str]] | None:
        """How many positional tensors and which keyword tensors the module takes, when its
        inputs are exactly those (no nesting) and torch.export's input check has a
        ``_guards_fn`` that checks their shapes; else None."""
        module = self.module
        spec = getattr(module, "_in_spec", None)
        seen_module, seen_spec = self._spec_seen
        if module is not seen_module or spec is not seen_spec:
            self._spec_seen, self._spec_direct = (module, spec), None
            if spec is not None and "_guards_fn" in module._modules and spec.num_children == 2:
                positional, keywords = spec.children()
                if all(c.is_leaf() for c in (*positional.children(), *keywords.children())):
                    self._spec_direct = (positional.num_children, frozenset(keywords.context))
        return self._spec_direct

    def recompile(self) -> None:
        """Regenerate the module's code after a pass edited the graph."""
        self.module.recompile()

    def memo(self) -> dict[Any, Any]:
        """A dict for facts about the graph that hold while its structure does: emptied when
        the graph is edited (and recompiled), like the graph's own caches."""
        self._current()
        return self._memo

    def structure(self) -> tuple[str, int]:
        """The module's generated code and the graph's node count: the same after a call that
        did not edit the graph (or edited it back), different after one that did and
        recompiled (or added or removed nodes)."""
        return self.module._code, len(self.module.graph.nodes)

    def lint(self, keys: Iterable[str] | None = None, *, structure: bool = True) -> None:
        """Check the fx graph (with ``structure``) and the chop metadata entries ``keys`` of
        every weight node (None: every entry); raise :class:`LintError`."""
        if structure:
            try:
                self.module.graph.lint()
            except Exception as e:  # fx raises RuntimeError/AssertionError with its own text
                raise LintError(f"the fx graph of {self.name} is malformed: {e}") from e
        keys = None if keys is None else tuple(keys)
        if keys == ():
            return
        found = []
        for node in self.weight_nodes():
            entries = node.meta.get("chop")
            if entries and (keys is None or not entries.keys().isdisjoint(keys)):
                found += meta.problems(node, self.parameter(node), keys)
        if found:
            more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
            raise LintError("inconsistent chop metadata: " + "; ".join(found[:5]) + more)

    def _annotate(self) -> None:
        """Merge tied weights into one node, record weight roles and the train/eval-dependent
        arguments of the traced graph."""
        self._merge_tied_weights()
        for node in self.weight_nodes():
            roles, ops = [], []
            for user in node.users:
                uses = _PARAM_USES.get(_packet(user), {})
                for index, arg in enumerate(user.args):
                    if index in uses and (arg is node or _recurrent_param(user, index, arg, node)):
                        roles.append(_param_role(uses[index], self.parameter(node)))
                        ops.append(str(_packet(user)).removeprefix("aten."))
                if swaps_last_two(user):  # x @ wᵀ written out (Falcon), MoE experts' grouped mm
                    for product in user.users:
                        name = getattr(_packet(product), "__name__", str(_packet(product)))
                        if name in _PRODUCTS and len(product.args) > 1 and product.args[1] is user:
                            roles.append("linear")
                            ops.append(f"t+{name}")
            role = min(roles, key=_ROLE_ORDER.index) if roles else "other"
            entry = meta.entries(node)
            if "role" not in entry:  # a copy keeps its roles (its users may be mask nodes now)
                entry["role"] = role
                entry["op"] = ops[roles.index(role)] if roles else "other"
        for node in self.module.graph.nodes:
            spec = _MODE_ARGS.get(_packet(node)) if node.op == "call_function" else None
            if spec is not None:
                kind, index, keyword = spec
                if _packet(node) in _RECURRENT and node.target._overloadname != "input":
                    index += 1  # the (data, batch_sizes, …) form of a packed sequence
                train_value = node_arg(node, index, keyword, 0.0)
                stats = kind != "batch_norm" or node_arg(node, 3, "running_mean") is not None
                if not self.traced_training and isinstance(train_value, bool):
                    train_value = stats  # traced in eval mode: train mode turns them on
                if kind == "batch_norm":  # without running stats BatchNorm always uses batch stats
                    eval_value = train_value if not stats else False
                else:
                    eval_value = 0.0 if isinstance(train_value, float) else False
                # dropout of p=0 (most LLM configs) is the identity in either mode
                p = train_value if isinstance(train_value, float) else (
                    node_arg(node, index - 1, "dropout" if _packet(node) in _RECURRENT else "p")
                    if kind == "dropout" else None)
                if train_value != eval_value and not (isinstance(p, (int, float)) and p == 0):
                    node.meta[_MODE_KEY] = (kind, index, keyword, train_value, eval_value)
            elif node.target is aten.add_.Tensor and _is_counter(node.args[0]):
                node.meta[_MODE_KEY] = ("counter", 0, "", aten.add_.Tensor, aten.add.Tensor)

    def _retie(self) -> None:
        """Make parameters that are the same view of the same memory one parameter."""
        seen: dict[tuple, nn.Parameter] = {}
        for holder in self.module.modules():
            for key, param in list(holder._parameters.items()):
                if param is None or param.device.type == "meta" or param.numel() == 0:
                    continue
                kept = seen.setdefault(view_of(param), param)
                if kept is not param and kept.requires_grad == param.requires_grad:
                    holder._parameters[key] = kept

    def _merge_tied_weights(self) -> None:
        """torch.export emits one get_attr per *name* of a tied parameter (GPT-2's wte and
        lm_head); keep one node per parameter, named by its first name in ``state_dict``.
        A program loaded from a ``.pt2`` holds a tie as two parameters viewing the same memory:
        they become one parameter again first, as in the model that was saved."""
        self._retie()
        first = {id(p): name for name, p in self.module.named_parameters()}
        kept: dict[str, Node] = {}
        edited = False
        for node in list(self.module.graph.find_nodes(op="get_attr")):
            try:
                name = first[id(self.module.get_parameter(node.target))]
            except AttributeError:
                continue  # a buffer
            if name not in kept:
                kept[name] = node
                edited, node.target = edited or node.target != name, name
            else:
                node.replace_all_uses_with(kept[name])
                self.module.graph.erase_node(node)
                edited = True
        if edited:  # else the module's code is the graph's already (fx's own rule)
            self.module.recompile()


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor dim


def _set_mode_args(nodes: list[tuple[Node, tuple]], mode: tuple[bool, bool]) -> None:
    """Set the mode arguments of ``nodes`` (each with its ``meta[_MODE_KEY]``) to ``mode``
    (batch_norm, dropout)."""
    batch_norm, dropout = mode
    train = {"batch_norm": batch_norm, "dropout": dropout, "counter": batch_norm}
    for node, (kind, index, keyword, train_value, eval_value) in nodes:
        value = train_value if train[kind] else eval_value
        args, kwargs = node.args, node.kwargs
        if kind == "counter":
            node.target = value  # add_ (train) or an out-of-place add nobody reads (eval)
        elif keyword in kwargs or len(args) <= index:
            if kwargs.get(keyword) != value:
                # what `node.kwargs = ...` does, without fx's re-filing of the node
                # under its (op, target), which a constant argument does not change
                node._update_args_kwargs(args, {**kwargs, keyword: value})
        elif args[index] != value:
            node._update_args_kwargs(args[:index] + (value,) + args[index + 1:], kwargs)


def graph_of(module: nn.Module) -> Graph | None:
    """The :class:`Graph` whose module ``module`` is (its ``train`` switches that graph's
    mode), or None."""
    train = module.__dict__.get("train")
    return getattr(getattr(train, "__func__", None), "graph", None)


def strides_of(shape: torch.Size, layout: torch.memory_format) -> tuple[int, ...]:
    """The strides a new tensor of ``shape`` gets in memory format ``layout``."""
    return torch.empty(shape, device="meta", memory_format=layout).stride()


def channels_last_format(tensor: torch.Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` (``_3d``) when ``tensor`` (4-D, 5-D) has exactly the strides that
    format gives its shape and not the row-major ones, else None. ``is_contiguous(memory_format=
    ...)`` is not that test: a 1×1 or depthwise kernel is contiguous in both formats, yet a
    convolution reads the layout from the order of the strides."""
    layout = CHANNELS_LAST.get(tensor.dim())
    if layout is None or tensor.stride() != strides_of(tensor.shape, layout):
        return None
    return None if tensor.stride() == strides_of(tensor.shape, torch.contiguous_format) else layout


def _code_of(module: GraphModule) -> tuple:
    """What :meth:`GraphModule.recompile` generates from the graph: the code and its forward."""
    return module._code, module._lineno_map, module._prologue_start, type(module).forward


def _install_code(module: GraphModule, code: tuple) -> None:
    """Put back code that :func:`_code_of` saved (for the same graph in the same mode)."""
    names = ("_code", "_lineno_map", "_prologue_start")
    module.__dict__.update(zip(names, code))  # nn.Module.__setattr__'s checks cost more
    type(module).forward = code[3]  # fx gives every GraphModule its own class


# ops that only check (shapes, dtypes, sizes) and return nothing anybody reads
_CHECKS = {getattr(aten, n).default for n in (
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
    "sym_constrain_range_for_size") if hasattr(aten, n)}


def droppable_guards(fx: torch.fx.Graph) -> bool:
    """Whether code that skips torch.export's input guards (``_guards_fn``) still computes what
    the graph does: every input is a tensor, so a wrong one fails inside an op. A number, flag or
    string input was fixed at its traced value; only the guards refuse another value, which
    the code would otherwise ignore."""
    return all(isinstance(n.meta.get("val"), torch.Tensor)
               for n in fx.find_nodes(op="placeholder"))


def _lean_code(module: GraphModule) -> tuple:
    """The code of ``module``'s graph without its checks (the input guards module where
    :func:`droppable_guards`, the assert ops), without casts of a tensor to its own dtype
    (``to`` returns the tensor itself then), slices that take all of a tensor, and values
    nothing uses: what :meth:`Graph.mode` runs with ``lean``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation
        fx = copy.deepcopy(module.graph)  # node.meta is copied shallowly
    guards = droppable_guards(fx)
    for node in list(fx.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn" and guards
                and not node.users) or (
                node.op == "call_function" and node.target in _CHECKS and not node.users):
            fx.erase_node(node)
        elif (node.target is aten.to.dtype and len(node.args) == 2 and not node.kwargs
              and isinstance(node.args[0], Node)
              and getattr(node.args[0].meta.get("val"), "dtype", None) == node.args[1]) or (
                _whole_slice(node)):
            node.replace_all_uses_with(node.args[0])
            fx.erase_node(node)
    fx.owning_module = module  # whose submodules dead-code elimination judges call_module by
    fx.eliminate_dead_code()  # pure ops only: random and in-place ops stay
    for node in fx.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and node.target in _BINDINGS:
            node.target = _BINDINGS[node.target]
    return _code_of(GraphModule(module, fx))  # its code generated once, from the final graph


def _whole_slice(node: Node) -> bool:
    """``aten.slice(x, dim, 0, ≥ 2⁶³−1, 1)``: all of ``x`` (``x[:, :]``, common in Hugging Face
    code); a view of ``x`` with the same values, whose gradient is the gradient of ``x``."""
    if node.target is not aten.slice.Tensor or not isinstance(node.args[0], Node):
        return False
    args = dict(zip(("self", "dim", "start", "end", "step"), node.args), **node.kwargs)
    return (args.get("start") in (None, 0) and args.get("step", 1) == 1
            and (args.get("end") is None or (isinstance(args["end"], int)
                                             and args["end"] >= 2**63 - 1)))


def _bindings() -> dict[Any, Any]:
    """For common ATen overloads, the Python binding that eager code calls (``torch.add``,
    ``torch._C._nn.linear``, ``Tensor.view``): it dispatches the same overload with the same
    positional arguments, through the generated argument parser instead of the schema-boxed
    call of ``torch.ops``, which costs more than a small tensor's kernel (the graph column of
    ``benchmarks/bench_snip.py`` shows the effect). Listed by hand, not guessed: a binding
    whose arguments differ from the schema (``Tensor.index``, the ``slice`` overload no
    binding spells) is not here."""
    by_name = {  # binding namespace: overloads
        "V": {"unsqueeze": ("default",), "add": ("Tensor",), "mul": ("Tensor",),
              "sub": ("Tensor",), "div": ("Tensor",), "transpose": ("int",),
              "reshape": ("default",), "select": ("int",), "layer_norm": ("default",),
              "dropout": ("default",), "pow": ("Tensor_Scalar",), "conv1d": ("default",),
              "conv2d": ("default",), "cat": ("default",), "mean": ("dim",),
              "rsqrt": ("default",), "embedding": ("default",), "matmul": ("default",),
              "batch_norm": ("default",), "neg": ("default",), "relu": ("default",),
              "permute": ("default",), "flatten": ("using_ints",), "addmm": ("default",),
              "bmm": ("default",), "mm": ("default",), "t": ("default",), "tanh": ("default",),
              "sigmoid": ("default",), "exp": ("default",), "cos": ("default",),
              "sin": ("default",), "softmax": ("int",), "max_pool2d": ("default",),
              "squeeze": ("dim",), "unflatten": ("int",), "stack": ("default",),
              "lstm": ("input",), "gru": ("input",), "relu_": ("default",),
              "dropout_": ("default",)},
        "NN": {"linear": ("default",), "scaled_dot_product_attention": ("default",),
               "gelu": ("default",), "silu": ("default",), "relu6": ("default",),
               "hardswish": ("default",), "adaptive_avg_pool2d": ("default",),
               "hardswish_": ("default",), "hardsigmoid": ("default",),
               "hardsigmoid_": ("default",), "silu_": ("default",)},
        "T": {"view": ("default",), "expand": ("default",), "contiguous": ("default",),
              "add_": ("Tensor",), "mul_": ("Tensor",)},
    }
    spaces = {"V": torch._C._VariableFunctions, "NN": torch._C._nn, "T": torch.Tensor}
    table = {}
    for space, ops in by_name.items():
        for name, overloads in ops.items():
            packet, binding = getattr(aten, name, None), getattr(spaces[space], name, None)
            if space == "V" and getattr(torch, name, None) is not binding:
                continue  # fx's generated code names it torch.<name>: that must be this binding
            for overload in overloads:
                if binding is not None and hasattr(packet, overload):
                    table[getattr(packet, overload)] = binding
    return table


_BINDINGS = _bindings()


# matrix products whose second operand, a weight seen transposed, makes it a linear weight
# [(experts,) out, in]: x @ wᵀ, and Mixture-of-Experts layers' grouped products over experts
_PRODUCTS = {"mm", "matmul", "bmm", "_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def swaps_last_two(node: Node) -> bool:
    """Whether ``node`` is a transpose of its operand's last two dims (``t``, ``transpose``,
    ``permute``) and nothing else."""
    value = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    ndim = value.dim() if isinstance(value, torch.Tensor) else None
    if ndim is None or ndim < 2 or node.op != "call_function":
        return False
    op = _packet(node)
    if op in (aten.t, aten.numpy_T):  # w.T
        return ndim == 2
    if op in (aten.mT, aten.adjoint):
        return True
    if op is aten.transpose and len(node.args) == 3:
        return {d % ndim for d in node.args[1:]} == {ndim - 2, ndim - 1}
    if op is aten.permute and len(node.args) == 2:
        return [d % ndim for d in node.args[1]] == [*range(ndim - 2), ndim - 1, ndim - 2]
    return False


def _recurrent_param(user: Node, index: int, arg: Any, node: Node) -> bool:
    """Whether ``node`` is in the weight list (argument ``index``) of recurrent op ``user``."""
    return _packet(user) in _RECURRENT and isinstance(arg, (list, tuple)) and any(
        a is node for a in arg)


def _param_role(role: str, param: torch.Tensor) -> str:
    """A recurrent layer's 2-D weights (``weight_ih``, ``weight_hh``) are prunable like linear
    weights; its 1-D entries are biases."""
    if role == "recurrent":
        return "linear" if param.dim() == 2 else "bias"
    return role


def _is_counter(arg: Any) -> bool:
    return isinstance(arg, Node) and arg.op == "get_attr" and str(arg.target).endswith(
        "num_batches_tracked"
    )


# -- the frontend --------------------------------------------------------------------------------


def dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Dim.AUTO on the batch dim of every tensor input, and on dim 1 of integer token inputs.

    Keyed by the forward's parameter names, the form torch.export documents for mixing
    positional and keyword inputs. None (every shape as in the example) when an input lands in
    the forward's ``**kwargs`` (transformers' ``output_hidden_states=True``): torch.export
    2.13 fails on any dynamic shapes then ("Must provide a tree_name"); :func:`trace` says so
    in its warning about the sizes the graph keeps.
    """

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.AUTO}
        if x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool:
            dims[1] = Dim.AUTO  # (batch, sequence) token ids / attention masks
        return dims

    if _var_keyword_inputs(model, args, kwargs):
        return None
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.items()}


def _var_keyword_inputs(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The names of the inputs that land in ``model.forward``'s ``**kwargs``."""
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs).arguments
    return [key for name, value in bound.items()
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD for key in value]


def widen_batch_of_one(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """torch.export specialises size-1 dims, so trace a batch of 1 as a batch of 2."""
    leaves = [
        x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)
    ]
    if not leaves or any(x.dim() == 0 or x.shape[0] != 1 for x in leaves):
        return args, kwargs

    def widen(x: Any) -> Any:
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) else x

    return torch.utils._pytree.tree_map(widen, (args, kwargs))


_HINTS = (
    ("cache", "The model builds a key/value cache: build it with `use_cache=False` in its "
     "config (or pass use_cache=False in kwargs)."),
    ("data-dependent", "The model branches on tensor *values* (e.g. `if x.sum() > 0`): rewrite "
     "that branch with torch.where/torch.cond, or choose example inputs that avoid it."),
    ("Constraints violated", "The model fixes a size that chop marks dynamic (the batch, or the "
     "sequence length of token inputs): check that the example inputs have a realistic batch "
     "and sequence length, and that the model does not hard-code them."),
)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block and restored after it, also on
    an error (as ``torch.distributed.checkpoint`` does while it builds state dicts); usable as
    a decorator. Nothing happens when the collector is off already.

    Tracing and passes make and drop hundreds of thousands of Python objects (fx nodes and
    their metadata, symbolic sizes, fake tensors). Every allocation counts towards the
    collector's thresholds, and about once per ``snip, mask, shrink`` on a ResNet-50 that set
    off a full collection, which walks every live object of the process. Those came from
    short-lived objects promoted while still alive, so pausing saves them rather than moving
    them later. Reference counting still frees all that is not in a reference cycle at once;
    the cycles made inside the block wait for the collector's next run after it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@gc_paused()
def trace(model: nn.Module, example_inputs: Any = (), kwargs: dict[str, Any] | None = None) -> Graph:
    """Capture ``model`` as a :class:`Graph` with torch.export.

    The model is exported in train mode, so that dropout probabilities are recorded and
    :meth:`Graph.train`/:meth:`Graph.eval` can switch BatchNorm and dropout. Behaviour no mode
    argument switches is baked into a train-mode export: random ops outside dropout (stochastic
    depth's ``bernoulli_``, drop-path) would stay on in eval mode, and a LayerDrop-style
    ``if self.training and torch.rand([]) < p`` branch (or SpecAugment's numpy masks) does not
    export at all. Then the model is exported in eval mode instead, once, with a log line
    saying why: its BatchNorm and dropout still switch to train mode, but those other training
    behaviours (and attention dropout, whose probability an eval-mode export does not record)
    stay off when the graph trains.

    Args:
        model: the model; left in the mode it was in. The graph starts in that mode too.
        example_inputs: one positional input or a tuple of them, as the model's forward takes.
        kwargs: keyword inputs (e.g. ``input_ids``, ``attention_mask`` for a transformer).

    Returns:
        The graph; ``graph.module(*example_inputs, **kwargs)`` equals ``model(...)``, and the
        batch dimension (plus the sequence dimension of integer token inputs) is dynamic.
        ``graph.traced_training`` says which mode it was exported in.

    Raises:
        TraceError: torch.export could not capture the model in either mode; the message says
            why and what to try, and the original exception is chained.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"chop.trace needs a torch.nn.Module, got {type(model).__name__}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(kwargs or {})
    args, kwargs = widen_batch_of_one(args, kwargs)
    name = type(model).__name__
    was_training = model.training
    try:
        model.train(was_training)  # trace switches modes: a module that refuses, refuse here
    except NotImplementedError as e:
        raise TraceError(
            f"chop.trace cannot switch {name} between train and eval mode ({_first_line(e)}); "
            "a torch.export program's module (a loaded .pt2) is a graph already: wrap it with "
            "chop.Graph(program.module(), training=False) instead of tracing it"
        ) from e
    traced_training, why = True, None
    try:
        try:
            program = _export(model, args, kwargs, training=True)
        except Exception as train_error:  # noqa: BLE001 - retried in eval mode, chained if that fails too
            try:
                program = _export(model, args, kwargs, training=False)
            except Exception:  # noqa: BLE001 - the train-mode error is the one to report
                raise _trace_error(name, train_error) from train_error
            traced_training = False
            why = (f"the train-mode export failed ({type(train_error).__name__}: "
                   f"{_first_line(train_error)})")
        else:
            random = sorted({str(n.target) for n in program.graph.nodes
                             if n.op == "call_function" and _packet(n) in _RANDOM})
            if random:
                try:
                    program = _export(model, args, kwargs, training=False)
                    traced_training = False
                    why = (f"its train-mode graph draws random numbers no mode switch turns off "
                           f"({', '.join(random)}: stochastic depth, drop-path or the like)")
                except Exception as e:  # noqa: BLE001 - keep the train-mode graph, say so
                    log.warning("%s: its train-mode graph draws random numbers (%s) that eval mode "
                                "will not turn off, and the eval-mode export failed (%s)", name,
                                ", ".join(random), _first_line(e))
    finally:
        model.train(was_training)
    graph = _graph_of(program, name, was_training, traced_training)
    if traced_training:
        problem = _eval_difference(model, graph, args, kwargs)
        if problem is not None:
            try:
                program = _export(model, args, kwargs, training=False)
            except Exception as e:  # noqa: BLE001 - keep the train-mode graph, say so
                log.warning("%s: in eval mode its train-mode graph does not reproduce the model "
                            "(%s: training-only code besides BatchNorm and dropout, such as an "
                            "`if self.training:` branch), and the eval-mode export failed (%s)",
                            name, problem, _first_line(e))
            else:
                graph = _graph_of(program, name, was_training, traced_training=False)
                why = (f"in eval mode its train-mode graph does not reproduce the model "
                       f"({problem}): its forward has training-only code besides BatchNorm and "
                       f"dropout, such as an `if self.training:` branch")
            finally:
                model.train(was_training)
    if why is not None:
        log.info("%s: traced in eval mode because %s; BatchNorm and dropout still switch to "
                 "train mode, other training-only behaviour stays off", name, why)
    if not graph.traced_training:
        cumulative = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm
                      ._BatchNorm) and m.momentum is None and m.track_running_stats]
        if cumulative:  # a warning when the model came in train mode, to train the graph
            log.log(logging.WARNING if was_training else logging.INFO,
                    "%s: BatchNorm %s has momentum=None (a cumulative average), which an "
                    "eval-mode export cannot update: when the graph trains, its running "
                    "statistics stay as they are; give it a momentum (e.g. 0.1) for statistics "
                    "that follow training", name, ", ".join(cumulative[:5])
                    + (f", … ({len(cumulative) - 5} more)" if len(cumulative) > 5 else ""))
    extra = _var_keyword_inputs(model, args, kwargs)
    fixer = ("the model's code fixes it" if not extra else
             f"the inputs {', '.join(extra)} go through its forward's **kwargs, for which "
             "torch.export takes no dynamic shapes")
    for node in graph.module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if _fixed(value.shape[0]) and value.dim() == 1 and value.is_floating_point():
            log.warning(
                "%s: input %r is 1-D, one unbatched sample (its %d features are not a batch): "
                "the graph only accepts that shape; trace with a batch, e.g. x[None], for a "
                "graph that takes any batch size", name, node.name, value.shape[0],
            )
        elif _fixed(value.shape[0]):
            log.warning(
                "%s: input %r keeps a fixed batch size of %d (%s); the graph only accepts "
                "that batch size", name, node.name, value.shape[0], fixer,
            )
        elif (value.dim() == 2 and _fixed(value.shape[1]) and not value.is_floating_point()
              and value.dtype != torch.bool):  # token ids: dynamic_shapes marked dim 1
            log.warning(
                "%s: input %r keeps a fixed sequence length of %d (%s); the graph only accepts "
                "sequences of that length", name, node.name, int(value.shape[1]), fixer,
            )
    return graph


def _graph_of(program: Any, name: str, training: bool, traced_training: bool) -> Graph:
    try:
        return Graph(program.module(), training=training, name=name,
                     traced_training=traced_training)
    except SyntaxError as e:  # torch writes names into the Python code it generates
        raise TraceError(
            f"{name}: torch.export cannot turn the captured graph back into Python code ({e.msg}"
            f"); a submodule or parameter name with a quote, backslash or line break does "
            f"this: rename it (e.g. the keys of an nn.ModuleDict)"
        ) from e


def _eval_difference(model: nn.Module, graph: Graph, args: tuple, kwargs: dict) -> str | None:
    """How the train-mode ``graph`` in eval mode fails to reproduce ``model`` in eval mode on
    the example inputs (:func:`~chop.ir.replay.output_difference`), or None; None also when
    either cannot run them. Both run on the first two samples of the inputs
    (:func:`~chop.ir.replay.cut_inputs`: two forwards of the whole example batch were most of
    a trace's time on a large batch), or all of them when the graph refuses two; not on fewer
    positions, which would hide length-dependent training code (a training-time crop); from the
    same random seed, in a forked random state, each on its own copy of the inputs, and the
    tensors their forwards write are put back, so the model and the inputs are left as they
    were (Python attributes a forward sets are not). The eager forward runs without the fast
    path of torch's Transformer layers, which under ``no_grad`` in eval mode computes padded
    positions differently from the layers' code that the export captured."""
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    cut = cut_inputs(graph.module, args, kwargs, positions=False)
    tries = [(args, kwargs)] if cut[0] is args and cut[1] is kwargs else [cut, (args, kwargs)]
    try:
        model_state = WrittenBuffers(graph.module, model)
        graph_state = WrittenBuffers(graph.module)
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        for a, k in tries:
            try:
                with torch.no_grad(), torch.random.fork_rng():
                    torch.manual_seed(0)
                    expected = model(*copied_inputs(a), **copied_inputs(k))
                    model_state.restore()
                    with graph.mode(batch_norm=False, dropout=False):
                        torch.manual_seed(0)
                        got = graph.module(*copied_inputs(a), **copied_inputs(k))
            except Exception:  # noqa: BLE001 - cut inputs refused: the whole ones; else no verdict
                continue
            finally:
                model_state.restore()
                graph_state.restore()
            return output_difference(got, expected)
        return None
    except Exception:  # noqa: BLE001 - a model whose written tensors cannot be read: no verdict
        return None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _fixed(size: Any) -> bool:
    """Whether a traced size is a number (torch.export may keep a size it specialised as a
    SymInt whose expression is a number)."""
    return not isinstance(size, torch.SymInt) or bool(size.node.expr.is_number)


def _export(model: nn.Module, args: tuple, kwargs: dict, *, training: bool) -> Any:
    model.train(training)
    # a shape mismatch logs each failed meta kernel's traceback (hundreds of lines) before
    # torch.export raises the error chop reports in one line; a failed export's shape warnings
    # are noise too (chop retries in eval mode, or says what failed)
    with quiet_loggers("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes"), \
            _partial_graphs_logged():
        return torch.export.export(model, args, kwargs,
                                   dynamic_shapes=dynamic_shapes(model, args, kwargs))


@contextmanager
def _partial_graphs_logged() -> Iterator[None]:
    """Inside the block, fx code written to ``sys.stderr`` goes to chop's debug log instead.

    An export that fails on a data-dependent branch (LayerDrop's ``if self.training and
    torch.rand([]) < p``) makes torch print the graph it had captured so far, hundreds of
    lines, to stderr before it raises; chop then retries in eval mode or reports the error in
    one line, so the dump is noise. Other writes pass straight through."""
    real = sys.stderr
    sys.stderr = _NoGraphDumps(real)
    try:
        yield
    finally:
        sys.stderr = real


class _NoGraphDumps:
    """A text stream that passes writes on to ``stream``, except fx code (torch's print of a
    partial graph, and the line break after it), which it logs at debug level."""

    def __init__(self, stream: Any):
        self._stream, self._dropped = stream, False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, False
        if dropped and text == "\n":
            return len(text)
        if text.lstrip("\n").startswith("def forward(self") and "torch.ops." in text:
            log.debug("torch.export's partial graph of a failed export:\n%s", text)
            self._dropped = True
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def view_of(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same values in the same memory: their storage, offset,
    shape, strides and dtype (a tie saved by torch and loaded back is two tensors with one)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


@contextmanager
def quiet_loggers(*names: str, kept: list[logging.LogRecord] | None = None) -> Iterator[None]:
    """The loggers ``names`` (torch's) silent inside the block: torch logs the tracebacks of
    errors it then raises, which chop reports itself. With ``kept``, their warnings and errors
    are appended to it instead (an error whose message says "see the warnings above")."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.propagate, logger.handlers) for logger in loggers]
    handler = _Keep(kept) if kept is not None else None
    for logger in loggers:
        if handler is None:
            logger.setLevel(logging.CRITICAL)
        else:
            logger.setLevel(logging.WARNING)
            logger.propagate, logger.handlers = False, [handler]
    try:
        yield
    finally:
        for logger, (level, propagate, handlers) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate, logger.handlers = propagate, handlers


class _Keep(logging.Handler):
    def __init__(self, kept: list[logging.LogRecord]):
        super().__init__(logging.WARNING)
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        self.kept.append(record)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _trace_error(name: str, e: BaseException) -> TraceError:
    text = str(e).strip()
    hints = [hint for key, hint in _HINTS if key.lower() in text.lower()] or [
        "Check that the example inputs are what the model's forward expects (a tuple of "
        "positional inputs, kwargs for keyword inputs), and that the model runs eagerly on "
        "them; the torch.export error is chained (set CHOP_TRACEBACK=1 to see it from the command line)."
    ]
    return TraceError(
        f"torch.export could not capture {name}: {type(e).__name__}: {_first_line(e)}\n"
        f"What to try: {' '.join(hints)}"
    )


def trace_inputs(model: nn.Module, inputs: Any) -> Graph:
    """Trace ``model`` on one batch's inputs (a tensor, a tuple/list, or a dict of kwargs)."""
    if isinstance(inputs, dict):
        return trace(model, (), kwargs=inputs)
    return trace(model, tuple(inputs) if isinstance(inputs, (tuple, list)) else inputs)
