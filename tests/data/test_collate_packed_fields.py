"""``collate_packed`` is the train loader's collation: reward pairs' float ``margins`` reach the
batch (float32, padded 0.0), equal to the loader's batch of the same packs; a field in some packs
only is refused."""

from __future__ import annotations

import pytest
import torch

from tscale.data.groups import group_document
from tscale.data.loader import batch_iter
from tscale.data.pack import collate_packed, pack_examples
from tscale.errors import DataError


def _pair(prompt: list[int], chosen: list[int], rejected: list[int], margin: float) -> dict:
    doc = group_document(prompt, [chosen, rejected], [1, 2], share_prompt=True)
    return {**doc, "margins": [margin] * len(doc["input_ids"])}


PAIRS = [
    _pair([5, 6, 7], [8, 9], [10], 0.5),
    _pair([11, 12], [13], [14, 15, 16], 2.25),
    _pair([17, 18, 19, 20], [21, 22, 23], [24], -1.0),
]


def test_margins_are_collated_as_the_loader_collates_them() -> None:
    packs, _ = pack_examples(PAIRS, 16)
    assert len(packs) >= 2 and all("margins" in p for p in packs)
    batch = collate_packed(packs, pad_id=0, length=16)
    assert batch["margins"].dtype == torch.float32 and batch["margins"].shape == (len(packs), 16)
    for r, p in enumerate(packs):
        n = len(p["input_ids"])
        assert batch["margins"][r, :n].tolist() == p["margins"]
        assert (batch["margins"][r, n:] == 0.0).all()
    # each pair's margin over its own document's tokens, as packed
    values = {m for p in packs for m in p["margins"]}
    assert values == {0.5, 2.25, -1.0}
    # the trainer's collation of the same packs gives the same batch, field for field
    (loaded,) = batch_iter(packs, len(packs), pad_id=0, pad_to_multiple_of=16)
    assert set(loaded.keys()) == set(batch.keys())
    for key in batch.keys():  # noqa: SIM118 - iterating a TensorDict walks its rows
        assert loaded[key].dtype == batch[key].dtype
        assert torch.equal(loaded[key], batch[key]), key


def test_margins_in_some_packs_only_are_refused() -> None:
    packs, _ = pack_examples(PAIRS, 16)
    plain = {k: v for k, v in packs[0].items() if k != "margins"}
    with pytest.raises(DataError, match="pack 1 has no margins but others have"):
        collate_packed([packs[0], plain], pad_id=0)
    with pytest.raises(DataError, match="more than length 4"):
        collate_packed(packs, pad_id=0, length=4)
