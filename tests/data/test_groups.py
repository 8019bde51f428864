"""Group documents (shared prompt, sibling completions): layout, packing, batches, mask rule."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.data.groups import group_document, single_document_row
from tscale.data.loader import batch_iter, with_logits_index
from tscale.data.pack import StreamingPacker, collate_packed, pack_examples
from tscale.data.tokenize import IGNORE_INDEX
from tscale.errors import DataError
from tscale.models.transformer import _doc_mask

X = IGNORE_INDEX

tokens = st.lists(st.integers(3, 60), min_size=1, max_size=9)


@st.composite
def groups(draw, min_branches: int = 2, max_branches: int = 3) -> tuple:
    """(prompt, completions, branches): 1-3 distinct branch ids in 1..4, random lengths."""
    branches = draw(
        st.lists(st.integers(1, 4), min_size=min_branches, max_size=max_branches, unique=True)
    )
    completions = [draw(tokens) for _ in branches]
    return draw(tokens), completions, branches


def test_shared_layout_of_a_pair():
    doc = group_document([10, 11, 12], [[20, 21], [30]], [1, 2], share_prompt=True)
    assert doc == {
        "input_ids": [10, 11, 12, 20, 21, 12, 30],
        "labels": [X, X, 20, 21, X, 30, X],
        "position_ids": [0, 1, 2, 3, 4, 2, 3],
        "branch_ids": [0, 0, 1, 1, 1, 2, 2],
    }


def test_separate_layout_of_a_pair():
    doc = group_document([10, 11], [[20, 21], [30]], [2, 1], share_prompt=False)
    assert doc == {
        "input_ids": [10, 11, 20, 21, 10, 11, 30],
        "labels": [X, 20, 21, X, X, 30, X],
        "position_ids": [0, 1, 2, 3, 0, 1, 2],
        "branch_ids": [2, 2, 2, 2, 1, 1, 1],
    }


def test_one_token_prompt_has_no_branch_zero():
    doc = group_document([7], [[8], [9]], [1, 2], share_prompt=True)
    assert doc["input_ids"] == [7, 8, 7, 9]
    assert doc["branch_ids"] == [1, 1, 2, 2]
    assert doc["position_ids"] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("prompt", "completions", "branches", "message"),
    [
        ([], [[1]], [1], "prompt_ids is empty"),
        ([1], [], [], "completions is empty"),
        ([1], [[2], []], [1, 2], "completion 1 is empty"),
        ([1], [[2], [3]], [1, 1], "distinct"),
        ([1], [[2], [3]], [0, 1], "ints >= 1"),
        ([1], [[2], [3]], [1], "2 completions but 1 branch ids"),
        ([1, -4], [[2]], [1], "int >= 0"),
        ([1], [["a"]], [1], "completion 0 must be a list of token ids"),
    ],
)
def test_bad_groups_are_one_clear_error(prompt, completions, branches, message):
    with pytest.raises(DataError, match=message):
        group_document(prompt, completions, branches, share_prompt=True)


@given(groups(min_branches=1), st.booleans())
def test_each_branch_is_its_prompt_plus_completion(group, share):
    """Reading a branch's tokens (branch 0 and its own) in order gives prompt + completion at
    positions 0.. (completion positions restart at P), its labels the completion alone."""
    prompt, completions, branches = group
    doc = group_document(prompt, completions, branches, share_prompt=share)
    n = len(doc["input_ids"])
    assert all(len(v) == n for v in doc.values())
    p = len(prompt)
    want_n = p - 1 + sum(len(c) + 1 for c in completions) if share else 0
    assert n == (want_n if share else sum(p + len(c) for c in completions))
    for comp, b in zip(completions, branches, strict=True):
        seen = [t for t in range(n) if doc["branch_ids"][t] in (0, b)]
        if not share:
            assert all(doc["branch_ids"][t] == b for t in seen)
        assert [doc["input_ids"][t] for t in seen] == prompt + comp
        assert [doc["position_ids"][t] for t in seen] == list(range(p + len(comp)))
        assert [doc["labels"][t] for t in seen if doc["labels"][t] != X] == comp
        own = [t for t in seen if doc["branch_ids"][t] == b]
        first_completion = own[-len(comp)]
        assert doc["position_ids"][first_completion] == p  # restarts at P
        assert doc["labels"][first_completion - 1] == comp[0]


# ------------------------------------------------------------------------------- packing


def _docs_of(row: dict) -> list[dict]:
    """The documents of a packed row, split by doc id, without doc_ids."""
    docs = {}
    for t, d in enumerate(row["doc_ids"]):
        entry = docs.setdefault(d, {k: [] for k in row if k != "doc_ids"})
        for k in entry:
            entry[k].append(row[k][t])
    return [docs[d] for d in sorted(docs)]


@settings(max_examples=40, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=8), st.booleans(), st.integers(40, 90))
def test_packers_keep_each_document_whole_and_its_own_fields(gs, share, max_length):
    docs = [group_document(*g, share_prompt=share) for g in gs]
    fitting = [d for d in docs if len(d["input_ids"]) <= max_length]
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    want = sorted(key(d) for d in fitting)
    packs, report = pack_examples(docs, max_length, split_overflow=True)
    assert report.dropped_too_long == len(docs) - len(fitting)  # never split, dropped
    streamer = StreamingPacker(max_length, buffer_size=2, split_overflow=True)
    streamed = []
    for i, d in enumerate(docs):
        streamed += streamer.push(d)
        if i == 2:  # resume from a JSON round trip of the state
            state = json.loads(json.dumps(streamer.state_dict()))
            streamer = StreamingPacker(max_length, buffer_size=2, split_overflow=True)
            streamer.load_state_dict(state)
    streamed += streamer.flush()
    for rows in (packs, streamed):
        for row in rows:
            assert len(row["input_ids"]) <= max_length
            ids = sorted(set(row["doc_ids"]))
            assert ids == list(range(1, len(ids) + 1))
            assert row["doc_ids"] == sorted(row["doc_ids"])  # each document contiguous
        assert sorted(key(d) for row in rows for d in _docs_of(row)) == want


def test_plain_documents_in_a_group_row_get_branch_zero_and_fresh_positions():
    group = group_document([5, 6], [[7], [8, 9]], [1, 2], share_prompt=True)
    plain = {"input_ids": [1, 2, 3], "labels": [2, 3, X]}
    (row,), _ = pack_examples([group, plain], 20)
    assert row["branch_ids"] == group["branch_ids"] + [0, 0, 0]
    assert row["position_ids"] == group["position_ids"] + [0, 1, 2]


def test_collation_pads_branch_ids_with_zero():
    docs = [group_document([5, 6, 7], [[8], [9, 10]], [1, 2], share_prompt=True)] * 3
    packs, _ = pack_examples(docs, 16)
    batch = collate_packed(packs, pad_id=0, length=16)
    assert batch["branch_ids"][0].tolist() == [0, 0, 1, 1, 2, 2, 2] * 2 + [0, 0]
    (loaded,) = batch_iter(packs, 2, pad_id=0, pad_to_multiple_of=8)
    assert torch.equal(loaded["branch_ids"], batch["branch_ids"])
    assert torch.equal(loaded["position_ids"], batch["position_ids"])
    unpacked = [single_document_row(d) for d in docs]
    (rows,) = batch_iter(unpacked, 3, pad_id=0)
    assert rows["doc_ids"][0].tolist() == [1] * 7 + [0]
    assert rows["branch_ids"][0].tolist() == [0, 0, 1, 1, 2, 2, 2, 0]
    with pytest.raises(DataError, match="no branch_ids"):
        collate_packed(
            [packs[0], {k: v for k, v in packs[0].items() if k != "branch_ids"}], pad_id=0
        )


@settings(max_examples=30, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=6), st.booleans(), st.booleans())
def test_logits_index_on_group_rows(gs, share, packed):
    """``with_logits_index`` needs no change: it lists every trained position, and its padding
    entries point at a position whose label is -100 (a document's last token or padding)."""
    docs = [group_document(*g, share_prompt=share) for g in gs]
    rows = pack_examples(docs, 96)[0] if packed else [single_document_row(d) for d in docs]
    (batch,) = batch_iter(rows, len(rows), pad_id=0, pad_to_multiple_of=1)
    index = with_logits_index(batch)["logits_index"]
    labels = batch["labels"]
    trained = labels != X
    got = labels.gather(1, index)
    assert (got != X).sum() == trained.sum()
    for r in range(labels.shape[0]):
        assert index[r, : int(trained[r].sum())].tolist() == trained[r].nonzero().flatten().tolist()
    assert (batch["branch_ids"].gather(1, index)[got != X] > 0).all()


# ------------------------------------------------------------------------------- the mask rule


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_mask_rule_equals_brute_force(data):
    b, s = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    cells = st.lists(st.lists(st.integers(0, 3), min_size=s, max_size=s), min_size=b, max_size=b)
    doc_ids, branch_ids = torch.tensor(data.draw(cells)), torch.tensor(data.draw(cells))
    want = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                bj, bi = int(branch_ids[r, j]), int(branch_ids[r, i])
                want[r, 0, i, j] = (
                    doc_ids[r, i] == doc_ids[r, j] and j <= i and (bj == 0 or bj == bi)
                )
    assert torch.equal(_doc_mask(doc_ids, branch_ids), want)
    no_docs = want | True
    for r in range(b):
        for i in range(s):
            for j in range(s):
                bj, bi = int(branch_ids[r, j]), int(branch_ids[r, i])
                no_docs[r, 0, i, j] = j <= i and (bj == 0 or bj == bi)
    assert torch.equal(_doc_mask(None, branch_ids), no_docs)


# ------------------------------------------------------------------------------- tokens saved


def test_shared_layout_saves_the_repeated_prompt():
    """Per group of n completions the shared layout stores P - 1 + sum(C_k + 1) tokens against
    n * P + sum(C_k): (n - 1) * (P - 1) fewer."""
    g = torch.Generator().manual_seed(0)
    saved = 0
    for _ in range(50):
        p, c1, c2 = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
        prompt, comps = [5] * p, [[6] * c1, [7] * c2]
        shared = len(group_document(prompt, comps, [1, 2], share_prompt=True)["input_ids"])
        separate = len(group_document(prompt, comps, [1, 2], share_prompt=False)["input_ids"])
        assert separate - shared == p - 1
        saved += p - 1
    assert saved > 0


def test_a_packer_state_without_the_new_fields_still_loads():
    """States saved before group documents (no position_ids/branch_ids per segment) resume."""
    packer = StreamingPacker(16, buffer_size=2)
    packer.push({"input_ids": [1, 2, 3], "labels": [2, 3, X]})
    state = packer.state_dict()
    for row in state["rows"]:
        del row["position_ids"], row["branch_ids"]
    again = StreamingPacker(16, buffer_size=2)
    again.load_state_dict(state)
    assert again.flush() == packer.flush()


def test_processed_cache_keeps_branch_ids():
    from tscale.train.data_sources import _flatten, _unflatten

    docs = [single_document_row(group_document([4, 5], [[6], [7, 8]], [1, 2], share_prompt=True))]
    assert _unflatten(_flatten(docs, "train_"), "train_") == docs
