"""Padded TensorDict batches: an endless, resumable, deterministic train loader; eval batches.

Each epoch's batches come from a *plan*, a pure function of (examples' lengths, seed, epoch,
batching options): the order (shuffled from ``(seed, epoch)`` or given), optionally grouped by
length, cut into batches of ``batch_size`` rows or of at most ``max_tokens`` padded tokens, and,
with ``longest_first``, the batch holding the longest example moved to the front of the first
epoch (so that an out-of-memory shows at step 1, not at step 120). A cursor ``(epoch, index)``
names a global batch; resuming computes that epoch's plan and continues from it, reading nothing
it skips. Under data parallelism every rank plans the same global batches and takes its
contiguous ``1/world_size`` share of the rows, so a checkpoint resumes on any world size that
divides the batch size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tensordict import TensorDict

from tscale.data.tokenize import IGNORE_INDEX
from tscale.errors import DataError

# Padding value of every per-token field a batch may carry.
_PAD_VALUES = {
    "labels": IGNORE_INDEX,
    "position_ids": 0,
    "doc_ids": 0,
    "branch_ids": 0,
    "ref_logps": 0.0,
    "margins": 0.0,
    "record_ids": -1,
}
_FIELDS = (
    "input_ids",
    "labels",
    "position_ids",
    "doc_ids",
    "branch_ids",
    "ref_logps",
    "margins",
    "record_ids",
)
"""The per-token fields a batch carries. ``record_ids`` (optional): each token's record key,
constant over an example (online RL's prompts: the key of the record whose columns the rewards
read host-side); padded with -1."""
MARGINS = "margins"
"""A reward-model pair's margin (the record's ``margin`` column), the same value on every token
of its group document (:func:`tscale.tasks.preference.group_stage`); the loss reads it at the
sequence ends (:mod:`tscale.tasks.reward`)."""
FLOAT_FIELDS = frozenset({"ref_logps", MARGINS})
"""Per-token fields carried as float32 (the others are int64): ``ref_logps``, a reference
model's log-prob of each trained label (:mod:`tscale.tasks.reference`), and :data:`MARGINS`."""
_GROUP_FACTOR = 50  # length grouping sorts within "megabatches" of this many batches


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name in FLOAT_FIELDS else torch.int64


def _as_tensors(examples: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Each example's per-token fields as tensors (int64; float32 for :data:`FLOAT_FIELDS`),
    checked: equal, non-zero lengths."""
    out = []
    for i, ex in enumerate(examples):
        try:
            ids, labels = ex["input_ids"], ex["labels"]
        except KeyError as e:
            raise DataError(
                f"example {i} has no {e.args[0]!r}; examples come from Encoder.encode_example"
            ) from None
        if len(ids) != len(labels) or len(ids) == 0:
            raise DataError(
                f"example {i}: input_ids ({len(ids)}) and labels ({len(labels)}) "
                "must have the same non-zero length"
            )
        row = {}
        for name in _FIELDS:
            if name in ex:
                if len(ex[name]) != len(ids):
                    raise DataError(
                        f"example {i}: {name} has {len(ex[name])} entries, not {len(ids)}"
                    )
                row[name] = torch.as_tensor(ex[name], dtype=_dtype(name))
        out.append(row)
    fields = [tuple(r) for r in out]
    if fields and len(set(fields)) > 1:
        raise DataError("examples carry different fields (e.g. some have doc_ids, some not)")
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _collate(
    rows: Sequence[dict[str, torch.Tensor]],
    pad_id: int,
    pad_to_multiple_of: int,
    length: int | None = None,
) -> TensorDict:
    """Right-pad to ``length`` (None: the longest row rounded up to ``pad_to_multiple_of``);
    padded labels are -100, padded ``position_ids``/``doc_ids``/``branch_ids`` 0 (doc 0 is
    padding: no real token attends to it), padded ``ref_logps`` and ``margins`` 0.0."""
    if length is None:
        length = _round_up(max(r["input_ids"].numel() for r in rows), pad_to_multiple_of)
    out = {}
    for name in rows[0]:
        fill = pad_id if name == "input_ids" else _PAD_VALUES[name]
        t = torch.full((len(rows), length), fill, dtype=rows[0][name].dtype)
        for i, r in enumerate(rows):
            t[i, : r[name].numel()] = r[name]
        out[name] = t
    return TensorDict(out, batch_size=[len(rows)])


def collate_examples(
    examples: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> TensorDict:
    """One padded batch of examples (or packs) the way the train loader makes its batches:
    every per-token field they carry (:data:`_FIELDS`: ``branch_ids``, ``margins`` … int64,
    float32 for :data:`FLOAT_FIELDS`), right-padded to ``length`` (None: the longest rounded
    up to ``pad_to_multiple_of``).

    Raises:
        DataError: an example without ``input_ids``/``labels``, fields of unequal length,
            examples that carry different fields, or one longer than ``length``.
    """
    rows = _as_tensors(examples)
    if length is not None:
        longest = max(r["input_ids"].numel() for r in rows)
        if longest > length:
            raise DataError(f"a row has {longest} tokens, more than length {length}")
    return _collate(rows, pad_id, pad_to_multiple_of, length)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's permutation, stable across processes and Python versions."""
    digest = hashlib.sha256(f"tscale.loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_epoch(
    lengths: torch.Tensor,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    shuffle: bool,
    group_by_length: bool = False,
    longest_first: bool = False,
    max_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
    drop_last: bool = True,
) -> list[torch.Tensor]:
    """The global batches of one epoch, as tensors of example indices (pure and deterministic).

    With ``max_tokens`` a batch takes examples in order while ``rows * padded_longest <=
    max_tokens`` (at most ``batch_size`` rows; an example longer than the budget is a batch of its
    own) and the last, partial batch is kept; otherwise batches have exactly ``batch_size`` rows
    and the remainder of the epoch's order is dropped, or with ``drop_last=False`` made a last
    batch, completed with the epoch's first examples (every example trains each epoch; a few
    twice), so every batch still splits evenly over ranks and microbatches.
    """
    n = lengths.numel()
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if group_by_length:
        mega = _GROUP_FACTOR * batch_size
        parts = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            parts.append(chunk[torch.argsort(lengths[chunk], descending=True, stable=True)])
        order = torch.cat(parts) if parts else order
    if max_tokens is None:
        if not drop_last and n % batch_size:
            order = torch.cat([order, order[: batch_size - n % batch_size]])
        full = order.numel() // batch_size
        batches = list(order[: full * batch_size].split(batch_size))
    else:
        batches, current, longest = [], [], 0
        for i in order.tolist():
            longest_if = _round_up(max(longest, int(lengths[i])), pad_to_multiple_of)
            if current and (
                (len(current) + 1) * longest_if > max_tokens or len(current) == batch_size
            ):
                batches.append(torch.tensor(current))
                current, longest = [], 0
            current.append(i)
            longest = max(longest, int(lengths[i]))
        if current:
            batches.append(torch.tensor(current))
    if group_by_length and shuffle and len(batches) > 1:
        perm = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[j] for j in perm]
    if longest_first and epoch == 0 and batches:
        k = int(torch.argmax(torch.stack([lengths[b].max() for b in batches])))
        batches.insert(0, batches.pop(k))
    return batches


class BatchLoader:
    """Endless training batches with a cursor that resumes exactly, without replaying data.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (and optionally ``position_ids``,
            ``doc_ids`` for packed rows, ``branch_ids`` for group documents, see
            :mod:`tscale.data.groups`), all of one length per example.
        batch_size: rows per global batch (the most rows when ``max_tokens`` is set).
        seed: seeds every epoch's order together with the epoch number.
        shuffle: shuffle each epoch (else the given order).
        pad_id: padding token id.
        pad_to_multiple_of: pad each batch's length up to a multiple of this.
        group_by_length: sort within megabatches of 50 batches by length (less padding), then
            shuffle the batches.
        longest_first: put the batch with the longest example first in epoch 0.
        max_tokens: token-budget batching: at most this many padded tokens per global batch.
        rank, world_size: this process's share of each global batch (data parallelism).
        prefetch: batches collated ahead in a background thread (0: none).
        drop_last: drop the examples left over after the epoch's last full batch (True), or
            make them a last batch completed with the epoch's first examples (see
            :func:`plan_epoch`).

    Batches are TensorDicts of int64 ``[B, L]`` fields (float32 for :data:`FLOAT_FIELDS`, e.g.
    ``ref_logps``, added with :meth:`add_field`), right-padded (ids with ``pad_id``, labels with
    -100, ``position_ids``/``doc_ids``/``branch_ids`` with 0, ``ref_logps`` with 0.0).
    Iterating never ends; it starts at the cursor and moves it, so ``state_dict()`` taken after
    ``next(it)`` names the batch that comes next (prefetched batches do not move the cursor).
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        pad_id: int,
        pad_to_multiple_of: int = 8,
        group_by_length: bool = False,
        longest_first: bool = False,
        max_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(examples):
            raise DataError(
                f"batch_size {batch_size} is larger than the {len(examples)} examples; "
                "use a smaller batch size or more data"
            )
        if pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise DataError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every "
                "rank takes an equal share of each global batch"
            )
        if max_tokens is not None and world_size > 1:
            raise DataError(
                "token-budget batching (max_tokens) does not support world_size > 1 yet"
            )
        if max_tokens is not None and max_tokens < 1:
            raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0, got {prefetch}")
        self._rows = _as_tensors(examples)
        self._lengths = torch.tensor([r["input_ids"].numel() for r in self._rows])
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.longest_first = longest_first
        self.max_tokens = max_tokens
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self._epoch = 0
        self._index = 0
        self._moves = 0  # bumped by load_state_dict, so a live iterator drops its prefetch queue
        self._plans: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    @property
    def num_examples(self) -> int:
        """Examples the loader draws from."""
        return len(self._rows)

    @property
    def num_batches_per_epoch(self) -> int:
        """Global batches in the current epoch (fixed unless ``max_tokens`` is set)."""
        return len(self._plan(self._epoch))

    @property
    def rows(self) -> list[dict[str, torch.Tensor]]:
        """The examples as the loader holds them (per-token tensors), in their given order."""
        return self._rows

    def add_field(self, name: str, values: Sequence[Any]) -> None:
        """Give every example the per-token field ``name`` (one value per token; ``values[i]``
        for example ``i`` in the given order), carried by every batch from now on, padded and
        split with the others. Call it before iterating.

        Raises:
            DataError: ``name`` is not a known per-token field, or the values do not have one
                entry per example and token.
        """
        if name not in _PAD_VALUES:
            raise DataError(f"add_field: {name!r} is not a per-token field ({', '.join(_FIELDS)})")
        if len(values) != len(self._rows):
            raise DataError(
                f"add_field {name!r}: {len(values)} rows of values for {len(self._rows)} examples"
            )
        new = []
        for i, (row, v) in enumerate(zip(self._rows, values, strict=True)):
            t = torch.as_tensor(v, dtype=_dtype(name))
            if t.shape != row["input_ids"].shape:
                raise DataError(
                    f"add_field {name!r}: example {i} has {row['input_ids'].numel()} tokens but "
                    f"{tuple(t.shape)} values"
                )
            new.append(t)
        for row, t in zip(self._rows, new, strict=True):
            row[name] = t

    def _plan(self, epoch: int) -> list[torch.Tensor]:
        with self._lock:  # the prefetch thread plans too
            if epoch not in self._plans:
                if len(self._plans) >= 2:  # keep the current and the next epoch's plan
                    del self._plans[min(self._plans)]
                self._plans[epoch] = plan_epoch(
                    self._lengths,
                    seed=self.seed,
                    epoch=epoch,
                    batch_size=self.batch_size,
                    shuffle=self.shuffle,
                    group_by_length=self.group_by_length,
                    longest_first=self.longest_first,
                    max_tokens=self.max_tokens,
                    pad_to_multiple_of=self.pad_to_multiple_of,
                    drop_last=self.drop_last,
                )
            return self._plans[epoch]

    def _next_position(self, epoch: int, index: int) -> tuple[int, int]:
        index += 1
        if index == len(self._plan(epoch)):
            return epoch + 1, 0
        return epoch, index

    def _build(self, epoch: int, index: int) -> TensorDict:
        idx = self._plan(epoch)[index]
        share = len(idx) // self.world_size
        mine = idx[self.rank * share : (self.rank + 1) * share].tolist()
        return _collate([self._rows[i] for i in mine], self.pad_id, self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[TensorDict]:
        if self.prefetch == 0:
            while True:
                batch = self._build(self._epoch, self._index)
                # Advance before yielding, so state_dict() after next() points past this batch.
                self._epoch, self._index = self._next_position(self._epoch, self._index)
                yield batch
        yield from self._prefetching()

    def _prefetching(self) -> Iterator[TensorDict]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tscale-prefetch") as pool:
            queue: deque[tuple[tuple[int, int], Future]] = deque()
            moves = -1
            ahead = (self._epoch, self._index)
            while True:
                if moves != self._moves:  # cursor loaded: restart the queue from it
                    moves, queue = self._moves, deque()
                    ahead = (self._epoch, self._index)
                while len(queue) < self.prefetch + 1:
                    queue.append((ahead, pool.submit(self._build, *ahead)))
                    ahead = self._next_position(*ahead)
                position, future = queue.popleft()
                batch = future.result()
                self._epoch, self._index = self._next_position(*position)
                yield batch

    def state_dict(self) -> dict[str, int]:
        """The cursor: epoch and index of the next global batch, and the seed of the order."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Move the cursor to ``state`` directly (only that epoch's plan is computed).

        Raises:
            DataError: the seed differs from this loader's, or the position does not exist.
        """
        try:
            epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"bad loader state {state!r}: needs integer epoch, index, seed") from e
        if seed != self.seed:
            raise DataError(
                f"loader state was saved with seed {seed} but this loader has seed {self.seed}; "
                "resume with the same seed to get the same data order"
            )
        batches = len(self._plan(epoch)) if epoch >= 0 else 0
        if not 0 <= index < batches:
            raise DataError(
                f"loader state epoch {epoch}, index {index} is out of range: that epoch has "
                f"{batches} batches ({len(self._rows)} examples, batch size {self.batch_size}); "
                "did the data or the batch size change?"
            )
        self._epoch, self._index = epoch, index
        self._moves += 1


def with_logits_index(batch: TensorDict) -> TensorDict:
    """``batch`` with ``logits_index`` [B, M]: each row's trained positions (``labels != -100``)
    in order, padded with the row's last position, whose label is always -100; M is the most
    trained positions of any row (at least 1). The model then computes logits at those positions
    only and the loss reads the labels there (:func:`tscale.losses.lm.target_labels`): the same
    loss without the LM head's work on prompts and padding. Host-side, before the step (the
    shape depends on the data, so the step itself needs no host sync)."""
    labels = batch["labels"]
    trained = labels != IGNORE_INDEX
    counts = trained.sum(dim=1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    length = labels.shape[1]
    positions = torch.arange(length).expand_as(labels)
    first = torch.where(trained, positions, positions + length).argsort(dim=1)[:, :width]
    index = torch.where(torch.arange(width) < counts.unsqueeze(1), first, length - 1)
    out = batch.copy()
    out["logits_index"] = index
    return out


def batch_iter(
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    pad_id: int,
    pad_to_multiple_of: int = 8,
) -> Iterator[TensorDict]:
    """Batches of ``examples`` in their order, once, the last one possibly smaller (for eval).

    Arguments are checked at the call, not at the first ``next()``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if pad_to_multiple_of < 1:
        raise DataError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    rows = _as_tensors(examples)
    return (
        _collate(rows[start : start + batch_size], pad_id, pad_to_multiple_of)
        for start in range(0, len(rows), batch_size)
    )
