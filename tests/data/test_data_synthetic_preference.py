"""Synthetic preference and KTO records: one corrupted item, from the seed, reachable from YAML."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.config import load_config
from tscale.config.schema import Config
from tscale.data.synthetic import (
    RECORD_KINDS,
    TASKS,
    as_kind,
    corrupt_answer,
    generate,
    kto_records,
    preference_records,
)
from tscale.errors import ConfigError
from tscale.train.data_build import build_data, write_synthetic


def items(task: str, answer: str) -> list[str]:
    return list(answer.strip()) if task == "add" else answer.split()


def one_item_off(task: str, good: str, bad: str) -> str | None:
    """``"changed"`` / ``"swapped"`` when ``bad`` is ``good`` with one item changed or one
    adjacent pair swapped, else None."""
    a, b = items(task, good), items(task, bad)
    if len(a) != len(b) or a == b:
        return None
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(diff) == 1:
        return "changed"
    i = diff[0]
    if diff == [i, i + 1] and (a[i], a[i + 1]) == (b[i + 1], b[i]):
        return "swapped"
    return None


def written_like_an_answer(task: str, text: str) -> bool:
    if task == "add":
        digits = text[1:]
        return text[0] == " " and digits.isdigit() and (len(digits) == 1 or digits[0] != "0")
    alphabet = "abcdefghijklmnopqrstuvwxyz" if task == "reverse" else "0123456789"
    parts = text[1:].split(" ")
    return text[0] == " " and all(len(p) == 1 and p in alphabet for p in parts)


@settings(max_examples=40, deadline=None)
@given(
    tasks=st.lists(st.sampled_from(TASKS), min_size=1, max_size=3, unique=True),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    min_items=st.integers(2, 5),
    extra=st.integers(0, 4),
)
def test_pairs_prefer_the_answer_over_one_corrupted_item(tasks, n, seed, min_items, extra):
    sft = generate(tasks, n, seed=seed, min_items=min_items, max_items=min_items + extra)
    pairs = preference_records(sft, seed=seed)
    assert len(pairs) == len(sft)
    for r, p in zip(sft, pairs, strict=True):
        assert set(p) == {"prompt", "chosen", "rejected", "task", "answer"}
        assert (p["prompt"], p["chosen"], p["answer"], p["task"]) == (
            r["prompt"],
            r["completion"],
            r["completion"],
            r["task"],
        )
        assert one_item_off(p["task"], p["chosen"], p["rejected"]) is not None, p
        assert written_like_an_answer(p["task"], p["rejected"]), p
    assert preference_records(sft, seed=seed) == pairs  # a pure function of the seed


def test_both_corruptions_occur_and_the_seed_decides():
    sft = generate(["reverse", "sort", "add"], 300, seed=3, min_items=3, max_items=8)
    pairs = preference_records(sft, seed=3)
    kinds = Counter(one_item_off(p["task"], p["chosen"], p["rejected"]) for p in pairs)
    assert set(kinds) == {"changed", "swapped"} and min(kinds.values()) > 60
    other = preference_records(sft, seed=4)
    assert sum(a["rejected"] != b["rejected"] for a, b in zip(pairs, other, strict=True)) > 100
    # the draw follows the record, not its place in the list
    assert preference_records(sft[::-1], seed=3) == pairs[::-1]


def test_corrupting_answers_with_no_pair_to_swap():
    for seed in range(30):
        bad = corrupt_answer("sort", " 7 7 7", seed=seed, prompt="sort: 7 7 7")
        assert one_item_off("sort", " 7 7 7", bad) == "changed"
        one = corrupt_answer("reverse", " q", seed=seed, prompt="reverse: q")
        assert one != " q" and written_like_an_answer("reverse", one)
        # a sum keeps no leading zero: " 10" can only become " 1d" (d != 0) or " 20".." 90"
        ten = corrupt_answer("add", " 10", seed=seed, prompt="add: 3 + 7")
        assert written_like_an_answer("add", ten) and ten != " 10"
    with pytest.raises(ValueError, match="unknown synthetic task 'copy'"):
        corrupt_answer("copy", " a", seed=0, prompt="copy: a")
    with pytest.raises(ValueError, match="empty answer"):
        corrupt_answer("sort", " ", seed=0, prompt="sort: ")


@pytest.mark.parametrize("n", [1, 7, 100, 101])
def test_kto_records_are_half_desirable_per_task(n: int):
    sft = generate(["reverse", "sort"], n, seed=5, min_items=3, max_items=8)
    kto = kto_records(sft, seed=5)
    pairs = {p["prompt"]: p for p in preference_records(sft, seed=5)}
    for r, k in zip(sft, kto, strict=True):
        assert set(k) == {"prompt", "completion", "label", "task", "answer"}
        assert (k["prompt"], k["task"], k["answer"]) == (r["prompt"], r["task"], r["completion"])
        # undesirable: the same corrupted answer the pair rejects
        expected = r["completion"] if k["label"] else pairs[r["prompt"]]["rejected"]
        assert k["completion"] == expected
    for task in ("reverse", "sort"):
        labels = [k["label"] for k in kto if k["task"] == task]
        assert len(labels) // 2 <= sum(labels) <= (len(labels) + 1) // 2
    assert kto_records(sft, seed=5) == kto


def test_as_kind():
    sft = generate(["sort"], 10, seed=0, min_items=3, max_items=5)
    assert as_kind(sft, "sft", seed=0) == sft
    assert as_kind(sft, "preference", seed=0) == preference_records(sft, seed=0)
    assert as_kind(sft, "kto", seed=0) == kto_records(sft, seed=0)
    assert RECORD_KINDS == ("sft", "preference", "kto")
    with pytest.raises(ValueError, match="unknown synthetic record kind 'pairs'"):
        as_kind(sft, "pairs", seed=0)


# --------------------------------------------------------------------------------------------
# From YAML
# --------------------------------------------------------------------------------------------


def _config(tmp_path: Path, kind: str) -> Config:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
        "data:\n"
        f"  synthetic: {{kind: {kind}, num_train: 40, num_eval: 6, max_items: 5}}\n"
        "  tokenizer: {vocab_size: 300}\n"
        "  batch_size: 4\n"
        "  max_length: 32\n"
    )
    return load_config(yaml_file)


def test_the_kind_is_checked_at_load_time(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, "pairs")
    message = str(e.value)
    assert "data.synthetic.kind" in message and "c.yaml:3" in message
    assert "preference" in message and "kto" in message
    assert load_config(None).data.synthetic.kind == "sft"


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["preference", "kto"])
def test_the_kind_decides_the_records_written(tmp_path: Path, kind: str):
    train_file, eval_file = write_synthetic(_config(tmp_path, kind), tmp_path / kind)
    sft_train, sft_eval = write_synthetic(_config(tmp_path, "sft"), tmp_path / "sft")
    train, held_out = _records(train_file), _records(eval_file)
    assert (len(train), len(held_out)) == (40, 6)
    # the same problems as the sft kind of the same seed, as the record kind says
    assert train == as_kind(_records(sft_train), kind, seed=0)
    assert held_out == as_kind(_records(sft_eval), kind, seed=0)
    fields = {"preference": {"prompt", "chosen", "rejected", "task", "answer"}}
    fields["kto"] = {"prompt", "completion", "label", "task", "answer"}
    assert all(set(r) == fields[kind] for r in [*train, *held_out])
    if kind == "kto":
        assert sum(r["label"] for r in train) == 20
    else:
        assert all(one_item_off(r["task"], r["chosen"], r["rejected"]) for r in train)


def test_the_sft_kind_trains_as_before(tmp_path: Path):
    bundle = build_data(_config(tmp_path, "sft"), tmp_path / "run")
    assert len(bundle.train_examples) == 40
    assert all(set(r) == {"prompt", "completion", "task"} for r in bundle.eval_records)
