"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

A sharded run (FSDP/HSDP) saves with every rank writing its own shards of the params and the
optimizer state into ``step_XXXXXXXX/dcp/``; rank 0 writes ``state.json`` (with
``"sharded": true``), ``config.yaml`` and the run files, then renames the directory into place
(the same atomic protocol as :mod:`tscale.checkpoint.io`). DCP records every tensor's global shape,
so the checkpoint loads on any world size: into DTensors of another mesh, or into plain tensors
in one process (2 ranks → 1, 1 → 2 both work); :func:`read_params` gives the full params for
export without a process group.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
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

__all__ = ["is_sharded", "load_sharded", "read_params", "save_sharded"]

DCP_DIR = "dcp"


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
    root = Path(root)
    final = io.checkpoint_dir(root, step)
    tmp = root / f"{io._TMP_PREFIX}{final.name}-sharded"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{io._TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(_state_dict(state), checkpoint_id=str(tmp / DCP_DIR))
    barrier()
    if is_main:
        meta = {
            "format_version": io.FORMAT_VERSION,
            "step": step,
            "sharded": True,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "rng": state.rng.cpu().tolist(),
            "cursor": dict(cursor or {}),
            "extra": dict(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        for f in tmp.rglob("*"):
            if f.is_file():
                io._fsync_file(f)
        io._fsync_dir(tmp / DCP_DIR)
        io._fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        io._fsync_dir(root)
    barrier()
    return final


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
