"""Sources: every file format loads through ``datasets``; bad inputs name the file and line;
mixtures follow their weights; fingerprints and the processed-data cache."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tscale.data.sources import (
    cached_map,
    fingerprint,
    load_source,
    mix_sources,
    normalize_weights,
    resolve_source,
)
from tscale.errors import DataError

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"prompt": "Say hi", "completion": "hi, there"},
]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"  # keep the datasets cache out of the home directory


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: ``datasets`` fails at once instead of retrying a network that is not there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the format of ``path``'s extension (txt: the prompts, one a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".csv":
        pa.csv.write_csv(pa.Table.from_pylist(rows), str(path))
    elif ext == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    elif ext == ".arrow":
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    elif ext == ".txt":
        path.write_text("".join(r["prompt"] + "\n" for r in rows))
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt"])
def test_every_format_loads(tmp_path, cache, ext):
    path = write(tmp_path / f"data{ext}", ROWS)
    ds = load_source(path, cache_dir=cache)
    if ext == ".txt":
        assert ds.to_list() == [{"text": r["prompt"]} for r in ROWS]
    else:
        assert ds.to_list() == ROWS


def test_directory_splits_from_file_names(tmp_path, cache):
    write(tmp_path / "d" / "train.jsonl", ROWS)
    write(tmp_path / "d" / "test.jsonl", ROWS[:1])
    (tmp_path / "d" / "README.md").write_text("# not data\n")  # ignored
    src = resolve_source(tmp_path / "d")
    assert (src.kind, src.builder, sorted(src.data_files)) == ("files", "json", ["test", "train"])
    assert len(load_source(tmp_path / "d", split="test", cache_dir=cache)) == 1
    assert len(load_source(tmp_path / "d", cache_dir=cache)) == 3
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_source(tmp_path / "d", split="validation", cache_dir=cache)
    write(tmp_path / "d" / "extra.jsonl", ROWS)  # neither train nor test: never dropped silently
    with pytest.raises(DataError, match=r"\['.*extra\.jsonl'\] match no split"):
        load_source(tmp_path / "d", cache_dir=cache)


def test_directory_without_split_names_is_train_and_lists_and_mappings(tmp_path, cache):
    a = write(tmp_path / "d" / "a.jsonl", ROWS[:2])
    b = write(tmp_path / "d" / "b.jsonl", ROWS[2:])
    assert load_source(tmp_path / "d", cache_dir=cache).to_list() == ROWS
    assert load_source([b, a], cache_dir=cache).to_list() == ROWS[2:] + ROWS[:2]
    ds = load_source({"train": [a], "eval": str(b)}, split="eval", cache_dir=cache)
    assert ds.to_list() == ROWS[2:]


def test_saved_dataset_directory(tmp_path, cache):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert resolve_source(tmp_path / "saved").kind == "saved"
    assert load_source(tmp_path / "saved").to_list() == ROWS
    assert list(load_source(tmp_path / "saved", streaming=True)) == ROWS


def test_missing_file_unsupported_type_empty_dir_and_mixed_formats(tmp_path, cache):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_source(tmp_path / "nope.jsonl", cache_dir=cache)
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"x\.xlsx: unsupported file type '\.xlsx'"):
        load_source(tmp_path / "x.xlsx", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no data files"):
        load_source(tmp_path / "empty", cache_dir=cache)
    write(tmp_path / "mix" / "a.jsonl", ROWS)
    write(tmp_path / "mix" / "b.csv", ROWS)
    with pytest.raises(DataError, match=r"mixes file formats \(csv: .*b\.csv, json: .*a\.jsonl\)"):
        load_source(tmp_path / "mix", cache_dir=cache)


def test_malformed_json_line_names_file_and_line(tmp_path, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", completion}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: invalid JSON line"):
        load_source(path, cache_dir=cache)
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: not a JSON object: a list"):
        load_source(path, cache_dir=cache)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.txt"])
def test_invalid_utf8_names_file_and_line(tmp_path, cache, name):
    path = tmp_path / name
    line = b'{"prompt": "caf\xe9", "completion": "x"}' if name.endswith("jsonl") else b"caf\xe9"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n' + line + b"\n")
    where = name.replace(".", "[.]")
    with pytest.raises(DataError, match=rf"{where}:line 2: invalid UTF-8: byte 0xe9"):
        load_source(path, cache_dir=cache)


def test_empty_file_is_a_data_error(tmp_path, cache):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl is empty"):
        load_source(tmp_path / "e.jsonl", cache_dir=cache)


def test_offline_hub_name_is_a_clear_data_error(offline, cache):
    with pytest.raises(DataError, match=r"Hub is unreachable.*Pass local files"):
        load_source("someone/some-dataset", cache_dir=cache)


@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "prompt": st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))),
                "n": st.integers(-1000, 1000),
            }
        ),
        min_size=1,
        max_size=6,
    ),
    ext=st.sampled_from([".jsonl", ".parquet", ".arrow"]),
)
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_streaming_gives_the_same_records_as_map_style(tmp_path_factory, rows, ext):
    tmp = tmp_path_factory.mktemp("stream")
    path = write(tmp / f"data{ext}", rows)
    mapped = load_source(path, cache_dir=tmp / "cache").to_list()
    streamed = list(load_source(path, streaming=True, cache_dir=tmp / "cache"))
    assert mapped == streamed == rows


# ---------------------------------------------------------------------------------------------
# Mixtures
# ---------------------------------------------------------------------------------------------


def _src(tag: str, n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"src": [tag] * n, "i": list(range(n))})


@pytest.mark.parametrize("streaming", [False, True])
def test_mixture_follows_the_weights(streaming):
    mixed = mix_sources([(_src("a", 600), 3.0), (_src("b", 600), 1.0)], seed=0, streaming=streaming)
    assert isinstance(mixed, datasets.IterableDataset) == streaming
    first = [r["src"] for _, r in zip(range(400), mixed, strict=False)]
    share = collections.Counter(first)["a"] / len(first)
    assert abs(share - 0.75) < 0.07, share
    again = mix_sources([(_src("a", 600), 3.0), (_src("b", 600), 1.0)], seed=0, streaming=streaming)
    assert [r["src"] for _, r in zip(range(400), again, strict=False)] == first  # seeded


def test_mixture_with_all_exhausted_sees_every_row():
    mixed = mix_sources([(_src("a", 20), 1), (_src("b", 5), 1)], seed=1, streaming=False)
    seen = {(r["src"], r["i"]) for r in mixed}
    assert seen == {("a", i) for i in range(20)} | {("b", i) for i in range(5)}


@pytest.mark.parametrize("weights", [[], [1.0, 0.0], [1.0, -2.0], [float("nan"), 1.0], ["1", 1]])
def test_bad_weights_are_data_errors(weights):
    with pytest.raises(DataError, match=r"mixture|weight"):
        normalize_weights(weights)


def test_normalized_weights_sum_to_one():
    assert normalize_weights([2, 6]) == [0.25, 0.75]


def test_mixture_rejects_different_columns_and_stray_streams():
    other = datasets.Dataset.from_dict({"text": ["x"]})
    with pytest.raises(DataError, match=r"different columns.*canonicalize"):
        mix_sources([(_src("a", 3), 1), (other, 1)], seed=0, streaming=False)
    stream = _src("a", 3).to_iterable_dataset()
    with pytest.raises(DataError, match=r"#0 is streaming.*streaming=False"):
        mix_sources([(stream, 1), (_src("b", 3), 1)], seed=0, streaming=False)


# ---------------------------------------------------------------------------------------------
# Fingerprint and cache
# ---------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sees_changes(tmp_path):
    f = write(tmp_path / "a.jsonl", ROWS)
    spec = {"template": "chatml", "max_length": 64}
    first = fingerprint(spec, [f])
    assert fingerprint(dict(reversed(spec.items())), [f]) == first  # key order does not matter
    assert len(first) == 64
    assert fingerprint({**spec, "max_length": 65}, [f]) != first
    st_ = f.stat()
    f.write_text(f.read_text().replace("Paris", "Rome!"))  # same size
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # and the same mtime
    assert f.stat().st_size == st_.st_size
    assert fingerprint(spec, [f]) != first
    with pytest.raises(DataError, match=r"cannot fingerprint .*gone\.jsonl"):
        fingerprint(spec, [tmp_path / "gone.jsonl"])


def test_fingerprint_reads_only_head_and_tail_of_big_files(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))
    before = fingerprint({}, [big])
    with big.open("r+b") as f:  # a byte in the unread middle, mtime restored: not seen (by design)
        st_ = big.stat()
        f.seek(3 << 19)
        f.write(b"x")
    os.utime(big, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert fingerprint({}, [big]) == before
    os.utime(big, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))  # touched: seen
    assert fingerprint({}, [big]) != before


def test_cached_map_skips_work_on_a_hit(tmp_path):
    calls = collections.Counter()

    def shout(row: dict) -> dict:
        calls["n"] += 1
        return {"loud": row["prompt"].upper()}

    ds = datasets.Dataset.from_list(ROWS)
    fp = fingerprint({"fn": "shout"}, [])
    kw = {"cache_dir": tmp_path / "c", "fingerprint": fp, "desc": "shout"}
    first = cached_map(ds, shout, remove_columns=ds.column_names, **kw)
    assert calls["n"] == 3
    second = cached_map(ds, shout, remove_columns=ds.column_names, **kw)
    assert calls["n"] == 3  # nothing recomputed
    assert first.to_list() == second.to_list() == [{"loud": r["prompt"].upper()} for r in ROWS]
    cached_map(ds, shout, **{**kw, "fingerprint": fingerprint({"fn": "shout", "v": 2}, [])})
    assert calls["n"] == 6  # a new fingerprint recomputes
    with pytest.raises(DataError, match=r"map-style Dataset"):
        cached_map(ds.to_iterable_dataset(), shout, **kw)
    with pytest.raises(DataError, match=r"not a hex digest"):
        cached_map(ds, shout, **{**kw, "fingerprint": "../x"})
