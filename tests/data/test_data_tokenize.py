"""Tokenizer training and caching; the encoder's ids and pre-shifted labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

import tscale.data.tokenize as tokenize_mod
from tscale.core.result import Err, Ok
from tscale.data import (
    IGNORE_INDEX,
    TASKS,
    Encoder,
    generate,
    load_or_train_tokenizer,
    train_tokenizer,
    write_jsonl,
)
from tscale.errors import DataError

VOCAB = 384


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    recs = generate(list(TASKS), 3000, seed=0, min_items=3, max_items=8)
    texts = (r["prompt"] + r["completion"] for r in recs)
    return Encoder.from_tokenizer(train_tokenizer(texts, VOCAB))


def test_special_tokens_and_vocab(encoder):
    assert (encoder.pad_id, encoder.bos_id, encoder.eos_id) == (0, 1, 2)
    assert encoder.vocab_size == VOCAB


def test_each_item_is_one_token(encoder):
    tok = encoder.tokenizer
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        assert len(tok.encode(" " + ch).ids) == 1, ch
    rec = {"prompt": "reverse: c a t", "completion": " t a c"}
    assert tok.encode(rec["completion"]).tokens == ["Ġt", "Ġa", "Ġc"]
    assert tok.encode("sort: 3 1 2").tokens[-3:] == ["Ġ3", "Ġ1", "Ġ2"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_round_trip_generated(encoder, seed):
    for r in generate(list(TASKS), 20, seed=seed, min_items=2, max_items=12):
        for text in (r["prompt"], r["completion"], r["prompt"] + r["completion"]):
            assert encoder.decode(encoder.tokenizer.encode(text).ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40).filter(lambda s: "<|" not in s))
def test_round_trip_any_text(encoder, text):
    # Byte-level: every string encodes (all 256 bytes are in the alphabet), no prefix space.
    assert encoder.decode(encoder.tokenizer.encode(text).ids) == text


def test_labels_handwritten(encoder):
    t = encoder.tokenizer.token_to_id
    result = encoder.encode_example({"prompt": "sort: 3 1 2", "completion": " 1 2 3"}, 64)
    assert isinstance(result, Ok)
    bos, eos, m = encoder.bos_id, encoder.eos_id, IGNORE_INDEX
    # positions:  0     1        2       3        4        5        6        7        8        9
    # ids:       bos  sort      :      Ġ3       Ġ1       Ġ2     | Ġ1       Ġ2       Ġ3      eos
    assert result.value["input_ids"] == [
        bos, t("sort"), t(":"), t("Ġ3"), t("Ġ1"), t("Ġ2"), t("Ġ1"), t("Ġ2"), t("Ġ3"), eos,
    ]  # fmt: skip
    # labels[t] = ids[t+1] where ids[t+1] is completion or eos: position 5 (last prompt token)
    # predicts the first completion token; the last position predicts nothing.
    assert result.value["labels"] == [m, m, m, m, m, t("Ġ1"), t("Ġ2"), t("Ġ3"), eos, m]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_label_shift_property(encoder, seed):
    for r in generate(list(TASKS), 10, seed=seed, min_items=2, max_items=8):
        ex = encoder.encode_example(r, 64).value
        ids, labels = ex["input_ids"], ex["labels"]
        n_completion = len(encoder.tokenizer.encode(r["completion"]).ids)
        assert len(ids) == len(labels)
        assert ids[0] == encoder.bos_id and ids[-1] == encoder.eos_id
        assert labels[-1] == IGNORE_INDEX
        trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
        assert len(trained) == n_completion + 1
        assert trained == list(range(len(ids) - 2 - n_completion, len(ids) - 1))  # contiguous
        assert all(labels[i] == ids[i + 1] for i in trained)
        assert encoder.decode([labels[i] for i in trained]) == r["completion"]
        # The prompt part of the ids is exactly encode_prompt.
        prompt_ids = encoder.encode_prompt(r["prompt"])
        assert ids[: len(prompt_ids)] == prompt_ids
        assert len(prompt_ids) == trained[0] + 1


def test_too_long_is_an_error_with_the_length(encoder):
    rec = {"prompt": "reverse: a b c d", "completion": " d c b a"}
    n = len(encoder.encode_example(rec, 1000).value["input_ids"])
    assert isinstance(encoder.encode_example(rec, n), Ok)
    err = encoder.encode_example(rec, n - 1, where="f.jsonl:row 4")
    assert err == Err(f"too long: {n} tokens > max_length {n - 1}", rec, "f.jsonl:row 4")


def test_bad_records_are_errors(encoder):
    assert encoder.encode_example({"prompt": 3, "completion": " x"}, 64).reason == (
        "prompt not a string"
    )
    assert encoder.encode_example({"prompt": "p", "completion": ""}, 64).reason == (
        "completion empty"
    )


def test_encode_batch_equals_encode_example(encoder):
    recs = generate(list(TASKS), 200, seed=5, min_items=3, max_items=8)
    recs.insert(7, {"prompt": None, "completion": " x"})
    wheres = [f"d.jsonl:row {i + 1}" for i in range(len(recs))]
    batch = encoder.encode_batch(recs, 16, wheres)
    single = [encoder.encode_example(r, 16, w) for r, w in zip(recs, wheres, strict=True)]
    assert batch == single
    assert any(isinstance(x, Err) and x.reason.startswith("too long") for x in batch)
    assert batch[7] == Err("prompt missing", recs[7], "d.jsonl:row 8")


def _jsonl(tmp_path: Path, name: str, seed: int) -> Path:
    recs = generate(["reverse", "sort"], 500, seed=seed, min_items=3, max_items=6)
    return write_jsonl(recs, tmp_path / name)


def test_load_or_train_caches(tmp_path, monkeypatch):
    data = _jsonl(tmp_path, "train.jsonl", 0)
    cache = tmp_path / "cache"
    first = load_or_train_tokenizer(None, [data], VOCAB, cache)
    cached = list(cache.glob("tokenizer-*.json"))
    assert len(cached) == 1 and len(cached[0].stem) == len("tokenizer-") + 64

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tokenize_mod, "train_tokenizer", no_training)
    second = load_or_train_tokenizer(None, [data], VOCAB, cache)
    assert second.get_vocab() == first.get_vocab()
    assert second.to_str() == first.to_str()
    monkeypatch.undo()

    # Another vocab size or other contents: another fingerprint, another file.
    load_or_train_tokenizer(None, [data], VOCAB + 16, cache)
    load_or_train_tokenizer(None, [_jsonl(tmp_path, "other.jsonl", 1)], VOCAB, cache)
    assert len(list(cache.glob("tokenizer-*.json"))) == 3
    assert not list(cache.glob(".*.tmp"))


def test_load_given_path(tmp_path):
    data = _jsonl(tmp_path, "train.jsonl", 0)
    trained = load_or_train_tokenizer(None, [data], VOCAB, tmp_path / "cache")
    path = tmp_path / "tok.json"
    trained.save(str(path))
    loaded = load_or_train_tokenizer(str(path), [], VOCAB, tmp_path / "unused")
    assert loaded.get_vocab() == trained.get_vocab()
    assert not (tmp_path / "unused").exists()


def test_loaded_tokenizer_without_special_tokens(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|pad|>"])
    path = tmp_path / "tok.json"
    tok.save(str(path))
    with pytest.raises(DataError, match=r"lacks the special token\(s\) \['<\|bos\|>', '<\|eos"):
        load_or_train_tokenizer(path, [], VOCAB, tmp_path)
    with pytest.raises(DataError, match="lacks the special token"):
        Encoder.from_tokenizer(tok)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_or_train_tokenizer(tmp_path / "missing.json", [], VOCAB, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_or_train_tokenizer(bad, [], VOCAB, tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_or_train_tokenizer(None, [tmp_path / "missing.jsonl"], VOCAB, tmp_path)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], 100)
