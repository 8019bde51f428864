"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

A sharded run (FSDP/HSDP) saves with every rank writing its own shards of the params and the
optimizer state into ``step_XXXXXXXX/dcp/``; rank 0 writes ``state.json`` (with
``"sharded": true``), ``config.yaml`` and the run files, then renames the directory into place
(the same atomic protocol as :mod:`tscale.checkpoint.io`). DCP records every tensor's global shape,
so the checkpoint loads on any world size: into DTensors of another mesh, or into plain tensors
in one process (2 ranks → 1, 1 → 2 both work); :func:`read_params` gives the full params for
export without a process group.

A DeepSpeed run (``parallel.deepspeed``) uses the same protocol: every rank writes its ZeRO
partitions with DeepSpeed's own ``save_checkpoint`` into ``step_XXXXXXXX/deepspeed/``, and rank
0 adds the full ``params.safetensors`` (so ``tscale export`` and plain runs read its params).
DeepSpeed's partitions resume on the same world size and ZeRO stage only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tensordict import TensorDict, TensorDictBase

from tscale.checkpoint import io
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import CheckpointError

__all__ = [
    "is_sharded",
    "load_deepspeed",
    "load_sharded",
    "read_params",
    "save_deepspeed",
    "save_sharded",
]

DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"


def _state_dict(state: TrainState) -> dict[str, torch.Tensor]:
    sd = {f"params.{k}": v for k, v in T.flatten(state.params).items()}
    sd |= {f"opt_state.{k}": v for k, v in T.flatten(state.opt_state).items()}
    return sd


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written by :func:`save_sharded`."""
    try:
        return bool(json.loads((Path(path) / "state.json").read_text()).get("sharded"))
    except (OSError, json.JSONDecodeError):
        return False


def save_sharded(
    root: Path,
    state: TrainState,
    *,
    step: int,
    is_main: bool,
    barrier: Callable[[], None],
    cursor: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
    files: Mapping[str, Path] | None = None,
) -> Path:
    """Every rank writes its shards; rank 0 the metadata; then one atomic rename. Every rank
    must call it (it is a collective) and gets the final path back."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _save_collective(
        root,
        state,
        step=step,
        is_main=is_main,
        barrier=barrier,
        write_all=lambda tmp: dcp.save(_state_dict(state), checkpoint_id=str(tmp / DCP_DIR)),
        write_main=None,
        meta={"sharded": True, "world_size": world},
        cursor=cursor,
        extra=extra,
        config_yaml=config_yaml,
        files=files,
    )


def save_deepspeed(
    root: Path,
    state: TrainState,
    full_params: TensorDictBase,
    *,
    write_engine: Callable[[Path], None],
    engine_meta: Mapping[str, Any],
    step: int,
    is_main: bool,
    barrier: Callable[[], None],
    cursor: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    config_yaml: str | None = None,
    files: Mapping[str, Path] | None = None,
) -> Path:
    """A DeepSpeed run's checkpoint: every rank writes its partitions through
    ``write_engine(dir)`` (DeepSpeed's ``save_checkpoint``) into ``deepspeed/``; rank 0 writes
    the full ``params.safetensors`` (what ``tscale export`` and a plain run read) and the
    metadata, with ``"deepspeed": engine_meta``. A collective, like :func:`save_sharded`."""

    def write_main(tmp: Path) -> None:
        io._save_tree(full_params, tmp / "params.safetensors")
        io._save_tree(TensorDict(), tmp / "opt_state.safetensors")

    return _save_collective(
        root,
        state,
        step=step,
        is_main=is_main,
        barrier=barrier,
        write_all=lambda tmp: write_engine(tmp / DEEPSPEED_DIR),
        write_main=write_main,
        meta={"deepspeed": dict(engine_meta)},
        cursor=cursor,
        extra=extra,
        config_yaml=config_yaml,
        files=files,
    )


def load_deepspeed(
    path: Path,
    template: TrainState,
    *,
    load_engine: Callable[[Path], None],
    engine_meta: Mapping[str, Any],
) -> tuple[TrainState, dict[str, Any]]:
    """Resume a DeepSpeed run: ``load_engine(dir)`` restores params and optimizer partitions;
    the step and rng come from ``state.json``. The world size and ZeRO stage must be those the
    checkpoint was written with (``engine_meta``)."""
    path = Path(path)
    meta = io.read_meta(path)
    saved = meta.get("deepspeed")
    if saved is None:
        raise CheckpointError(
            f"{path}: not written by a DeepSpeed run, so it holds no DeepSpeed optimizer state; "
            "resume it without parallel.deepspeed.enabled"
        )
    for key in ("world_size", "zero_stage"):
        if saved.get(key) != engine_meta.get(key):
            raise CheckpointError(
                f"{path}: written with DeepSpeed {key}={saved.get(key)}, this run has "
                f"{engine_meta.get(key)}; resume with the same {key} (DeepSpeed's partitions do "
                "not reshard here), or start a new run from its params with model.path after "
                "`tscale export`"
            )
    load_engine(path / DEEPSPEED_DIR)
    device = template.step.device
    state = template.replace(
        step=torch.tensor(meta["step"], dtype=torch.int64, device=device),
        rng=torch.tensor(meta["rng"], dtype=template.rng.dtype, device=template.rng.device),
        frozen=template.frozen,
    )
    return state, meta


def _save_collective(
    root: Path,
    state: TrainState,
    *,
    step: int,
    is_main: bool,
    barrier: Callable[[], None],
    write_all: Callable[[Path], None],
    write_main: Callable[[Path], None] | None,
    meta: Mapping[str, Any],
    cursor: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    config_yaml: str | None,
    files: Mapping[str, Path] | None,
) -> Path:
    """The multi-rank save protocol: rank 0 makes a temporary directory, every rank writes its
    part (``write_all``), rank 0 adds its own files and the metadata, fsyncs and renames the
    directory into place; barriers between the phases.

    A filesystem fault on rank 0 (disk full, read-only) removes the temporary directory and
    raises :class:`~tscale.errors.CheckpointError` there, as :func:`io.save_checkpoint` does;
    the other ranks then fail at the next collective (``parallel.timeout_s``).
    """
    root = Path(root)
    final = io.checkpoint_dir(root, step)
    tmp = root / f"{io._TMP_PREFIX}{final.name}-sharded"
    if is_main:
        with _faults_removing(tmp, root, step):
            io._before_write(root)
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"{io._TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            io._before_write(tmp)
            tmp.mkdir()
    barrier()
    with _faults_removing(tmp, root, step) if is_main else contextlib.nullcontext():
        write_all(tmp)
    barrier()
    if is_main:
        with _faults_removing(tmp, root, step):
            _write_main_files(
                root, tmp, final, state, step, write_main, meta, cursor, extra, config_yaml, files
            )
    barrier()
    return final


@contextlib.contextmanager
def _faults_removing(tmp: Path, root: Path, step: int) -> Iterator[None]:
    """An OSError inside the block: remove ``tmp`` and raise the save's one-line error."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise io.save_failed(e, root, step) from None


def _write_main_files(
    root: Path,
    tmp: Path,
    final: Path,
    state: TrainState,
    step: int,
    write_main: Callable[[Path], None] | None,
    meta: Mapping[str, Any],
    cursor: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    config_yaml: str | None,
    files: Mapping[str, Path] | None,
) -> None:
    """Rank 0's part: its own files, the metadata, fsyncs, and the rename into place."""
    if write_main is not None:
        write_main(tmp)
    record = {
        "format_version": io.FORMAT_VERSION,
        "step": step,
        **meta,
        "rng": state.rng.cpu().tolist(),
        "cursor": dict(cursor or {}),
        "extra": dict(extra or {}),
    }
    io._write_text(tmp / "state.json", json.dumps(record, indent=2))
    if config_yaml is not None:
        io._write_text(tmp / "config.yaml", config_yaml)
    for name, src in (files or {}).items():
        io._copy_file(src, tmp / name)
    for f in tmp.rglob("*"):
        if f.is_file():
            io._fsync_file(f)
    for d in tmp.rglob("*"):
        if d.is_dir():
            io._fsync_dir(d)
    io._fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    io._fsync_dir(root)


def load_sharded(path: Path, template: TrainState, meta: dict[str, Any]) -> TrainState:
    """Load a DCP checkpoint into a state shaped like ``template`` (DTensors of any mesh, or
    plain tensors in one process); DCP reshards. Every rank of a group must call it."""
    path = Path(path)
    sd = _state_dict(template)
    expected = set(sd)
    stored = set(dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata)
    if expected != stored:
        missing = sorted(expected - stored)[:3]
        extra = sorted(stored - expected)[:3]
        raise CheckpointError(
            f"{path}: the sharded checkpoint does not match this run (missing {missing}, "
            f"unexpected {extra}); was it written with a different model or optimizer config?"
        )
    # DCP loads in place: give it fresh tensors, never the template's own storage
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    try:
        dcp.load(target, checkpoint_id=str(path / DCP_DIR))
    except Exception as err:  # DCP raises CheckpointException/RuntimeError with the reason
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({err})") from None
    params = _tree(target, "params.", template.params)
    params.lock_()
    opt_state = _tree(target, "opt_state.", template.opt_state)
    device = template.step.device
    return TrainState(
        params=params,
        opt_state=opt_state,
        step=torch.tensor(meta["step"], dtype=torch.int64, device=device),
        rng=torch.tensor(meta["rng"], dtype=template.rng.dtype, device=template.rng.device),
        frozen=template.frozen,
    )


def _tree(flat: dict[str, torch.Tensor], prefix: str, like: TensorDictBase) -> TensorDict:
    out = like.empty(recurse=True)
    for k, v in flat.items():
        if k.startswith(prefix):
            out.set(tuple(k[len(prefix) :].split(T.SEP)), v)
    return out


def read_params(path: Path) -> TensorDict:
    """The full params of a sharded checkpoint, in this process (no process group needed)."""
    path = Path(path)
    metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    target: dict[str, torch.Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("params.") and hasattr(md, "size"):
            target[key] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load(target, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    return T.unflatten({k[len("params.") :]: v for k, v in target.items()})
