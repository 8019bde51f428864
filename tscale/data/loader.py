"""Padded TensorDict batches: an endless, resumable, deterministic train loader; eval batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tensordict import TensorDict

from tscale.data.tokenize import IGNORE_INDEX
from tscale.errors import DataError


def _as_tensors(examples: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each example's ``(input_ids, labels)`` as int64 tensors, checked: equal, non-zero length."""
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
        ids_t = torch.as_tensor(ids, dtype=torch.int64)
        out.append((ids_t, torch.as_tensor(labels, dtype=torch.int64)))
    return out


def _collate(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int, pad_to_multiple_of: int
) -> TensorDict:
    """Right-pad to the longest row rounded up to ``pad_to_multiple_of``; padded labels are -100."""
    longest = max(ids.numel() for ids, _ in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : ids.numel()] = ids
        labels[r, : lab.numel()] = lab
    return TensorDict({"input_ids": input_ids, "labels": labels}, batch_size=[len(rows)])


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's permutation, stable across processes and Python versions."""
    digest = hashlib.sha256(f"tscale.loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchLoader:
    """Endless training batches with a cursor that resumes exactly, without replaying data.

    Epoch ``e`` visits the examples in the order of ``torch.randperm`` seeded from
    ``(seed, e)`` (or in their given order when ``shuffle`` is False) and cuts it into
    ``len(examples) // batch_size`` full batches: the last ``len(examples) % batch_size``
    examples of each epoch's order are dropped, so every batch has ``batch_size`` rows. (With
    shuffling, a different remainder is dropped each epoch; without it, always the same one.)

    Iterating never ends; it starts at the cursor and moves it, so ``state_dict()`` taken after
    ``next(it)`` names the batch that comes next. Batches are TensorDicts
    ``{"input_ids", "labels"}`` of int64 ``[B, L]``, right-padded (ids with ``pad_id``, labels
    with -100) to the batch's longest example rounded up to ``pad_to_multiple_of``.
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
        self._rows = _as_tensors(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self._epoch = 0
        self._index = 0

    @property
    def num_examples(self) -> int:
        """Examples the loader draws from."""
        return len(self._rows)

    @property
    def num_batches_per_epoch(self) -> int:
        """Full batches in an epoch (the remainder is dropped)."""
        return len(self._rows) // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self._rows))
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(len(self._rows), generator=gen)

    def __iter__(self) -> Iterator[TensorDict]:
        order = self._order(self._epoch)
        order_epoch = self._epoch
        while True:
            if order_epoch != self._epoch:  # the cursor moved on (or was loaded) meanwhile
                order, order_epoch = self._order(self._epoch), self._epoch
            start = self._index * self.batch_size
            idx = order[start : start + self.batch_size].tolist()
            batch = _collate([self._rows[i] for i in idx], self.pad_id, self.pad_to_multiple_of)
            # Advance before yielding, so state_dict() after next() points past this batch.
            self._index += 1
            if self._index == self.num_batches_per_epoch:
                self._epoch, self._index = self._epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The cursor: epoch and index of the next batch, and the seed of the order."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Move the cursor to ``state`` directly (only that epoch's permutation is computed).

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
        if epoch < 0 or not 0 <= index < self.num_batches_per_epoch:
            raise DataError(
                f"loader state epoch {epoch}, index {index} is out of range: an epoch has "
                f"{self.num_batches_per_epoch} batches ({len(self._rows)} examples, batch size "
                f"{self.batch_size}); did the data or the batch size change?"
            )
        self._epoch, self._index = epoch, index


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
