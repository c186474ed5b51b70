"""Hugging Face model folders: a ``save_pretrained`` folder in, text data tokenised for it, the
loss and metric of its task, and the pruned model out as ``OUTDIR/hf/``.

- **In** (:func:`load_folder`). A folder with ``config.json`` and safetensors weights is built
  with transformers' own calls, locally only: ``AutoConfig.from_pretrained(folder,
  local_files_only=True)``, the class named by its ``architectures`` entry, then
  ``from_pretrained(folder, local_files_only=True, use_safetensors=True)``; the tokenizer with
  ``AutoTokenizer`` when the folder has tokenizer files. Code in a folder (``auto_map``) never
  runs, and a folder whose weights are only pickles (``pytorch_model.bin``) is refused unless
  trusted. The key/value cache is turned off for tracing.
- **Task** (:func:`task_of`), from the architecture: ``causal-lm``, ``masked-lm``,
  ``classification`` (sequence), ``token-classification``, or ``""`` (a bare encoder or a
  head chop has no loss for: the config must name one, ``[loss] source``).
- **Text** (:func:`encoder`). Records are tokenised (truncated to ``max_length``, padded to the
  longest, with attention masks); the targets follow the task, so that chop's default
  cross-entropy *is* the task's loss: the next token for a causal LM (-100 at padding and at the
  last position), the original token at 15% of the non-special positions (seeded; replaced by
  the mask token in the inputs, the rest -100) for a masked LM, the ``label_field`` for
  classifiers (integers, or names from the config's ``label2id``; per word for token
  classification, whose ``text_field`` holds lists of words: the first token of each word
  takes its label).
- **Out** (:func:`write_folder`). The pruned weights go back into the model class:
  ``save_pretrained`` (safetensors) plus the tokenizer files; the folder is loaded back with
  ``from_pretrained`` and its logits compared with the pruned graph's before OUTDIR is
  committed. After ``shrink`` the config is updated where one config value per dimension
  expresses the new shapes (uniform MLP widths, uniform head counts with an explicit
  ``head_dim``); otherwise no ``hf/`` is written and the reason is reported in one line.

This module imports transformers (the optional ``hf`` extra); the rest of chop does not.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.cli.checkpoint import sha256
from chop.cli.config import DataSpec
from chop.cli.datasets import Encode, Records
from chop.errors import CheckpointError, ChopError, ConfigError, DataError
from chop.pipeline.batches import call, check_same_outputs

log = logging.getLogger("chop")

TASKS = ("causal-lm", "masked-lm", "classification", "token-classification")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_MASKED_SHARE = 0.15


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ChopError(
            "a Hugging Face model folder needs transformers: pip install chop[hf] (or pip "
            "install 'transformers>=5')"
        ) from None
    return transformers


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a folder with ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


@dataclass
class Folder:
    """A loaded model folder.

    Attributes:
        path: the folder.
        model: the model, in eval mode, with its cache off.
        tokenizer: its tokenizer, or None when the folder has no tokenizer files.
        config: the folder's config as it was (``hf/`` is saved with it).
        task: see :data:`TASKS`; ``""`` for a model without a head chop knows.
        info: the report's checkpoint entry.
    """

    path: Path
    model: nn.Module
    tokenizer: Any
    config: Any
    task: str
    info: dict[str, Any]

    @property
    def metric(self) -> str:
        """The metric of the task: perplexity for language models, accuracy for classifiers."""
        return "perplexity" if self.task.endswith("-lm") else "accuracy"


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars and info logs off (the CLI has its own display)."""
    logging_ = _transformers().utils.logging
    shown, level = logging_.is_progress_bar_enabled(), logging_.get_verbosity()
    logging_.disable_progress_bar()
    logging_.set_verbosity_error()
    try:
        yield
    finally:
        logging_.set_verbosity(level)
        if shown:
            logging_.enable_progress_bar()


def task_of(architecture: str) -> str:
    """The task of a transformers model class name (see :data:`TASKS`; ``""`` for none)."""
    names = _transformers().models.auto.modeling_auto
    for task, mapping in (
        ("causal-lm", names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("masked-lm", names.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("classification", names.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("token-classification", names.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    ):
        if architecture in mapping.values():
            return task
    return ""


def _digest(folder: Path) -> str:
    """One SHA-256 over the folder's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
            digest.update(f"{path.name}\0{sha256(path)}\0".encode())
    return digest.hexdigest()


def load_folder(path: Path, *, trust: bool = False) -> Folder:
    """Load the model folder at ``path`` (see the module doc); raise
    :class:`~chop.errors.CheckpointError` naming what is wrong and how to fix it."""
    transformers = _transformers()
    safetensors = any((path / name).is_file() for name in _WEIGHTS)
    pickles = [name for name in _PICKLES if (path / name).is_file()]
    if not safetensors and not (pickles and trust):
        raise CheckpointError(
            f"model folder {path} has no safetensors weights (model.safetensors)"
            + (f", only {pickles[0]}, a pickle that runs code when loaded; re-save the model "
               "with save_pretrained(folder) (safetensors is its default), or pass "
               "--trust-checkpoint if you trust where it came from" if pickles else
               "; save the model into it with model.save_pretrained(folder)")
        )
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            if "custom code" in str(e):
                raise CheckpointError(
                    f"{path / 'config.json'} needs code from the folder (auto_map) for its "
                    f"model type; chop never runs code from a model folder: use a model class "
                    f"transformers {transformers.__version__} ships"
                ) from e
            raise CheckpointError(
                f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}; it must be the "
                "config.json save_pretrained writes"
            ) from e
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
        if names and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(
                f"{path / 'config.json'} names the architecture {names[0]!r}, which is not a "
                f"model class of transformers {transformers.__version__}; chop never runs code "
                "from a model folder (auto_map). Install a transformers that has it"
            )
        try:
            # without a key/value cache (it does not trace and is not needed), set before the
            # model is built: sub-blocks that copy the config (T5's stacks) see it too
            no_cache = {"use_cache": False} if getattr(config, "use_cache", None) else {}
            model = cls.from_pretrained(path, local_files_only=True, use_safetensors=safetensors,
                                        trust_remote_code=False, **no_cache)
        except Exception as e:  # transformers raises many types for a damaged folder
            raise CheckpointError(
                f"cannot load the model in {path} as {getattr(cls, '__name__', cls)}: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}; "
                "save it again with save_pretrained"
            ) from e
        tokenizer = None
        if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                     "vocab.txt", "tokenizer.model")):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=False)
            except Exception as e:  # a damaged or foreign tokenizer: say so, keep the model
                raise CheckpointError(
                    f"cannot load the tokenizer in {path}: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e) else ''}; save it again with "
                    "tokenizer.save_pretrained(folder), or remove its files"
                ) from e
    original = copy.deepcopy(model.config)  # what hf/ is saved with: the folder's own cache
    if getattr(config, "use_cache", None):
        original.use_cache = config.use_cache
    architecture = type(model).__name__
    task = task_of(architecture)
    info = {"path": str(path), "sha256": _digest(path), "kind": "folder",
            "architecture": architecture, "task": task or None}
    return Folder(path, model.eval(), tokenizer, original, task, info)


def not_local(path: Path) -> CheckpointError:
    """The error for a checkpoint argument that names nothing on this machine."""
    return CheckpointError(
        f"{path} does not exist: it is not a local folder or file, and chop never downloads "
        "models; pass the folder a model was saved into with save_pretrained, or a checkpoint "
        "file"
    )


# -- text data ----------------------------------------------------------------------------------


def encoder(folder: Folder, spec: DataSpec) -> Encode:
    """The function that tokenises ``spec``'s text records for ``folder`` (see the module doc)."""
    tokenizer = folder.tokenizer
    if tokenizer is None:
        raise ConfigError(
            f"data.source = {spec.source!r} is text, but the model folder {folder.path} has no "
            "tokenizer files; save the tokenizer into it with tokenizer.save_pretrained(folder)"
        )
    if spec.label_field is not None and folder.task.endswith("-lm"):
        raise ConfigError(
            f"data.label_field = {spec.label_field!r}: {type(folder.model).__name__} is a "
            f"{folder.task.replace('-lm', ' language model')}, whose targets come from the text "
            "itself; remove label_field"
        )
    limit = next((v for v in (getattr(folder.model.config, k, None) for k in (
        "max_position_embeddings", "n_positions")) if isinstance(v, int) and v > 0), None)
    max_length = min(spec.max_length, limit) if limit else spec.max_length
    accepted = set(inspect.signature(folder.model.forward).parameters)

    def encode(records: Records, where: str) -> tuple[dict[str, torch.Tensor], Any]:
        if not records:
            raise DataError(f"{where} holds no records")
        texts = [_field(r, spec.text_field, where, i, "text_field")
                 for i, r in enumerate(records)]
        words = isinstance(texts[0], list)
        if not all(isinstance(t, list) if words else isinstance(t, str) for t in texts):
            raise DataError(
                f"{where}: [data] text_field {spec.text_field!r} must hold strings (or, for "
                "token classification, lists of words) in every record"
            )
        encoded = tokenizer(texts, truncation=True, max_length=max_length,
                            is_split_into_words=words)
        inputs = _padded(encoded, tokenizer, accepted)
        vocab = getattr(folder.model.config, "vocab_size", None)
        top = int(inputs["input_ids"].max()) if inputs["input_ids"].numel() else -1
        if isinstance(vocab, int) and top >= vocab:
            raise DataError(
                f"{where}: the folder's tokenizer gives token id {top}, but the model has "
                f"vocab_size {vocab}: the tokenizer does not belong to this model; save the "
                "model's own tokenizer into the folder (tokenizer.save_pretrained)"
            )
        labels = ([_field(r, spec.label_field, where, i, "label_field")
                   for i, r in enumerate(records)] if spec.label_field else None)
        return inputs, _targets(folder, spec, inputs, encoded, labels, where)

    return encode


def _field(record: dict[str, Any], name: str, where: str, index: int, key: str) -> Any:
    if name not in record or record[name] is None:
        raise DataError(
            f"{where}: record {index} has no {name!r} (its fields: "
            f"{', '.join(map(repr, record)) or 'none'}); set [data] {key} to the field that "
            "holds it"
        )
    return record[name]


def _padded(encoded: Any, tokenizer: Any, accepted: set[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's lists padded to the longest (on the tokenizer's padding side) as int64
    tensors, with an attention mask; only the inputs the model's forward takes."""
    ids = encoded["input_ids"]
    length = max(len(row) for row in ids)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    columns = {key: encoded[key] for key in encoded if key in accepted}
    columns["attention_mask"] = [[1] * len(row) for row in ids]
    out = {}
    for key, rows in columns.items():
        fill = pad if key == "input_ids" else 0
        padded = [([fill] * (length - len(r)) + list(r)) if left else
                  (list(r) + [fill] * (length - len(r))) for r in rows]
        out[key] = torch.tensor(padded, dtype=torch.int64)
    return out if "attention_mask" in accepted else {
        k: v for k, v in out.items() if k != "attention_mask"}


def _targets(folder: Folder, spec: DataSpec, inputs: dict[str, torch.Tensor], encoded: Any,
             labels: list[Any] | None, where: str) -> torch.Tensor | None:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    if folder.task == "causal-lm":  # the next token; none after the last or at padding
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = torch.where(mask[:, 1:] & mask[:, :-1], ids[:, 1:], -100)
        return targets
    if folder.task == "masked-lm":
        return _mask_tokens(folder.tokenizer, ids, mask, spec.seed, where)
    if labels is None:
        if folder.task:
            raise DataError(
                f"{where}: {type(folder.model).__name__} is a {folder.task.replace('-', ' ')} "
                "model, whose loss and accuracy need labels; set [data] label_field to the "
                "field of the records that holds them"
            )
        return None
    names = getattr(folder.model.config, "label2id", None) or {}
    if folder.task == "token-classification":
        targets = torch.full_like(ids, -100)
        left = getattr(folder.tokenizer, "padding_side", "right") == "left"
        for row, word_labels in enumerate(labels):
            shift = ids.shape[1] - len(encoded["input_ids"][row]) if left else 0
            if not isinstance(word_labels, list):
                raise DataError(f"{where}: record {row}: [data] label_field must hold one "
                                "label per word (a list) for token classification")
            seen = set()
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word not in seen and word < len(word_labels):
                    seen.add(word)
                    targets[row, position + shift] = _label(word_labels[word], names, where,
                                                            row)
        return targets
    values = [_label(value, names, where, row) for row, value in enumerate(labels)]
    if all(isinstance(v, int) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.float32)


def _label(value: Any, names: dict[str, int], where: str, row: int) -> Any:
    """An integer label (a name is looked up in the config's ``label2id``); floats pass (a
    user's loss may regress)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        if value in names:
            return int(names[value])
        try:
            return int(value)  # CSV cells are strings
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            pass
    known = f"the config's labels: {', '.join(map(repr, names))}" if names else \
        "the config has no label2id"
    raise DataError(f"{where}: record {row}: label {value!r} is not a class index nor a label "
                    f"name ({known}); use class indices or set label2id in config.json")


def _mask_tokens(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, seed: int, where: str
                 ) -> torch.Tensor:
    """Masked-LM targets: 15% of each row's non-special tokens (at least one), seeded; the
    inputs' ids there become the mask token (in place)."""
    if tokenizer.mask_token_id is None:
        raise DataError(f"{where}: the tokenizer has no mask token, which a masked language "
                        "model's inputs need; save the tokenizer with mask_token set")
    special = torch.isin(ids, torch.tensor(sorted(set(tokenizer.all_special_ids)) or [-1]))
    candidates = mask & ~special
    generator = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=generator) < _MASKED_SHARE) & candidates
    for row in range(ids.shape[0]):  # every row scores at least one token
        if not chosen[row].any() and candidates[row].any():
            options = candidates[row].nonzero().flatten()
            chosen[row, options[torch.randint(len(options), (), generator=generator)]] = True
    targets = torch.where(chosen, ids, -100)
    ids[chosen] = tokenizer.mask_token_id
    return targets


# -- the folder out -----------------------------------------------------------------------------


def write_folder(folder: Folder, state: dict[str, torch.Tensor], reshaped: bool, dest: Path,
                 inputs: Any, expected: Any) -> str | None:
    """Write ``state`` (the pruned graph's state dict, original names) as a ``save_pretrained``
    folder ``dest`` with the tokenizer, load it back and check its logits against
    ``expected`` (the pruned graph's on ``inputs``). Returns None when written, else why not
    (one line; nothing is written then)."""
    cls = type(folder.model)
    config = copy.deepcopy(folder.config)
    if reshaped:
        fitted = fit_config(cls, config, state)
        if isinstance(fitted, str):
            return fitted
        config = fitted
    from transformers.initialization import no_init_weights

    with _quiet():
        with no_init_weights():
            model = cls(config)
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(dtypes) == 1:  # the folder's own dtype (bfloat16…): cls(config) makes float32
            model.to(dtypes.pop())
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            return (f"the pruned graph has no {missing[0]!r} for {cls.__name__}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        model.load_state_dict({k: state[k] for k in own}, strict=True)
        generation = getattr(folder.model, "generation_config", None)
        if generation is not None and getattr(model, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(generation)  # the folder's, not defaults
        model.eval().save_pretrained(dest, safe_serialization=True)
        if folder.tokenizer is not None:
            folder.tokenizer.save_pretrained(dest)
        for name in _PROCESSOR_FILES:  # an image or audio model's preprocessing, unchanged
            if (folder.path / name).is_file() and not (dest / name).exists():
                why = _foreign(folder.path, name)
                if why:
                    log.warning("hf/: %s of %s not copied: %s", name, folder.path, why)
                else:
                    shutil.copyfile(folder.path / name, dest / name)
        loaded = cls.from_pretrained(dest, local_files_only=True, use_safetensors=True,
                                 trust_remote_code=False).eval()
    with torch.no_grad():
        got = call(loaded, {**inputs, "use_cache": False} if "use_cache" in inspect.signature(
            loaded.forward).parameters else inputs)
    check_same_outputs(f"{dest.name}/ ({cls.__name__}.from_pretrained)", got, expected)
    return None


def _foreign(folder: Path, name: str) -> str | None:
    """Why ``folder/name`` is not the folder's own preprocessing file, or None: a link out of
    the folder (but into a Hugging Face cache's ``blobs``, where its snapshots link) could make
    chop copy any file of the user's into a model they share; a ``.json`` must be JSON."""
    path = folder / name
    target = path.resolve()
    if path.is_symlink() and not target.is_relative_to(folder.resolve()) and (
            target.parent.name != "blobs"):
        return f"it links to {target}, outside the folder"
    if name.endswith(".json"):
        try:
            json.loads(target.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return f"it is not JSON ({e})"
    return None


# preprocessing files of a model folder that hf/ keeps as they are (the tokenizer's are saved)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                    "chat_template.json")

# config keys that set one dimension of every layer, in the families chop shrinks
_WIDTHS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")
_HEADS = ("num_attention_heads", "n_head", "num_key_value_heads")


def fit_config(cls: type, config: Any, state: dict[str, torch.Tensor]) -> Any:
    """A config of ``cls`` whose parameter shapes are exactly those of ``state`` (a shrunk
    graph's), or a one-line reason why transformers cannot express them.

    The MLP width and the head counts (only with an explicit ``head_dim``, which then stays)
    are searched one key at a time, each set to the value among the shapes' sizes that makes
    the most parameter shapes match, until all match or nothing improves; models are built on
    the meta device, so this costs no memory. A config without ``head_dim`` (Qwen2, Phi-3,
    GPT-NeoX…: their code reads ``head_dim`` when set, else hidden_size ÷ heads) is tried again
    with ``head_dim`` set to that quotient, so the head counts can change (reloading the
    folder and comparing its outputs catches a model that ignores it)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    fitted = _fit(cls, config, shapes)
    hidden, heads = (getattr(config, k, None) for k in ("hidden_size", "num_attention_heads"))
    if isinstance(fitted, str) and not isinstance(getattr(config, "head_dim", None), int) and (
            isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and hidden % heads == 0):
        explicit = copy.deepcopy(config)
        explicit.head_dim = hidden // heads
        refit = _fit(cls, explicit, shapes)
        if not isinstance(refit, str):
            return refit
    return fitted


def _fit(cls: type, config: Any, shapes: dict[str, tuple[int, ...]]) -> Any:
    """:func:`fit_config` on the parameter ``shapes``, with ``config``'s own ``head_dim``."""
    sizes = sorted({d for s in shapes.values() for d in s})
    head_dim = getattr(config, "head_dim", None)
    options: dict[str, list[int]] = {}
    for key in _WIDTHS:
        if isinstance(getattr(config, key, None), int):
            options[key] = sizes
    if isinstance(head_dim, int) and head_dim > 0:
        for key in _HEADS:
            if isinstance(getattr(config, key, None), int):
                options[key] = sorted({d // head_dim for d in sizes if d % head_dim == 0})

    def built(candidate: Any) -> dict[str, tuple[int, ...]] | None:
        try:
            with torch.device("meta"):
                return {k: tuple(v.shape) for k, v in _init(cls, candidate).state_dict().items()}
        except Exception:  # noqa: BLE001 - a combination the model refuses
            return None

    def matching(candidate: Any) -> int:
        got = built(candidate)
        if got is None or got.keys() != shapes.keys():
            return -1
        return sum(got[k] == shapes[k] for k in shapes)

    best, score = config, matching(config)
    if score < 0:
        names = set(built(config) or {})
        missing, new = sorted(names - shapes.keys()), sorted(shapes.keys() - names)
        told = "; ".join(f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in (
            (missing, f"of {cls.__name__}'s are gone"), (new, "are not its")) if keys)
        return (f"the pruned graph's parameter names are not {cls.__name__}'s ({told}: a pass "
                "such as fold-bn, which folds BatchNorm into the convs, or sparse, which stores "
                "weights in its own format, changed them); model.pt2 is the pruned model")
    improved = True
    while improved and score < len(shapes):
        improved = False
        for key, values in options.items():
            for value in values:
                candidate = copy.deepcopy(best)
                setattr(candidate, key, value)
                got = matching(candidate)
                if got > score:
                    best, score, improved = candidate, got, True
    if score == len(shapes):
        return best
    closest = built(best) or {}
    wrong = [k for k in shapes if closest.get(k) != shapes[k]]
    first = wrong[0]
    return (f"transformers' {cls.__name__} cannot express the shrunk shapes with one config "
            f"value per dimension: with the closest config, {first} would be "
            f"{'×'.join(map(str, closest[first]))}, but it is "
            f"{'×'.join(map(str, shapes[first]))} ({len(wrong)} parameter(s) differ). Layers "
            "shrunk to different widths (mask{scope=global} ranks all layers together; "
            "scope=local removes the same share of each) or heads that change their size "
            "do this; model.pt2 is the shrunk model")


def _init(cls: type, config: Any) -> nn.Module:
    from transformers.initialization import no_init_weights

    with _quiet(), no_init_weights():
        return cls(config)
