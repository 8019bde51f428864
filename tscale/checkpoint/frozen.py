"""Frozen trees in checkpoints: by path and fingerprint when loaded from a folder, else saved.

A frozen tree (the LoRA base, a reference model …) that came from an HF folder is not copied into
every checkpoint — PEFT users expect adapter-only checkpoints — but recorded in ``state.json`` as
its folder and a fingerprint of the weights. Resuming or exporting checks that the folder still
holds the same weights (one line when it does not). A frozen tree with no folder (e.g. a base
initialised at random) is saved beside the params as ``frozen.<name>.safetensors``; one that is
not a plain tensor tree (a QLoRA base quantised from a random init) is rebuilt from the run's
config and seed, and recorded by a fingerprint of its tensors, which the rebuilt tree must match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors.torch import load_file
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.errors import CheckpointError

__all__ = [
    "FrozenSource",
    "folder_fingerprint",
    "frozen_entries",
    "restore_frozen",
    "tensors_fingerprint",
]

_MIB = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@attrs.frozen(kw_only=True)
class FrozenSource:
    """Where a frozen tree was loaded from: an HF folder and the fingerprint of its weights."""

    path: str
    fingerprint: str

    @classmethod
    def of(cls, path: str | Path) -> FrozenSource:
        """The source record of the folder ``path`` (its fingerprint read now)."""
        return cls(path=str(Path(path).resolve()), fingerprint=folder_fingerprint(path))


def folder_fingerprint(path: str | Path) -> str:
    """A sha256 of a model folder's config.json and, for each weight file, its name, size and
    the first and last MiB: content, not place or time (a copied folder fingerprints the same).

    Raises:
        CheckpointError: the folder or a file in it cannot be read.
    """
    folder = Path(path)
    h = hashlib.sha256()
    try:
        files = sorted(
            p for p in folder.iterdir() if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES
        )
        for p in files:
            size = p.stat().st_size
            h.update(json.dumps([p.name, size]).encode())
            with p.open("rb") as f:
                h.update(f.read(_MIB))
                if size > 2 * _MIB:
                    f.seek(size - _MIB)
                    h.update(f.read(_MIB))
    except OSError as err:
        raise CheckpointError(f"cannot fingerprint the model folder {folder}: {err}") from None
    return h.hexdigest()


def _tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a tree-like object by a stable name (TensorDicts, mappings, attrs
    records such as QuantizedParams), in sorted order."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, TensorDictBase):
        yield from sorted(T.flatten(obj).items())
    elif isinstance(obj, Mapping):
        for key in sorted(obj):
            yield from ((f"{key}.{n}", t) for n, t in _tensors(obj[key]))
    elif attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            if f.init:  # derived fields (a view of the others) are not content
                yield from ((f"{f.name}.{n}", t) for n, t in _tensors(getattr(obj, f.name)))


def tensors_fingerprint(tree: Any) -> str:
    """A sha256 over every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in _tensors(tree):
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(json.dumps([name, str(data.dtype), list(data.shape)]).encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _file_name(name: str) -> str:
    return f"frozen.{name}.safetensors"


def frozen_entries(
    frozen: Mapping[str, Any], sources: Mapping[str, FrozenSource]
) -> tuple[dict[str, dict[str, str]], dict[str, TensorDictBase]]:
    """The ``state.json`` entry of every frozen tree (``{"path", "fingerprint"}`` or
    ``{"file"}``) and the trees to write, by file name (those without a source folder).

    """
    entries: dict[str, dict[str, str]] = {}
    to_write: dict[str, TensorDictBase] = {}
    for name, tree in frozen.items():
        source = sources.get(name)
        if source is not None:
            entries[name] = {"path": source.path, "fingerprint": source.fingerprint}
            continue
        if not isinstance(tree, TensorDictBase):  # rebuilt from the config: its content recorded
            entries[name] = {"rebuilt": tensors_fingerprint(tree)}
            continue
        entries[name] = {"file": _file_name(name)}
        to_write[_file_name(name)] = tree
    return entries, to_write


def restore_frozen(
    path: Path,
    meta: Mapping[str, Any],
    template: Mapping[str, Any],
    sources: Mapping[str, FrozenSource],
) -> dict[str, Any]:
    """The frozen trees of the checkpoint at ``path``: the run's own (``template``) for those
    recorded by folder, after checking their fingerprint, and those saved as files read back.
    A checkpoint written before frozen trees were recorded keeps the run's trees.

    Raises:
        CheckpointError: one line when a folder's weights changed, or a saved tree is missing.
    """
    recorded: Mapping[str, Mapping[str, str]] = meta.get("frozen", {})
    out = dict(template)
    for name, entry in recorded.items():
        if name not in template:
            raise CheckpointError(
                f"{path}: the checkpoint has a frozen tree {name!r} this run does not build; "
                "was it written with another task or lora setting?"
            )
        if "rebuilt" in entry:
            if tensors_fingerprint(template[name]) != entry["rebuilt"]:
                raise CheckpointError(
                    f"{path}: frozen tree {name!r} is rebuilt from the run's config and seed, but "
                    "this config builds other values; resume with the config the run started with"
                )
            continue
        if "path" in entry:
            now = sources.get(name)
            if now is None or now.fingerprint != entry["fingerprint"]:
                where = now.path if now is not None else "this run's config"
                raise CheckpointError(
                    f"{path}: frozen tree {name!r} was {entry['path']} (fingerprint "
                    f"{entry['fingerprint'][:12]}), but {where} holds other weights; resume "
                    "with the same model folder the run started from"
                )
            continue
        f = path / entry["file"]
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {f.name}")
        like = template[name]
        flat = load_file(str(f))
        if sorted(flat) != sorted(T.leaf_keys(like)):
            raise CheckpointError(f"{path}: {f.name} does not match this run's {name!r} tree")
        out[name] = T.unflatten({k: flat[k].to(t.device) for k, t in T.flatten(like).items()})
    return out
