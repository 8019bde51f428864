"""Atomic checkpoints of a TrainState plus the data cursor, the resolved config and run files.

Layout of ``<run>/checkpoints/step_00000100/``::

    params.safetensors     the params tree, keys named like the HF checkpoint
    opt_state.safetensors  the optimizer state tree (dotted keys)
    state.json             format version, step, rng key, data cursor, extra metadata, and each
                           frozen tree's source folder + fingerprint (tscale.checkpoint.frozen)
    frozen.<name>.safetensors  a frozen tree that has no source folder
    config.yaml            the resolved config of the run
    <files>                e.g. tokenizer.json, copied so the checkpoint stands alone

A checkpoint is written into a hidden temporary directory beside its final place, every file is
fsynced, and only then is the directory renamed into place (an atomic ``rename`` on POSIX). A save
interrupted at any point leaves at most a ``.tmp`` directory, which :func:`latest_checkpoint`
never returns and the next save removes.

**Filesystem faults.** A save that fails with an ``OSError`` (disk full, read-only filesystem,
permissions) removes its temporary directory and raises :class:`~tscale.errors.CheckpointError`:
one line with the path, the cause, what to do, and the last complete checkpoint (earlier ones are
never touched before the new one is whole). **The write seam**: every file the writer creates (and
each rename into place) goes through :func:`_before_write`, which calls the hook installed with
:func:`write_hook` (none by default). Tests inject faults with it, e.g. ``with
write_hook(FailNthWrite(3, errno.ENOSPC)):`` — in-process, as root, where permissions block
nothing.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDictBase

from tscale.checkpoint.frozen import FrozenSource, frozen_entries, restore_frozen
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import CheckpointError

FORMAT_VERSION = 2
"""2: state.json records the frozen trees. Format 1 (no frozen trees recorded) still loads."""
_READABLE = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


WriteHook = Callable[[Path], None]
"""Called with each path the writer is about to create; raising OSError simulates a fault."""

_hook: WriteHook | None = None


@contextlib.contextmanager
def write_hook(hook: WriteHook) -> Iterator[None]:
    """Install ``hook`` for every write of the checkpoint writer (and of
    :func:`check_writable`) inside the block: the seam through which tests inject faults."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous


class FailNthWrite:
    """A :data:`WriteHook` raising ``OSError(code)`` at the ``n``-th write (1-based) and, with
    ``sticky``, at every write after it (a disk that stays full)."""

    def __init__(self, n: int, code: int, *, sticky: bool = True) -> None:
        self.n, self.code, self.sticky = n, code, sticky
        self.writes = 0

    def __call__(self, path: Path) -> None:
        self.writes += 1
        if self.writes == self.n or (self.sticky and self.writes > self.n):
            raise OSError(self.code, os.strerror(self.code), str(path))


def _before_write(path: Path) -> None:
    if _hook is not None:
        _hook(path)


_ADVICE = {
    errnos.ENOSPC: "free space on that disk or point {key} at another one",
    errnos.EDQUOT: "free space within your disk quota or point {key} at another disk",
    errnos.EROFS: "the filesystem is read-only: choose a writable {key}",
    errnos.EACCES: "you may not write there: fix its permissions or choose another {key}",
    errnos.EPERM: "you may not write there: fix its permissions or choose another {key}",
}


def describe_os_error(error: OSError, key: str = "run.output_dir") -> str:
    """``No space left on device (ENOSPC) at PATH; free space on that disk or point KEY at
    another one``: the cause, the path and what to do (``key``: the config key of the place)."""
    name = errnos.errorcode.get(error.errno or 0, "")
    cause = error.strerror or str(error)
    where = f" at {error.filename}" if error.filename else ""
    advice = _ADVICE.get(error.errno or 0, "check that disk and {key}").format(key=key)
    return f"{cause}{f' ({name})' if name else ''}{where}; {advice}"


def save_failed(error: OSError, root: Path, step: int) -> CheckpointError:
    """The one-line error of a save at ``step`` that failed with ``error``, naming the last
    complete checkpoint under ``root`` and how to continue from it."""
    last = latest_checkpoint(root)
    if last is None:
        saved = "no checkpoint of this run was saved before"
    else:
        saved = (
            f"the last saved checkpoint is step {int(last.name.removeprefix('step_'))} ({last}); "
            "continue from it with `tscale train CONFIG --resume`"
        )
    return CheckpointError(
        f"saving the checkpoint of step {step} under {root} failed: {describe_os_error(error)}; "
        f"{saved}"
    )


def check_writable(directory: Path) -> None:
    """Raise the ``OSError`` that writing a file into ``directory`` gives (or, while it does not
    exist, into its nearest existing parent, where it would be created); writes nothing that
    stays. Goes through the write seam, so injected faults show here too."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errnos.ENOTDIR, os.strerror(errnos.ENOTDIR), str(existing))
    probe = existing / f"{_TMP_PREFIX}write-test-{uuid.uuid4().hex[:8]}"
    _before_write(probe)
    try:
        probe.write_bytes(bytes(4096))  # a data block, not only an inode: a full disk shows
    finally:
        probe.unlink(missing_ok=True)


def checkpoint_dir(root: Path, step: int) -> Path:
    """The directory name of the checkpoint at ``step``."""
    return Path(root) / f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tree(tree: TensorDictBase, path: Path) -> None:
    _before_write(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in T.flatten(tree).items()}
    save_file(flat, str(path), metadata={"format": "pt", "tscale_format": str(FORMAT_VERSION)})


def save_checkpoint(
    root: Path,
    state: TrainState,
    *,
    step: int,
    cursor: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
    files: Mapping[str, Path] | None = None,
    frozen_sources: Mapping[str, FrozenSource] | None = None,
) -> Path:
    """Write ``state`` atomically to ``root/step_XXXXXXXX`` and return that path.

    Args:
        root: the checkpoints directory of the run.
        state: the train state (read only: saving does not consume it).
        step: the step number (the caller reads ``state.step`` once on the host).
        cursor: the data loader's ``state_dict()``, for exact resume.
        extra: JSON-able metadata (e.g. the last metrics).
        config_yaml: the resolved config, saved as ``config.yaml``.
        files: extra files copied in, by target name (e.g. ``{"tokenizer.json": path}``).
        frozen_sources: the folder each frozen tree was loaded from (recorded, not copied);
            frozen trees without one are saved.

    Raises:
        CheckpointError: the filesystem refused a write (disk full, read-only, permissions):
            one line with the path, the cause, what to do and the last complete checkpoint;
            the temporary directory is removed and earlier checkpoints are untouched.
    """
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        _before_write(root)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        _before_write(tmp)
        tmp.mkdir()
        _write_checkpoint(tmp, state, step, cursor, extra, config_yaml, files, frozen_sources)
        _replace(root, tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(e, root, step) from None
    except BaseException:  # e.g. a second Ctrl-C: no temporary directory is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_text(path: Path, text: str) -> None:
    _before_write(path)
    path.write_text(text)


def _copy_file(src: Path, dst: Path) -> None:
    _before_write(dst)
    shutil.copyfile(src, dst)


def _write_checkpoint(
    tmp: Path,
    state: TrainState,
    step: int,
    cursor: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    config_yaml: str | None,
    files: Mapping[str, Path] | None,
    frozen_sources: Mapping[str, FrozenSource] | None = None,
) -> None:
    """Every file of a checkpoint into ``tmp``, each fsynced, and the directory."""
    _save_tree(state.params, tmp / "params.safetensors")
    _save_tree(state.opt_state, tmp / "opt_state.safetensors")
    frozen, frozen_files = frozen_entries(state.frozen, frozen_sources or {})
    for name, tree in frozen_files.items():
        _save_tree(tree, tmp / name)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "rng": state.rng.cpu().tolist(),
        "cursor": dict(cursor or {}),
        "extra": dict(extra or {}),
        "frozen": frozen,
    }
    _write_text(tmp / "state.json", json.dumps(meta, indent=2))
    if config_yaml is not None:
        _write_text(tmp / "config.yaml", config_yaml)
    for name, src in (files or {}).items():
        _copy_file(src, tmp / name)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)


def _replace(root: Path, tmp: Path, final: Path) -> None:
    """Rename the whole ``tmp`` into ``final`` (moving an older save of the step aside first)."""
    _before_write(final)  # a rename writes the directory: faults can be injected here too
    if final.exists():  # re-saving a step: move the old one out of the way first
        old = root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        try:
            _before_write(final)
            os.rename(tmp, final)
        except OSError:  # the old save goes back: a failed re-save loses nothing
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all); returns the deleted."""
    found = list_checkpoints(root)
    doomed = found[:-keep_last] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def _place(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) on the device of ``ref`` and, when ``ref`` is a DTensor, cut to this
    rank's shard of it (no communication: every rank read the whole file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(
            t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None
        )
    return t.to(ref.device)


def _fill_tree(template: TensorDictBase, flat: dict[str, torch.Tensor], what: str, path: Path):
    names = T.leaf_keys(template)
    missing = [n for n in names if n not in flat]
    extra = [n for n in flat if n not in set(names)]
    if missing or extra:
        raise CheckpointError(
            f"{path}: {what} does not match this run (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); was it written with a different model or optimizer config?"
        )
    out = template.empty(recurse=True)  # keeps empty sub-trees (stateless transforms)
    for name, ref in zip(names, T.leaves(template), strict=True):
        t = flat[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise CheckpointError(
                f"{path}: {what} leaf {name!r} is {t.dtype}{list(t.shape)}, this run expects "
                f"{ref.dtype}{list(ref.shape)}"
            )
        out.set(tuple(name.split(T.SEP)), _place(t, ref))
    return out


def read_meta(path: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint directory, checked for its format version."""
    path = Path(path)
    meta_file = path / "state.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no state.json); pass a step_XXXXXXXX dir")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e})") from None
    if meta.get("format_version") not in _READABLE:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')} is not supported "
            f"(this tscale reads format {FORMAT_VERSION})"
        )
    return meta


def load_checkpoint(
    path: Path,
    template: TrainState,
    frozen_sources: Mapping[str, FrozenSource] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Load a checkpoint into a state shaped like ``template``; returns ``(state, meta)``.

    ``meta`` holds ``step``, ``cursor`` and ``extra`` as saved. Frozen trees recorded by folder
    keep ``template``'s (checked against ``frozen_sources``' fingerprints); saved ones are read.
    Raises :class:`CheckpointError` naming the file when anything is missing or does not match
    ``template``.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("deepspeed"):
        raise CheckpointError(
            f"{path}: written by a DeepSpeed run (its optimizer state is in DeepSpeed's "
            "partitions); resume it with parallel.deepspeed.enabled on "
            f"{meta['deepspeed'].get('world_size')} ranks, or export its params with "
            "`tscale export` and start from them with model.path"
        )
    if meta.get("sharded"):
        from tscale.checkpoint.sharded import load_sharded

        return load_sharded(path, template, meta), meta
    trees = {}
    for what in ("params", "opt_state"):
        f = path / f"{what}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {f.name}")
        trees[what] = _fill_tree(getattr(template, what), load_file(str(f)), what, path)
    params = trees["params"]
    params.lock_()
    device = template.step.device
    state = TrainState(
        params=params,
        opt_state=trees["opt_state"],
        step=torch.tensor(meta["step"], dtype=torch.int64, device=device),
        rng=torch.tensor(meta["rng"], dtype=template.rng.dtype, device=template.rng.device),
        frozen=restore_frozen(path, meta, template.frozen, frozen_sources or {}),
    )
    return state, meta
