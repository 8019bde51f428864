"""Reference models for objectives with a KL or preference term (DPO, PPO/GRPO with β > 0).

Two strategies keep the reference model in the train state (``TrainState.frozen``) with a
function that runs its forward without building a graph, and one computes its log-probs once:

- :func:`frozen_copy`: the starting weights (from ``model.path`` or the random init) as the
  ``"reference"`` tree. From a folder it is checkpointed by the folder and a fingerprint, not
  copied into every checkpoint.
- :func:`folder_reference`: another HF folder's weights (``task.reference_path``: the policy's
  architecture and vocabulary, e.g. an earlier checkpoint), checkpointed by the folder.
- :func:`lora_base_reference`: with LoRA the base *is* the starting model — the adapters off —
  so the reference costs no copy: it runs the stack's inner model on ``frozen["base"]``.

- :func:`attach_reference_logps`: the reference (the starting weights, or the LoRA base) runs
  once before the first step over every training row and held-out example, and each gains the
  per-token float32 field ``ref_logps`` (``log π_ref(labels[t])`` where trained, else 0); the
  loss sums it per sequence (:func:`precomputed_sums`) and no reference is kept. The values are
  cached beside the processed-data cache, keyed by the data and the reference weights.

A task picks one in its ``prepare(ctx)`` (the trees to add) and calls :func:`reference_apply`
(or :func:`precomputed_sums`) in its loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tensordict import TensorDictBase
from torch.distributed.tensor import DTensor

from tscale.core import tree as T
from tscale.data.loader import BatchLoader, batch_iter
from tscale.errors import ConfigError
from tscale.losses.sequence import SequenceLogps, batch_field, sequence_sums, token_logps
from tscale.models.protocol import frozen_kw
from tscale.models.quant import QuantizedParams
from tscale.tasks.base import FrozenTree, TaskContext

__all__ = [
    "REFERENCE",
    "REF_LOGPS",
    "attach_reference_logps",
    "folder_reference",
    "frozen_copy",
    "lora_base_reference",
    "precomputed_sums",
    "read_reference_folder",
    "reference_apply",
    "whole_tree",
]

REFERENCE = "reference"
"""The name of the reference model's frozen tree."""
REF_LOGPS = "ref_logps"
"""The per-token field of precomputed reference log-probs (float32; 0 where not trained)."""
STREAMING_REFUSAL = (
    "task.reference: precomputed computes the reference log-probs of every row before the "
    "first step, but data.streaming makes the rows on the fly; use task.reference auto/copy "
    "(or lora_base), or set data.streaming: false"
)
_BASE = "base"
_CACHE_VERSION = 1


def frozen_copy(ctx: TaskContext) -> dict[str, FrozenTree]:
    """The starting weights as the ``"reference"`` frozen tree (a copy: training changes the
    params in place), recorded by ``model.path`` when they came from it."""
    copy = T.clone(ctx.params)
    return {REFERENCE: FrozenTree(copy.lock_() if not copy.is_locked else copy, ctx.source)}


def folder_reference(ctx: TaskContext, path: str) -> dict[str, FrozenTree]:
    """Another HF folder's weights (``task.reference_path``) as the ``"reference"`` frozen tree,
    recorded by the folder (checkpoints hold its path and fingerprint, not a copy)."""
    tree, _ = read_reference_folder(ctx, path)
    return {REFERENCE: FrozenTree(tree.lock_() if not tree.is_locked else tree, path)}


def read_reference_folder(ctx: TaskContext, path: str) -> tuple[TensorDictBase, str]:
    """``(params, fingerprint)`` of the folder ``path``, checked to be the policy's architecture
    and vocabulary: the same parameter names and shapes as the starting weights (the LoRA
    base's with LoRA).

    Raises:
        ConfigError: a name or shape differs, in one line naming ``task.reference_path``.
    """
    if ctx.read_folder is None:
        raise ValueError("task.reference_path needs TaskContext.read_folder")
    tree, fingerprint = ctx.read_folder(path)
    start = ctx.frozen.get(_BASE, ctx.params)
    if isinstance(start, QuantizedParams):  # QLoRA: the base's shapes, not its NF4 codes
        start = start.dequantize()
    want = {k: tuple(v.shape) for k, v in start.items(True, True)}
    got = {k: tuple(v.shape) for k, v in tree.items(True, True)}
    for name in sorted(want.keys() | got.keys()):
        if want.get(name) != got.get(name):
            mine = "absent" if name not in want else f"{list(want[name])}"
            theirs = "absent" if name not in got else f"{list(got[name])}"
            raise ConfigError(
                f"task.reference_path: {path} is not the policy's architecture ({name}: "
                f"{theirs} there, {mine} in the policy); the reference must share the model's "
                "architecture and vocabulary (e.g. an earlier checkpoint of it)"
            )
    return tree, fingerprint


def lora_base_reference(ctx: TaskContext) -> dict[str, FrozenTree]:
    """No tree to add: the LoRA base (already frozen, ``frozen["base"]``) is the reference."""
    if _BASE not in ctx.frozen:
        raise ValueError("lora_base_reference needs lora.enabled (the base is the reference)")
    if not isinstance(ctx.frozen[_BASE], TensorDictBase):  # QLoRA: NF4 codes, no plain forward
        raise ConfigError(
            "task.reference: the LoRA base (auto or lora_base with lora.enabled) is NF4-quantised "
            "(lora.qlora) and cannot run as the reference each step; set task.reference: "
            "precomputed (dpo: computed once from the dequantised base) or lora.qlora: false"
        )
    return {}


def reference_apply(ctx: TaskContext) -> Callable[[TensorDictBase, Mapping[str, Any]], Any]:
    """``ref(batch, frozen) -> logits`` of the reference model, under ``torch.no_grad``: the
    ``"reference"`` tree through the base model, else the LoRA stack's inner model over the
    base (the adapters off)."""
    decoder = _decoder(ctx.model)  # the stack's innermost model: the plain forward
    if getattr(ctx.model, "tree", None) == _BASE:  # FSDP's ShardedModel over a LoRA base
        # the step hands the loss this rank's shards of frozen["base"]: the decoder runs them
        # through the same per-layer gather
        decoder = attrs.evolve(ctx.model, inner=decoder)

    def ref(batch: Any, frozen: Mapping[str, Any]) -> torch.Tensor:
        tree = frozen.get(REFERENCE, frozen.get(_BASE))
        if tree is None:
            raise KeyError("no reference model: prepare() added none and there is no LoRA base")
        if not isinstance(tree, TensorDictBase):
            raise TypeError(
                f"the reference is a {type(tree).__name__} (a quantised QLoRA base); use "
                "frozen_copy, or LoRA without lora.qlora"
            )
        with torch.no_grad():
            return decoder.apply(tree, batch, **frozen_kw(frozen or None))

    return ref


def whole_tree(tree: Any) -> Any:
    """``tree`` with its FSDP shards (DTensor leaves) gathered whole, for a pass of the plain
    model outside the step (every rank must call it; a transient full copy); any other tree
    as it is."""
    if isinstance(tree, TensorDictBase) and any(
        isinstance(t, DTensor) for t in tree.values(include_nested=True, leaves_only=True)
    ):
        return tree.apply(lambda t: t.full_tensor() if isinstance(t, DTensor) else t)
    return tree


def _decoder(model: Any) -> Any:
    while getattr(model, "inner", None) is not None:
        model = model.inner
    return model


# ------------------------------------------------------------------ precomputed reference


def precomputed_sums(batch: Mapping[str, torch.Tensor], *, num_branches: int = 3) -> SequenceLogps:
    """The reference's summed log-probs per ``(row, doc, branch)`` from the batch's
    ``ref_logps`` field, summed exactly as the policy's (:func:`sequence_sums`).

    Raises:
        KeyError: the batch has no ``ref_logps`` (``attach_reference_logps`` did not run).
    """
    values = batch_field(batch, REF_LOGPS)
    if values is None:
        raise KeyError(
            "task.reference: precomputed, but the batch has no ref_logps field; the task's "
            "prepare() attaches it to the loader's rows and the eval examples"
        )
    return sequence_sums(values, batch, num_branches=num_branches)


def attach_reference_logps(ctx: TaskContext, path: str | None = None) -> str:
    """Run the reference model (the starting weights ``ctx.params``, or the LoRA base, or the
    folder ``path``: ``task.reference_path``) once over every training row of
    ``ctx.data.loader`` and every ``ctx.data.eval_examples`` without a graph, and give each
    the per-token field ``ref_logps``; read them from the cache instead when a run with the
    same data and reference computed them. Returns the line it printed (``reference
    log-probs: cached (…)`` or ``… computed in N s (…)``).

    Raises:
        ConfigError: the loader streams (``data.streaming``): the rows are not known up front.
    """
    bundle = ctx.data
    loader = bundle.loader
    if not isinstance(loader, BatchLoader):
        raise ConfigError(STREAMING_REFUSAL)
    tree = ctx.frozen.get(_BASE, ctx.params)  # the LoRA base, else the starting weights
    if path is not None:  # another folder: keyed by its content, not the starting weights'
        tree, fingerprint = read_reference_folder(ctx, path)
        ctx = attrs.evolve(ctx, weights_fingerprint=lambda _: fingerprint)
    if isinstance(tree, QuantizedParams):  # QLoRA: the NF4 base dequantised for this pass only
        tree = tree.dequantize()
    frozen = {REFERENCE: tree}
    train, held = loader.rows, bundle.eval_examples
    folder = _cache_folder(ctx, tree)
    start = time.perf_counter()
    cached = _load(folder, train, held) if folder is not None else None
    if cached is not None:
        train_values, eval_values = cached
        seconds = time.perf_counter() - start
        line = f"reference log-probs: cached ({folder}, read in {seconds:.2f} s)"
    else:
        ref, rows = reference_apply(ctx), _rows_per_pass(ctx)
        train_values = _token_logps_of(ctx, ref, frozen, train, rows)
        eval_values = _token_logps_of(ctx, ref, frozen, held, rows)
        seconds = time.perf_counter() - start
        if folder is not None and _is_main():
            _save(folder, train_values, eval_values, seconds)
        line = (
            f"reference log-probs: computed in {seconds:.2f} s ({len(train)} rows, "
            f"{len(held)} eval examples)" + (f", cached in {folder}" if folder else "")
        )
    loader.add_field(REF_LOGPS, train_values)
    for example, values in zip(held, eval_values, strict=True):
        example[REF_LOGPS] = values
    if _is_main():
        print(line, flush=True)
    return line


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _rows_per_pass(ctx: TaskContext) -> int:
    """Rows per reference forward: a training microbatch's (it fits, with a graph)."""
    cfg = ctx.config
    return max(1, cfg.data.batch_size // max(1, cfg.train.microbatches))


def _token_logps_of(
    ctx: TaskContext,
    ref: Callable[[Any, Mapping[str, Any]], torch.Tensor],
    frozen: Mapping[str, Any],
    examples: Sequence[Mapping[str, Any]],
    rows: int,
) -> list[torch.Tensor]:
    """Each example's ``log π_ref(labels[t])`` (0 where not trained), float32 on the CPU, in
    batches of ``rows`` examples of similar length."""
    lengths = [len(e["input_ids"]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    pad_id = ctx.data.encoder.pad_id
    for start in range(0, len(order), rows):
        idx = order[start : start + rows]
        chunk = [{k: v for k, v in examples[i].items() if k != REF_LOGPS} for i in idx]
        (batch,) = batch_iter(chunk, len(chunk), pad_id)
        batch = ctx.prepare_batch(batch).to(ctx.device)
        with torch.no_grad():
            values = token_logps(ref(batch, frozen), batch)
            index = batch.get("logits_index", None)
            if index is not None:  # back to every position (untrained ones hold 0)
                full = values.new_zeros(batch["labels"].shape)
                values = full.scatter(1, index, values)
        values = values.float().cpu()
        for j, i in enumerate(idx):
            out[i] = values[j, : lengths[i]].clone()
    return out


def _cache_folder(ctx: TaskContext, tree: Any) -> Path | None:
    """``<processed-data cache root>/reference-<key>``: the data's cache key, the reference
    weights' fingerprint (the folder's content, or the tensors of a random init) and what
    changes the numerics (architecture, dtype, attention backend, device type, logits at
    trained positions only, rows per pass); None when the data cache is off."""
    report = ctx.data.report
    if report.get("cache") not in ("hit", "miss") or not report.get("cache_path"):
        return None
    cfg = ctx.config
    model = attrs.asdict(cfg.model)
    for key in ("path", "checkpoint_layers"):  # the folder's content stands for its path
        model.pop(key, None)
    if ctx.weights_fingerprint is None:
        raise ValueError("a reference cache key needs TaskContext.weights_fingerprint")
    weights = ctx.weights_fingerprint(tree)
    parts = {
        "version": _CACHE_VERSION,
        "data": Path(report["cache_path"]).name,
        "reference": weights,
        "model": model,
        "device": ctx.device.type,
        "trained_positions_only": cfg.loss.trained_positions_only,
        "rows_per_pass": _rows_per_pass(ctx),
    }
    if cfg.lora.enabled and cfg.lora.qlora:  # the NF4 base's values, not the folder's
        parts["qlora_block_size"] = cfg.lora.qlora_block_size
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return Path(report["cache_path"]).parent / f"reference-{digest[:32]}"


def _flat(values: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([v.numel() for v in values], dtype=np.int64)
    flat = torch.cat(list(values)).numpy() if values else np.zeros(0, np.float32)
    return lengths, flat.astype(np.float32, copy=False)


def _save(
    folder: Path, train: Sequence[torch.Tensor], held: Sequence[torch.Tensor], seconds: float
) -> None:
    """Write the values to ``folder`` atomically (a temporary folder, then renamed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        (tl, tv), (el, ev) = _flat(train), _flat(held)
        np.savez(
            tmp / "ref_logps.npz",
            train_lengths=tl,
            train_values=tv,
            eval_lengths=el,
            eval_values=ev,
        )
        (tmp / "meta.json").write_text(json.dumps({"seconds": seconds}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(
    folder: Path, train: Sequence[Mapping[str, Any]], held: Sequence[Mapping[str, Any]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The cached values when ``folder`` holds them for rows of these lengths, else None (a
    miss: absent, damaged, or for other rows)."""
    try:
        with np.load(folder / "ref_logps.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    out = []
    for prefix, examples in (("train", train), ("eval", held)):
        lengths = arrays.get(f"{prefix}_lengths")
        values = arrays.get(f"{prefix}_values")
        want = [len(e["input_ids"]) for e in examples]
        if lengths is None or values is None or lengths.tolist() != want:
            return None
        if values.size != sum(want):
            return None
        cuts = np.cumsum(lengths)[:-1]
        out.append([torch.from_numpy(v.copy()) for v in np.split(values, cuts)] if want else [])
    return out[0], out[1]
