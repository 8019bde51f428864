"""An endless, resumable train loader over a stream of records: prepare and pack on the fly.

:class:`StreamingBatchLoader` pulls records from a stream in chunks, turns each chunk into
tokenized examples with a ``prepare`` function (the same stages as the in-memory path), packs
them with a :class:`~tscale.data.pack.StreamingPacker` (a bounded buffer of open rows) or uses
them as they are, and yields padded TensorDict batches of ``batch_size`` rows. When the stream
ends the packer is flushed and the next epoch re-opens the stream.

The cursor (:meth:`~StreamingBatchLoader.state_dict`) is plain JSON-able data: the epoch, the
records read in it, the packer's open rows and the examples made but not yet batched. A loader
given it by :meth:`~StreamingBatchLoader.load_state_dict` re-opens the stream, skips the records
already read and yields exactly the batches an uninterrupted loader would have yielded.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tensordict import TensorDict

from tscale.core.result import Err, Ok
from tscale.data.loader import _as_tensors, _collate
from tscale.data.pack import StreamingPacker
from tscale.errors import DataError

_STATE_FORMAT = "tscale.data.stream.StreamingBatchLoader/1"

Row = Ok[dict] | Err
"""A record read from the stream, already checked (``Err`` rows go to ``on_errors``)."""


class StreamingBatchLoader:
    """Batches from ``open_stream(epoch)``, prepared in chunks and optionally packed.

    Args:
        open_stream: ``epoch -> iterable of (Ok(record) | Err, where)``; the same epoch must give
            the same rows in the same order (that is what makes resume exact).
        prepare: ``(records, places) -> [Ok(example) | Err]``, one result per record.
        batch_size: rows per batch.
        pad_id: padding token id.
        packing: pack examples into rows of ``max_length`` tokens (else one example per row).
        max_length: the packed row length.
        buffer_size: open rows of the streaming packer.
        split_overflow: split examples longer than ``max_length`` (else dropped and counted).
        chunk_rows: records prepared at once.
        on_errors: called with the ``Err`` results of each chunk (to quarantine and count them)
            and the number of rows read in that chunk.
        pad_to_multiple_of: rows are padded to a multiple of this.
        empty_hint: what the error for an epoch without a usable example adds (where the rows
            went: the quarantine and dropped-rows files).
        rank, world_size: data parallelism. Every rank reads and packs the same stream into the
            same global batches of ``batch_size`` rows and keeps its contiguous
            ``batch_size / world_size`` of them, so the batches (and the cursor, identical on
            every rank) are those of one process: curves match it and a checkpoint resumes on
            any world size. The reading and preparation are repeated on every rank.
    """

    def __init__(
        self,
        open_stream: Callable[[int], Iterable[tuple[Row, str]]],
        prepare: Callable[[Sequence[dict], Sequence[str]], list[Ok[dict] | Err]],
        *,
        batch_size: int,
        pad_id: int,
        packing: bool,
        max_length: int,
        buffer_size: int = 256,
        split_overflow: bool = False,
        chunk_rows: int = 256,
        on_errors: Callable[[list[Err], int], None] | None = None,
        pad_to_multiple_of: int = 8,
        rank: int = 0,
        world_size: int = 1,
        empty_hint: str = "see the quarantine file for the reasons",
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("chunk_rows", chunk_rows),
            ("pad_to_multiple_of", pad_to_multiple_of),
        ):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise DataError(
                f"rank {rank} of world_size {world_size}: the batch of {batch_size} rows must "
                "split into equal rank shares"
            )
        self.rank, self.world_size = rank, world_size
        self._open = open_stream
        self._prepare = prepare
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.max_length = max_length
        self.buffer_size = buffer_size
        self.split_overflow = split_overflow
        self.chunk_rows = chunk_rows
        self.pad_to_multiple_of = pad_to_multiple_of
        self._on_errors = on_errors
        self._empty_hint = empty_hint
        self._epoch = 0
        self._rows = 0  # rows of this epoch read so far
        self._ready: deque[dict] = deque()
        self._packer = self._new_packer()
        self._stream: Iterator[tuple[Row, str]] | None = None
        self._made_in_epoch = 0

    def _new_packer(self) -> StreamingPacker | None:
        if not self.packing:
            return None
        return StreamingPacker(
            self.max_length, self.buffer_size, split_overflow=self.split_overflow
        )

    def _pull(self) -> None:
        """Read one chunk (or end the epoch) and add what it makes to the ready queue."""
        if self._stream is None:
            stream = iter(self._open(self._epoch))
            self._stream = itertools.islice(stream, self._rows, None)  # skip rows already read
        chunk = list(itertools.islice(self._stream, self.chunk_rows))
        if not chunk:  # the epoch is over
            if self._packer is not None:
                self._ready.extend(self._packer.flush())
            if self._made_in_epoch == 0 and not self._ready:
                raise DataError(
                    f"epoch {self._epoch} of the data stream gave no usable training example "
                    f"({self._rows} rows read); {self._empty_hint}"
                )
            self._epoch, self._rows, self._stream, self._made_in_epoch = self._epoch + 1, 0, None, 0
            return
        self._rows += len(chunk)
        errors = [row for row, _ in chunk if isinstance(row, Err)]
        good = [(row.value, where) for row, where in chunk if isinstance(row, Ok)]
        results = self._prepare([r for r, _ in good], [w for _, w in good]) if good else []
        errors += [r for r in results if isinstance(r, Err)]
        if self._on_errors is not None:
            self._on_errors(errors, len(chunk))
        for res in results:
            if isinstance(res, Ok):
                self._made_in_epoch += 1
                if self._packer is None:
                    self._ready.append(res.value)
                else:
                    self._ready.extend(self._packer.push(res.value))

    def _next_batch(self) -> TensorDict:
        while len(self._ready) < self.batch_size:
            self._pull()
        rows = [self._ready.popleft() for _ in range(self.batch_size)]
        share = self.batch_size // self.world_size
        mine = rows[self.rank * share : (self.rank + 1) * share]
        return _collate(_as_tensors(mine), self.pad_id, self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[TensorDict]:
        while True:
            yield self._next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The cursor: epoch, rows read, open packer rows and examples not yet batched."""
        return {
            "format": _STATE_FORMAT,
            "epoch": self._epoch,
            "rows": self._rows,
            "made_in_epoch": self._made_in_epoch,
            "packer": self._packer.state_dict() if self._packer is not None else None,
            "ready": [{k: list(v) for k, v in ex.items()} for ex in self._ready],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader with the same settings).

        Raises:
            DataError: the state is not a streaming loader's, or was saved with other settings.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise DataError(
                "the checkpoint's data cursor is not a streaming loader's: it was saved with "
                "data.streaming false; resume with the same data settings"
            )
        if (state["packer"] is None) != (self._packer is None):
            raise DataError(
                "the checkpoint's data cursor was saved with data.packing.enabled "
                f"{state['packer'] is not None}; resume with the same data settings"
            )
        packer = self._new_packer()
        if packer is not None:
            packer.load_state_dict(state["packer"])
        try:
            self._epoch, self._rows = int(state["epoch"]), int(state["rows"])
            self._made_in_epoch = int(state["made_in_epoch"])
            self._ready = deque(dict(ex) for ex in state["ready"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"bad streaming loader state: {e}") from e
        self._packer = packer
        self._stream = None
