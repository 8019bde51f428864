"""Packing tokenized documents into rows of ``max_length`` tokens, each document isolated.

A pack is a dict of equal-length int lists: ``input_ids``, ``labels``, ``position_ids`` (0, 1, …
restarting at every document), ``doc_ids`` (1..k for the k documents of the pack; padding added by
:func:`collate_packed` gets 0) and, on request, ``cu_seqlens`` (``[0, n1, n1 + n2, …, total]``).
:mod:`tscale.models.transformer` lets token ``i`` attend to ``j`` only when ``j <= i`` and both have
the same ``doc_ids``, so a packed row computes exactly what its documents compute alone.

**What is masked.** Labels are pre-shifted (``labels[t]`` is the target of position ``t``), so the
only label that could reach into the next document is the one at a document's *last* position. The
packer sets it to -100 for every document segment. Documents from tscale's encoders already end in
-100 (nothing follows their last token), so for them packing changes no label and the packed loss
equals the sum of the per-document losses (tested); a label overwritten here is counted in
``PackReport.masked_boundary_labels``. No other label is touched, and no separator token is added:
a document takes exactly ``len(input_ids)`` positions of a row.

**Overflow.** A document longer than ``max_length`` is dropped and counted, or with
``split_overflow`` cut into chunks of ``max_length`` tokens (the last one shorter), each packed as
its own document: positions restart at 0 in every chunk, and by the rule above the label at each
chunk's last position is -100, so the first token of the next chunk is never a target (it would be
predicted across the cut, from a context the chunk does not see).

**Documents with their own layout.** An example may carry ``position_ids`` and/or ``branch_ids``
(a group document from :func:`tscale.data.groups.group_document`: a shared prompt and its
completions as branches). The packer keeps them as they are (instead of making positions
0, 1, ...) and packs ``branch_ids`` beside ``doc_ids`` (0 for documents without). Such a document
is never split: with ``split_overflow`` too, one longer than ``max_length`` is dropped and counted
in ``dropped_too_long``. A group document's float ``margins`` (a reward-model pair's margin on
each of its tokens) are packed the same way, 0.0 for documents without.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import numpy as np
import torch
from tensordict import TensorDict

from tscale.data.loader import collate_examples
from tscale.data.tokenize import IGNORE_INDEX
from tscale.errors import DataError


class Segment(NamedTuple):
    """A document (or a chunk of one) to pack: int64 arrays of one length. ``position_ids`` and
    ``branch_ids`` are the document's own (a group document, :mod:`tscale.data.groups`) or None
    (positions 0, 1, ... and branch 0 are made when packed); ``margins`` (float64) a reward
    pair's margin per token, or None (0.0 when packed)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray | None = None
    branch_ids: np.ndarray | None = None
    margins: np.ndarray | None = None


_OWN_FIELDS = ("position_ids", "branch_ids", "margins")
"""A document's own per-token fields, kept as they are by the packer (never split)."""
_FLOAT_OWN = frozenset({"margins"})


_STATE_FORMAT = "tscale.data.pack.StreamingPacker/1"


@attrs.frozen
class PackReport:
    """What a packer produced. ``fill_rate = tokens / (sequences * max_length)``.

    ``documents`` counts packed input examples (a split one once), ``segments`` the pieces
    packed (documents plus extra chunks), ``tokens`` the non-padding tokens of all packs.
    """

    max_length: int
    sequences: int = 0
    documents: int = 0
    segments: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    split_documents: int = 0
    dropped_too_long: int = 0
    dropped_empty: int = 0
    masked_boundary_labels: int = 0

    @property
    def padding(self) -> int:
        """Padding positions if every sequence is padded to ``max_length``."""
        return self.sequences * self.max_length - self.tokens

    @property
    def fill_rate(self) -> float:
        """Share of the ``sequences * max_length`` positions that hold tokens (0 when empty)."""
        slots = self.sequences * self.max_length
        return self.tokens / slots if slots else 0.0

    def __add__(self, other: PackReport) -> PackReport:
        if other.max_length != self.max_length:
            raise DataError(
                f"cannot add pack reports of max_length {self.max_length} and {other.max_length}"
            )
        fields = [f.name for f in attrs.fields(PackReport) if f.name != "max_length"]
        return PackReport(
            self.max_length, **{f: getattr(self, f) + getattr(other, f) for f in fields}
        )

    def summary(self) -> str:
        """One line for logs."""
        line = (
            f"{self.documents} documents in {self.sequences} sequences of {self.max_length} "
            f"tokens: fill {self.fill_rate:.1%} ({self.tokens} tokens, {self.padding} padding)"
        )
        extra = [
            f"{name.replace('_', ' ')}: {getattr(self, name)}"
            for name in ("split_documents", "dropped_too_long", "dropped_empty")
            if getattr(self, name)
        ]
        return line + (f"; {', '.join(extra)}" if extra else "")


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise DataError(f"max_length must be a positive int, got {max_length!r}")


def _segments(
    example: Mapping[str, Any], max_length: int, split_overflow: bool, index: int | str
) -> tuple[list[Segment], str]:
    """The segments of one example and what happened: ``ok``, ``split``, ``too_long``, ``empty``.

    Raises:
        DataError: the example lacks ``input_ids``/``labels`` or its fields differ in length.
    """
    try:
        ids, labels = example["input_ids"], example["labels"]
    except (KeyError, TypeError):
        raise DataError(
            f"example {index} has no 'input_ids' and 'labels'; pack tokenized examples"
        ) from None
    if len(ids) != len(labels):
        raise DataError(
            f"example {index}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length"
        )
    ids, labels = _int_array(ids, index, "input_ids"), _int_array(labels, index, "labels")
    own = {}
    for name in _OWN_FIELDS:
        if example.get(name) is not None:
            own[name] = _array(example[name], index, name, float_values=name in _FLOAT_OWN)
            if len(own[name]) != len(ids):
                raise DataError(
                    f"example {index}: {name} ({len(own[name])}) and input_ids ({len(ids)}) "
                    "differ in length"
                )
    n = len(ids)
    if n == 0:
        return [], "empty"
    if n <= max_length:
        return [Segment(ids, labels, *(own.get(name) for name in _OWN_FIELDS))], "ok"
    if not split_overflow or own:  # a document with its own layout is never cut
        return [], "too_long"
    chunks = [
        Segment(ids[i : i + max_length], labels[i : i + max_length])
        for i in range(0, n, max_length)
    ]
    return chunks, "split"


def _int_array(values: Any, index: int | str, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array (lists, tuples, tensors and arrays alike)."""
    return _array(values, index, name, float_values=False)


def _array(values: Any, index: int | str, name: str, *, float_values: bool) -> np.ndarray:
    """``values`` as a 1-D int64 (or float64) array (lists, tuples, tensors and arrays)."""
    dtype = np.float64 if float_values else np.int64
    try:
        out = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        what = "numbers" if float_values else "integers"
        raise DataError(f"example {index}: {name} are not {what} ({e})") from None
    if out.ndim != 1:
        raise DataError(f"example {index}: {name} must be a flat list, got shape {out.shape}")
    return out


def _assemble(segments: Sequence[Segment], with_cu_seqlens: bool) -> tuple[dict, int]:
    """One pack from its segments, and how many last-position labels had to be masked."""
    lengths = np.fromiter((len(s.input_ids) for s in segments), np.int64, count=len(segments))
    ends = np.cumsum(lengths)
    labels = np.concatenate([s.labels for s in segments])
    last = ends - 1  # the label here would target the first token after the document
    masked = int(np.count_nonzero(labels[last] != IGNORE_INDEX))
    labels[last] = IGNORE_INDEX
    positions = [
        np.arange(len(s.input_ids)) if s.position_ids is None else s.position_ids for s in segments
    ]
    pack = {
        "input_ids": np.concatenate([s.input_ids for s in segments]).tolist(),
        "labels": labels.tolist(),
        "position_ids": np.concatenate(positions).tolist(),
        "doc_ids": np.repeat(np.arange(1, len(segments) + 1), lengths).tolist(),
    }
    if any(s.branch_ids is not None for s in segments):
        pack["branch_ids"] = np.concatenate(
            [
                np.zeros(len(s.input_ids), np.int64) if s.branch_ids is None else s.branch_ids
                for s in segments
            ]
        ).tolist()
    if any(s.margins is not None for s in segments):
        pack["margins"] = np.concatenate(
            [np.zeros(len(s.input_ids)) if s.margins is None else s.margins for s in segments]
        ).tolist()
    if with_cu_seqlens:
        pack["cu_seqlens"] = [0, *ends.tolist()]
    return pack, masked


class _Counts:
    """Running totals behind a :class:`PackReport`."""

    def __init__(self, max_length: int) -> None:
        self.values = dict.fromkeys(
            [f.name for f in attrs.fields(PackReport) if f.name != "max_length"], 0
        )
        self.max_length = max_length

    def example(self, kind: str, n_segments: int) -> None:
        v = self.values
        if kind in ("ok", "split"):
            v["documents"] += 1
            v["segments"] += n_segments
            v["split_documents"] += kind == "split"
        elif kind == "too_long":
            v["dropped_too_long"] += 1
        else:
            v["dropped_empty"] += 1

    def pack(self, pack: dict, masked: int) -> None:
        v = self.values
        v["sequences"] += 1
        v["tokens"] += len(pack["input_ids"])
        v["trained_tokens"] += len(pack["labels"]) - pack["labels"].count(IGNORE_INDEX)
        v["masked_boundary_labels"] += masked

    def report(self) -> PackReport:
        return PackReport(self.max_length, **self.values)


class _CapacityIndex:
    """Open bins by remaining capacity ``1..L``, for best fit in O(log L).

    A segment tree over the capacities ``0..L`` holds in each node the number of open bins whose
    capacity lies in the node's range; the smallest capacity ``>= n`` that has a bin is found by
    one walk up from leaf ``n`` and one walk down, O(log L), and adding or removing a bin updates
    one leaf-to-root path, O(log L). Bins of equal capacity wait in a stack per capacity (the last
    pushed is taken first), so ties are broken deterministically.
    """

    def __init__(self, max_length: int) -> None:
        self._leaves = 1 << max_length.bit_length()  # > max_length: leaves 0..max_length exist
        self._count = [0] * (2 * self._leaves)
        self._stacks: dict[int, list[int]] = {}

    def _update(self, capacity: int, delta: int) -> None:
        i = self._leaves + capacity
        while i:
            self._count[i] += delta
            i >>= 1

    def push(self, bin_id: int, capacity: int) -> None:
        """Make ``bin_id`` available with ``capacity`` free positions."""
        self._stacks.setdefault(capacity, []).append(bin_id)
        self._update(capacity, 1)

    def pop_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return ``(bin_id, capacity)`` of the bin with least capacity ``>= need``."""
        count, leaves = self._count, self._leaves
        i = leaves + need
        if not count[i]:
            while i > 1:
                if not i & 1 and count[i + 1]:  # a left child whose right sibling has bins
                    i += 1
                    while i < leaves:  # descend to the leftmost leaf with a bin
                        i = 2 * i if count[2 * i] else 2 * i + 1
                    break
                i >>= 1
            else:
                return None
        capacity = i - leaves
        bin_id = self._stacks[capacity].pop()
        self._update(capacity, -1)
        return bin_id, capacity


def pack_examples(
    examples: Iterable[Mapping[str, Any]],
    max_length: int,
    *,
    split_overflow: bool = False,
    with_cu_seqlens: bool = False,
) -> tuple[list[dict], PackReport]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens by best-fit decreasing.

    Best-fit decreasing: take documents longest first and put each into the open row with the
    least free space that still holds it, opening a new row when none does.

    Complexity, for n documents and rows of L tokens: lengths are integers in 1..L, so a bucket
    sort orders the documents in O(n + L). Open rows live in a :class:`_CapacityIndex`, a segment
    tree over the free-space values 0..L (height ⌈log2(L + 1)⌉) whose nodes count the rows in
    their range. Placing a document of length m is one query "least free space >= m" (a walk
    up from leaf m to the first right sibling with rows, then down to its leftmost non-empty
    leaf: at most 2 log L steps), one removal and at most one re-insertion of the chosen row
    (one leaf-to-root path each, log L). Every document is placed once, so packing is
    O(n log L + L) time and O(n + L) memory, against O(n · rows) for a linear scan of the rows.

    Equal lengths keep their input order; packs come out in the order they were opened and hold
    their documents in the order they were placed.

    Returns:
        ``(packs, report)``; packs are unpadded (see :func:`collate_packed`).

    Raises:
        DataError: a bad ``max_length`` or an example without equal-length ``input_ids``/``labels``.
    """
    _check_max_length(max_length)
    counts = _Counts(max_length)
    segments: list[Segment] = []
    for i, ex in enumerate(examples):
        segs, kind = _segments(ex, max_length, split_overflow, i)
        counts.example(kind, len(segs))
        segments += segs
    by_length: list[list[int]] = [[] for _ in range(max_length + 1)]
    for i, seg in enumerate(segments):
        by_length[len(seg.input_ids)].append(i)
    bins: list[list[int]] = []
    index = _CapacityIndex(max_length)
    for n in range(max_length, 0, -1):
        for i in by_length[n]:
            found = index.pop_best_fit(n)
            if found is None:
                b, free = len(bins), max_length
                bins.append([])
            else:
                b, free = found
            bins[b].append(i)
            if free > n:
                index.push(b, free - n)
    packs = []
    for b in bins:
        pack, masked = _assemble([segments[i] for i in b], with_cu_seqlens)
        counts.pack(pack, masked)
        packs.append(pack)
    return packs, counts.report()


class _OpenBin:
    __slots__ = ("free", "segments", "tick")

    def __init__(self, segments: list[Segment], free: int, tick: int) -> None:
        self.segments = segments
        self.free = free
        self.tick = tick


class StreamingPacker:
    """Online best-fit packing of a stream with at most ``buffer_size`` open rows.

    ``push(example)`` places the example (or its chunks) into the open row with the least free
    space that holds it (O(log L), as in :func:`pack_examples`); when none does, a new row is
    opened, and if ``buffer_size`` rows are already open the fullest one is emitted first. A row
    that becomes exactly full is emitted at once; ``flush()`` emits the rest (oldest first). So at
    most ``buffer_size`` rows (``buffer_size * max_length`` tokens) are held.

    ``state_dict()`` holds the open rows and counters as plain lists and ints (JSON-serialisable);
    a packer given it by ``load_state_dict`` continues the stream exactly: the same later pushes
    give the same packs as an uninterrupted packer.
    """

    def __init__(
        self,
        max_length: int,
        buffer_size: int,
        *,
        split_overflow: bool = False,
        with_cu_seqlens: bool = False,
    ) -> None:
        _check_max_length(max_length)
        if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < 1:
            raise DataError(f"buffer_size must be a positive int, got {buffer_size!r}")
        self.max_length = max_length
        self.buffer_size = buffer_size
        self.split_overflow = split_overflow
        self.with_cu_seqlens = with_cu_seqlens
        self._reset()

    def _reset(self) -> None:
        self._bins: dict[int, _OpenBin] = {}
        self._index = _CapacityIndex(self.max_length)
        self._counts = _Counts(self.max_length)
        self._next_id = 0
        self._tick = 0
        self._pushed = 0

    @property
    def report(self) -> PackReport:
        """Totals so far (emitted packs; documents pushed, including those still open)."""
        return self._counts.report()

    @property
    def open_rows(self) -> int:
        """Rows held, waiting for more documents."""
        return len(self._bins)

    def _emit(self, segments: list[Segment]) -> dict:
        pack, masked = _assemble(segments, self.with_cu_seqlens)
        self._counts.pack(pack, masked)
        return pack

    def push(self, example: Mapping[str, Any]) -> list[dict]:
        """Add one tokenized example; returns the packs completed by it (often none).

        Raises:
            DataError: the example lacks equal-length ``input_ids``/``labels``.
        """
        segs, kind = _segments(example, self.max_length, self.split_overflow, self._pushed)
        self._pushed += 1
        self._counts.example(kind, len(segs))
        out = []
        for seg in segs:
            n = len(seg.input_ids)
            if n == self.max_length:
                out.append(self._emit([seg]))
                continue
            found = self._index.pop_best_fit(n)
            if found is None:
                if len(self._bins) >= self.buffer_size:
                    fullest = self._index.pop_best_fit(1)
                    assert fullest is not None  # every open row has free space
                    out.append(self._emit(self._bins.pop(fullest[0]).segments))
                b = self._next_id
                self._next_id += 1
                self._bins[b] = _OpenBin([], self.max_length, 0)
            else:
                b = found[0]
            row = self._bins[b]
            row.segments.append(seg)
            row.free -= n
            self._tick += 1
            row.tick = self._tick
            if row.free == 0:
                out.append(self._emit(self._bins.pop(b).segments))
            else:
                self._index.push(b, row.free)
        return out

    def flush(self) -> list[dict]:
        """Emit every open row, oldest first, and start empty (counters are kept)."""
        out = [self._emit(self._bins[b].segments) for b in sorted(self._bins)]
        self._bins = {}
        self._index = _CapacityIndex(self.max_length)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The open rows and counters, as plain data (a copy)."""
        rows = sorted(self._bins.items(), key=lambda item: item[1].tick)
        return {
            "format": _STATE_FORMAT,
            "max_length": self.max_length,
            "buffer_size": self.buffer_size,
            "split_overflow": self.split_overflow,
            "next_id": self._next_id,
            "tick": self._tick,
            "pushed": self._pushed,
            "rows": [
                {
                    "id": b,
                    "tick": row.tick,
                    "input_ids": [s.input_ids.tolist() for s in row.segments],
                    "labels": [s.labels.tolist() for s in row.segments],
                    **{
                        name: [_list_or_none(getattr(s, name)) for s in row.segments]
                        for name in _OWN_FIELDS
                    },
                }
                for b, row in rows
            ],
            "counts": dict(self._counts.values),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a packer with the same settings).

        Raises:
            DataError: the state is malformed or was saved with other settings.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise DataError(f"not a StreamingPacker state (format {_STATE_FORMAT!r} expected)")
        for name in ("max_length", "buffer_size", "split_overflow"):
            if state.get(name) != getattr(self, name):
                raise DataError(
                    f"packer state was saved with {name}={state.get(name)!r} but this packer has "
                    f"{getattr(self, name)!r}; resume with the same settings to get the same packs"
                )
        try:
            self._reset()
            self._next_id, self._tick = int(state["next_id"]), int(state["tick"])
            self._pushed = int(state["pushed"])
            for row in state["rows"]:  # saved in tick order: rebuilds each capacity's stack order
                n = len(row["input_ids"])
                own = [row.get(name) or [None] * n for name in _OWN_FIELDS]
                names = ("input_ids", "labels", *_OWN_FIELDS)
                segments = [
                    Segment(
                        *(
                            None
                            if f is None
                            else np.asarray(f, dtype=np.float64 if k in _FLOAT_OWN else np.int64)
                            for k, f in zip(names, seg, strict=True)
                        )
                    )
                    for seg in zip(row["input_ids"], row["labels"], *own, strict=True)
                ]
                if any(
                    f is not None and (f.ndim != 1 or len(f) != len(s.input_ids))
                    for s in segments
                    for f in s
                ):
                    raise ValueError(f"row {row['id']}: a segment's fields differ in shape")
                free = self.max_length - sum(len(s.input_ids) for s in segments)
                if not 0 < free < self.max_length:
                    raise ValueError(f"row {row['id']} holds {self.max_length - free} tokens")
                b = int(row["id"])
                self._bins[b] = _OpenBin(segments, free, int(row["tick"]))
                self._index.push(b, free)
            for name, value in state["counts"].items():
                if name not in self._counts.values:
                    raise ValueError(f"unknown counter {name!r}")
                self._counts.values[name] = int(value)
        except (KeyError, TypeError, ValueError) as e:
            self._reset()
            raise DataError(f"bad StreamingPacker state: {e}") from e


def _list_or_none(values: np.ndarray | None) -> list[int] | list[float] | None:
    return None if values is None else values.tolist()


_OPTIONAL_FIELDS = ("branch_ids", "margins", "ref_logps", "record_ids")
"""Per-token fields some packs may carry: all packs of a batch or none."""


def collate_packed(
    packs: Sequence[Mapping[str, Sequence[int]]],
    *,
    pad_id: int,
    length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> TensorDict:
    """A TensorDict batch ``{"input_ids", "labels", "position_ids", "doc_ids"}``, int64 ``[B, S]``,
    plus every other per-token field the packs carry (all packs or none): ``branch_ids`` (group
    documents), the float32 ``margins`` (reward-model pairs) … — the train loader's own
    collation (:func:`tscale.data.loader.collate_examples`), so a batch collated here is the
    batch the trainer would make.

    Rows are right-padded (``pad_id``, label -100, position 0, doc id 0, branch id 0, margin
    0.0) to ``length`` when given (a fixed shape, e.g. ``max_length``), else to the longest pack
    rounded up to ``pad_to_multiple_of``. Padding positions attend only to padding and carry no
    loss.

    Raises:
        DataError: no packs, a pack longer than ``length``, fields of unequal length, or a
            per-token field in some packs only.
    """
    if not packs:
        raise DataError("no packs to collate")
    if pad_to_multiple_of < 1:
        raise DataError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    for name in _OPTIONAL_FIELDS:
        carried = [name in p for p in packs]
        if any(carried) and not all(carried):
            raise DataError(
                f"pack {carried.index(False)} has no {name} but others have; collate group "
                "documents and plain ones (reward pairs and others) apart"
            )
    return collate_examples(
        [dict(p) for p in packs],
        pad_id=pad_id,
        length=length,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Varlen boundaries of a packed batch flattened to ``[B * S]``: ``(cu_seqlens, max_seqlen)``.

    A segment is a run of equal doc ids within a row (padding runs included, as their own
    segments), so ``cu_seqlens`` (int32) suits varlen attention kernels over the flat batch.
    """
    if doc_ids.dim() != 2:
        raise DataError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
    b, s = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True
    idx = starts.nonzero().squeeze(1)
    cu = torch.cat([idx, torch.tensor([b * s], device=idx.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if b * s else 0
