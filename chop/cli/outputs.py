"""Write the outputs of ``chop transform`` into OUTDIR: atomically, checked, and without ever
deleting a file chop did not write.

Files (see :func:`write_outputs`): ``model.pt2``, ``weights.safetensors``,
``masks.safetensors``, ``report.json``, ``sparsity.html``, ``graph.dot``, and
``.chop-manifest.json``, which lists the name, size and SHA-256 of every other file: how chop
recognises its own outputs later.

An :class:`Output` reserves OUTDIR for one run, as a context manager around the whole command:

- *Checked early.* :func:`check_outdir` runs before anything slow, and entering the
  :class:`Output` creates OUTDIR's missing parent folders and the temporary folder
  ``.NAME.tmp-PID-XXXX`` beside it (same parent, so the final ``rename`` is atomic): a place
  that cannot be written fails at once, as an :class:`~chop.errors.OutputError` (exit 2).
- *Never deletes what chop did not write.* OUTDIR is replaced only when it is empty or, with
  ``force``, when every file in it is one chop wrote (listed in its manifest, unchanged). An
  OUTDIR that is or holds an input or the current folder, or is a mount point, is refused.
- *One run at a time.* The lock file ``.NAME.lock`` beside OUTDIR is held (``flock``) until
  the run ends; a second run into the same OUTDIR fails at once. The kernel drops the lock of a
  killed process.
- *Checked again at the end.* :meth:`Output.commit` moves OUTDIR aside, checks it again and
  renames the finished folder into place; anything written into OUTDIR meanwhile puts OUTDIR
  back as it was and fails the run.
- *Nothing left behind.* On any failure or interruption (Ctrl-C, SIGTERM: the CLI turns both
  into exceptions) the temporary folder, the lock file and the parents made for OUTDIR are
  removed, and OUTDIR is as it was. A run killed outright (SIGKILL) leaves its temporary
  folder; the next run into the same place removes it and says so (the folder's name holds its
  pid, and the lock proves no live run owns it).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chop.cli.checkpoint import load_program, sha256
from chop.cli.report import to_json
from chop.cli.viz import layer_graph, render_html, to_dot
from chop.errors import ChopError, InternalError, OutputError, TraceError
from chop.ir import meta
from chop.ir.graph import Graph, dynamic_shapes, widen_batch_of_one
from chop.ir.masks import is_masked
from chop.ir.replay import WrittenBuffers, copied_inputs
from chop.passes.export.fold import fold_masks
from chop.passes.export.sparse import csr_weights
from chop.pipeline.batches import call, check_same_outputs, cut_batch

log = logging.getLogger("chop")

FILES = ("model.pt2", "weights.safetensors", "masks.safetensors", "report.json",
         "sparsity.html", "graph.dot")
MANIFEST = ".chop-manifest.json"


def default_outdir(config: Path, suffix: str = "-out") -> Path:
    """A new folder next to the config: ``<stem><suffix>``, or ``…-2``, ``-3``… if taken."""
    base = config.parent / f"{config.stem}{suffix}"
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _files(folder: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """Every entry under ``folder`` but folders, as ``(path relative to folder, entry)``,
    sorted; links are listed, never followed."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            for name, inner in _files(Path(entry.path)):
                yield f"{entry.name}/{name}", inner
        else:
            yield entry.name, entry


def write_manifest(folder: Path) -> None:
    """List every file under ``folder`` (path, size, SHA-256) in its ``.chop-manifest.json``."""
    files = {name: {"size": entry.stat().st_size, "sha256": sha256(Path(entry.path))}
             for name, entry in _files(folder) if name != MANIFEST}
    text = json.dumps({"written_by": f"chop {version('chop')}", "files": files}, indent=2)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _manifest(folder: Path) -> dict[str, Any] | None:
    if (folder / MANIFEST).is_symlink():  # chop writes no links: not chop's manifest
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return files if isinstance(files, dict) else None


def foreign_files(folder: Path) -> list[str]:
    """The entries under ``folder`` chop did not write: files its manifest does not list or
    that changed since, links (chop writes none), and folders, at any depth, that hold no file
    chop wrote (a manifest that is a link lists nothing)."""
    listed = _manifest(folder)
    foreign: list[str] = []
    for root, folders, _ in os.walk(folder):  # os.walk follows no links to folders
        inside = os.path.relpath(root, folder)
        for name in sorted(folders):
            path = name if inside == "." else f"{inside}/{name}"
            if not any(p.startswith(f"{path}/") for p in listed or {}) and not any(
                    path.startswith(f) for f in foreign):
                foreign.append(path + "/")
    for name, entry in _files(folder):
        if any(name.startswith(f) for f in foreign) or (name == MANIFEST and listed is not None):
            continue
        record = (listed or {}).get(name)
        ours = (isinstance(record, dict) and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_size == record.get("size")
                and sha256(Path(entry.path)) == record.get("sha256"))
        if not ours:
            foreign.append(name)
    return foreign


def _check_replaceable(folder: Path, shown: Path, force: bool, when: str = "") -> None:
    """Raise :class:`OutputError` unless the folder OUTDIR (``shown``) may be replaced: it is
    empty, or ``force`` and every file in it is chop's own."""
    if not any(folder.iterdir()):
        return
    if not force:
        raise OutputError(
            f"output folder {shown} {when or 'already exists and '}is not empty; choose another "
            "folder with -o, or pass --force to replace chop's earlier outputs there"
        )
    foreign = foreign_files(folder)
    if foreign:
        shown_files = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more"
                                                 if len(foreign) > 10 else "")
        raise OutputError(
            f"output folder {shown} {when}holds files chop did not write: {shown_files}. "
            f"--force only replaces a folder of chop's own outputs (the files its {MANIFEST} "
            "lists, unchanged), so nothing was deleted; move those files away or choose "
            "another folder with -o"
        )


def check_outdir(outdir: Path, inputs: Sequence[Path], *, force: bool = False) -> Path:
    """Validate OUTDIR before any work; returns it resolved.

    Refuses a file, a mount point, a folder that is or holds one of ``inputs`` or the current
    folder, and a non-empty folder unless ``force`` and it holds only chop's own outputs.
    """
    out = outdir.expanduser().resolve()
    places = [(p, f"the input {p}") for p in inputs] + [(Path.cwd(), "the current folder")]
    for path, what in places:
        p = path.expanduser().resolve()
        if p == out or out in p.parents:
            where = f"output path {outdir} is" if p == out else f"output folder {outdir} holds"
            raise OutputError(
                f"{where} {what}; writing there would overwrite it. Choose another folder "
                "with -o"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {outdir} is a file; pass a folder with -o")
    if os.path.ismount(out):
        raise OutputError(
            f"output folder {outdir} is a mount point; chop replaces OUTDIR with one rename, "
            f"which a mount point refuses. Write into a folder inside it, e.g. -o {outdir}/run1"
        )
    if out.is_dir():
        try:
            _check_replaceable(out, outdir, force)
        except OSError as e:
            raise unwritable(outdir, e) from e
    return out


def unwritable(shown: Path, e: OSError) -> OutputError:
    """The user-facing error for an ``OSError`` while preparing or writing OUTDIR."""
    hint = {
        errno.EBUSY: "it is a mount point or in use: write into a folder inside it",
        errno.EXDEV: "it is on another file system than its parent: write into a folder "
                     "inside it",
    }.get(e.errno or 0, "choose a writable location with -o")
    where = f" ({e.filename})" if e.filename and Path(e.filename) != Path(shown) else ""
    return OutputError(f"cannot write the output folder {shown}: {e.strerror or e}{where}; {hint}")


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (they are delivered then), so that a signal
    never cuts a clean-up or the replacement of OUTDIR short."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Output:
    """OUTDIR, reserved for one run (see the module doc). Use as a context manager::

        with Output(path, force=False) as out:
            ...  # write into out.tmp
            out.commit()

    Args:
        path: OUTDIR (checked with :func:`check_outdir` first).
        force: replace an OUTDIR that holds only chop's own outputs.
        shown: how to name OUTDIR in messages (default: ``path``).
    """

    def __init__(self, path: Path, *, force: bool = False, shown: Path | None = None):
        self.path = Path(path).expanduser().resolve()
        self.shown = shown if shown is not None else Path(path)
        self.force = force
        self.tmp: Path | None = None
        self._lock: tuple[int, Path] | None = None
        self._made: list[Path] = []

    def __enter__(self) -> Output:
        try:
            self._make_parents()
            self._take_lock()
            self._clear_leftovers()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-",
                                             dir=self.path.parent))
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise unwritable(self.shown, e) from e
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder (unless committed), the lock file, and the parent
        folders this run made that are still empty."""
        with _signals_held():
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            if self._lock is not None:
                fd, lock = self._lock
                self._lock = None
                try:
                    lock.unlink()
                except OSError:
                    pass
                os.close(fd)
            for folder in reversed(self._made):
                try:
                    folder.rmdir()
                except OSError:
                    break
            self._made = []

    def _make_parents(self) -> None:
        missing, parent = [], self.path.parent
        while not parent.is_dir():
            if parent.exists() or parent.is_symlink():
                raise OutputError(
                    f"cannot write the output folder {self.shown}: {parent} is a file, not a "
                    "folder; choose another location with -o"
                )
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            self._made.append(folder)

    def _take_lock(self) -> None:
        """Hold ``.OUTDIR.lock`` beside OUTDIR (an flock, with this process's pid in it). A
        file of that name that is not chop's (a link, not a regular file, or holding anything
        but a pid) is refused, never truncated or removed."""
        lock = self.path.parent / f".{self.path.name}.lock"
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise _not_a_lock(lock, self.shown, "a symbolic link") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise OutputError(
                    f"another chop run{f' (pid {holder})' if holder else ''} is writing "
                    f"{self.shown}; wait for it to finish, or choose another folder with -o"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its last holder removed meanwhile
                break
            os.close(fd)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if not regular or not re.fullmatch(rb"\d{0,20}", os.read(fd, 64)):
            os.close(fd)
            raise _not_a_lock(lock, self.shown, "a file holding other data than a process id"
                              if regular else "not a regular file")
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = (fd, lock)

    def _clear_leftovers(self) -> None:
        """Under the lock: remove the temporary folders of killed runs into OUTDIR, and put
        back an OUTDIR a killed run had moved aside."""
        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.(tmp|old)-(\d+)-")
        for entry in sorted(self.path.parent.iterdir()):
            found = pattern.match(entry.name)
            if not found or entry.is_symlink() or not entry.is_dir() or _alive(int(found[2])):
                continue
            if found[1] == "tmp":
                shutil.rmtree(entry)
                log.warning("removed %s, the unfinished output of a chop run (pid %s) that was "
                            "killed", entry, found[2])
            elif not os.path.lexists(self.path):
                entry.rename(self.path)
                log.warning("restored %s from %s, where a chop run (pid %s) killed while "
                            "replacing it had moved it", self.shown, entry, found[2])
            else:
                log.warning("%s holds the earlier contents of %s, left by a chop run (pid %s) "
                            "killed while replacing it; check it and delete it",
                            entry, self.shown, found[2])

    def commit(self) -> None:
        """Replace OUTDIR with the finished temporary folder, after checking OUTDIR again:
        a file that appeared there meanwhile fails the run and OUTDIR stays as it was."""
        if self.tmp is None:
            raise InternalError("Output.commit() outside its context or twice")
        old = None
        with _signals_held():
            try:
                if os.path.lexists(self.path):
                    if self.path.is_symlink() or not self.path.is_dir():
                        raise OutputError(f"output path {self.shown} became a file while this "
                                          "run was working; nothing was written")
                    old = self.path.parent / f".{self.path.name}.old-{os.getpid()}-" \
                                             f"{secrets.token_hex(4)}"
                    os.rename(self.path, old)
                    _check_replaceable(old, self.shown, self.force,
                                       "was changed while this run was working: it ")
                os.rename(self.tmp, self.path)
            except BaseException as e:
                if old is not None and not os.path.lexists(self.path):
                    os.rename(old, self.path)  # OUTDIR as it was
                if isinstance(e, OSError):
                    raise unwritable(self.shown, e) from e
                raise
            self.tmp, self._made = None, []
            if old is not None:
                _remove_outputs(old, self.shown)


def _remove_outputs(old: Path, shown: Path) -> None:
    """Delete the earlier OUTDIR, moved aside and checked: only the files its manifest lists."""
    listed = _manifest(old) or {}
    for name, entry in list(_files(old)):
        if name in listed or name == MANIFEST:
            os.unlink(entry.path)
    for root, _, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):  # emptied folders
        if root != str(old):
            try:
                os.rmdir(root)
            except OSError:
                pass
    try:
        old.rmdir()
    except OSError:
        log.warning("kept %s: files appeared in the earlier %s while chop replaced it", old, shown)


def export_program(graph: Graph, inputs: Any) -> torch.export.ExportedProgram:
    """``graph.module`` exported in eval mode with a dynamic batch (as :func:`chop.trace` marks
    it), so the program runs without chop and accepts any batch size."""
    args, kwargs = widen_batch_of_one(*(
        ((), inputs) if isinstance(inputs, dict)
        else (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {})))
    with graph.mode(batch_norm=False, dropout=False):
        try:
            return torch.export.export(
                graph.module, args, kwargs,
                dynamic_shapes=dynamic_shapes(graph.module, args, kwargs),
            )
        except Exception as e:  # the pruned graph is chop's own making: failing to export is a bug
            raise InternalError(
                f"re-exporting the pruned {graph.name} failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}; this is a bug in chop, please "
                "report it with the model and the pipeline"
            ) from e


def masks_of(graph: Graph) -> dict[str, torch.Tensor]:
    """The bool mask of every pruned parameter, keyed by its original name (also of those the
    ``sparse`` export stored as CSR)."""
    masks = {n.target: meta.entries(n)["mask"].contiguous()
             for n in graph.weight_nodes() if "mask" in meta.entries(n)}
    return masks | {name: mask for name, (_, mask) in csr_weights(graph).items()}


def write_outputs(
    graph: Graph,
    report: dict[str, Any],
    out: Output,
    inputs: Any,
    keys: Sequence[str],
    model: nn.Module | None = None,
    extra: Callable[[Path, dict[str, torch.Tensor], bool, Any, Any], dict[str, Any]] | None = None,
) -> None:
    """Write every output file of ``graph`` into ``out``'s temporary folder, check each model
    file, and commit it as OUTDIR.

    Args:
        graph: the pruned graph; masks still in it are folded first (``fold``), so weights
            are stored pruned and without mask buffers.
        report: the report dict (``report.json``, the HTML page).
        out: OUTDIR, reserved (an entered :class:`Output`).
        inputs: one batch's inputs: the export's example; the files are checked on their first
            samples (and positions), as the export passes check a rewrite
            (:func:`~chop.pipeline.batches.cut_batch`), or on all of them when the graph
            refuses those.
        keys: the original state-dict keys, in order: ``weights.safetensors`` holds exactly
            these, so it loads into the original model class with ``strict=True``. After
            ``shrink`` or ``sparse``, which change shapes and storage, it holds the graph's own
            state dict instead, and that check is skipped (``model.pt2`` is still checked).
        model: the original model, if there is one: ``weights.safetensors`` is checked by
            loading it into a copy and comparing outputs.
        extra: ``extra(folder, state, reshaped, sample, expected)`` writes more files into
            the temporary folder (the Hugging Face folder ``hf/``: :mod:`chop.cli.hf`) from the
            pruned graph's ``state`` dict (``reshaped``: after ``shrink``/``sparse``) and
            checks them against ``expected``, the graph's outputs on ``sample``, the inputs
            the files are checked on; what it returns is added to the report.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    with torch.no_grad(), graph.mode(batch_norm=False, dropout=False):
        # the tensors a forward writes (a call counter, a cache) are put back: the files hold
        # the state the expected outputs were computed from
        written = WrittenBuffers(graph.module)
        sample = cut_batch(graph.module, inputs)
        try:
            expected = call(graph.module, copied_inputs(sample))
        except Exception:  # noqa: BLE001 - a guard the bounds did not show: the whole batch
            if sample is inputs:
                raise
            written.restore()
            sample = inputs
            expected = call(graph.module, copied_inputs(sample))
        finally:
            written.restore()
    masks = masks_of(graph)
    if is_masked(graph):
        fold_masks(graph)
    state = graph.module.state_dict()
    reshaped = [r.name for r in graph.history if r.reshaped]
    if reshaped:  # shrunk tensors / CSR buffers: the graph's own state dict, not the model's
        keys, model = [k for k in state if not k.endswith("_guards_fn")], None
        log.info("%s changed the parameters' shapes or storage: weights.safetensors holds the "
                 "graph's own state dict; load model.pt2 to run it", ", ".join(reshaped))
    missing = [k for k in keys if k not in state]
    if missing:
        raise InternalError(f"the pruned graph lost parameters {missing[:5]}; this is a bug in "
                            "chop")
    weights = {k: state[k].detach().clone().contiguous() for k in keys}
    program = export_program(graph, inputs)
    layers = layer_graph(graph, report["layers"])

    tmp = out.tmp
    if tmp is None:
        raise InternalError("write_outputs needs an entered Output")
    try:
        # saved in memory first: torch's zip writer aborts the process (exit 134) when a write
        # to disk fails (a full disk), where a Python write raises an OSError
        program_file = io.BytesIO()
        torch.export.save(program, program_file)
        (tmp / "model.pt2").write_bytes(program_file.getbuffer())
        del program_file
        for name, tensors in (("weights", weights), ("masks", masks)):
            try:
                save_file(tensors, tmp / f"{name}.safetensors")
            except SafetensorError as e:  # its own type for an OS error (a full disk)
                raise OSError(errno.EIO, str(e), str(tmp / f"{name}.safetensors")) from e
        if extra is not None:
            report.update(extra(tmp, state, bool(reshaped), sample, expected))
        (tmp / "report.json").write_text(to_json(report), encoding="utf-8")
        (tmp / "sparsity.html").write_text(render_html(report, layers), encoding="utf-8")
        (tmp / "graph.dot").write_text(to_dot(layers, report.get("model", "model")), "utf-8")
        write_manifest(tmp)
        _usual_modes(tmp)
    except OSError as e:
        raise unwritable(out.shown, e) from e
    with torch.no_grad():
        try:  # chop's own program must load as an untrusted file: nothing in it unpickled
            saved = load_program(tmp / "model.pt2")
        except ChopError as e:
            try:
                load_program(tmp / "model.pt2", trust=True)
            except ChopError as again:  # torch's own round trip fails: not chop's doing
                raise TraceError(
                    f"torch.export cannot load back the model.pt2 it saved for this model "
                    f"({again.__cause__ or again}); some models do not survive torch.export's "
                    "save and load (a data-dependent shape, such as Bart's selection of "
                    "end-of-sequence tokens), so nothing was written; keep the pruned graph in "
                    "memory, or save graph.module.state_dict() with safetensors"
                ) from again
            raise InternalError(f"chop's own model.pt2 does not load untrusted: {e}") from e
        check_same_outputs("model.pt2", call(saved.module(), copied_inputs(sample)), expected)
        if model is not None:
            copy = _copy(model)
            if copy is not None:
                copy.load_state_dict(load_file(tmp / "weights.safetensors"), strict=True)
                check_same_outputs("weights.safetensors",
                                   call(copy.eval(), copied_inputs(sample)), expected)
    out.commit()
    log.info("wrote %s", ", ".join(FILES))


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` (made by mkdtemp: 0700) and everything in it the modes a folder and files
    made as usual get under the process's umask (safetensors writes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _not_a_lock(lock: Path, shown: Path, what: str) -> OutputError:
    return OutputError(
        f"cannot write the output folder {shown}: {lock} is in the way of chop's lock file and "
        f"is {what}, which chop did not write; move it away, or choose another folder with -o"
    )


def written(report: dict[str, Any]) -> list[str]:
    """The files and folders a run wrote, from its report (``hf/`` when it was written)."""
    return [*FILES, *(["hf/"] if (report.get("hf") or {}).get("written") else [])]


def _copy(model: nn.Module) -> nn.Module | None:
    import copy

    try:
        return copy.deepcopy(model)
    except (TypeError, RuntimeError, AttributeError, copy.Error) as e:  # e.g. unpicklable state
        log.warning("cannot copy %s to check weights.safetensors against it (%s: %s); "
                    "model.pt2 is still checked", type(model).__name__, type(e).__name__, e)
        return None
