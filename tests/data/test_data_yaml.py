"""The data keys from YAML, through the real loader and build_data, on real files on disk:
sources with weights, column_map, format, streaming, length budgets, max_error_rate and the
processed-data cache."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tscale.config import load_config
from tscale.core.result import Ok
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import get_template
from tscale.errors import ConfigError, DataError
from tscale.train.data_build import build_data


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _qa_rows(n: int, tag: str = "") -> list[dict]:
    return [
        {"prompt": f"{tag}what is {i} plus {i}? ", "completion": f"it is {2 * i}."}
        for i in range(n)
    ]


def _config(tmp_path: Path, yaml_text: str, max_length: int = 128):
    cfg_file = tmp_path / "cfg.yaml"
    run = tmp_path / "run"
    cfg_file.write_text(
        f"run:\n  output_dir: {run}\n"
        f"data:\n  tokenizer:\n    vocab_size: 300\n  max_length: {max_length}\n"
        "  batch_size: 4\n" + yaml_text
    )
    return load_config(cfg_file, []), run


def test_sources_mix_files_of_different_formats_by_weight(tmp_path: Path):
    qa = tmp_path / "qa.csv"
    with qa.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q_text", "a_text"])
        for i in range(40):
            w.writerow([f"csv question {i}? ", f"csv answer {i}."])
    alpaca = _jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": f"alpaca task {i}", "input": "", "output": f"done {i}."}
            for i in range(10)
        ],
    )
    cfg, run = _config(
        tmp_path,
        "  template: alpaca\n"
        "  sources:\n"
        f"    - {{path: {qa}, weight: 3, column_map: {{prompt: q_text, completion: a_text}}}}\n"
        f"    - {{path: {alpaca}, weight: 1}}\n",
        max_length=512,
    )
    bundle = build_data(cfg, run)
    rep = bundle.report
    assert [s["rows"] for s in rep["sources"]] == [40, 10]
    texts = [bundle.encoder.decode(e["input_ids"]) for e in bundle.train_examples]
    from_csv = sum("csv question" in t for t in texts)
    from_alpaca = sum("alpaca task" in t for t in texts)
    # all_exhausted: every row of both sources is seen; the small one is repeated.
    assert from_csv >= 40 and from_alpaca >= 10
    assert from_alpaca > 10  # repeated to keep its 1:3 share
    assert 0.15 < from_alpaca / len(texts) < 0.35


def test_sources_need_exactly_one_of_path_and_hf(tmp_path: Path):
    cfg, run = _config(tmp_path, "  sources:\n    - {weight: 1}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]: set exactly one of path and hf"):
        build_data(cfg, run)


def test_column_map_overrides_the_synonym_table(tmp_path: Path):
    rows = [
        {"prompt": "IGNORED", "question": f"q{i} ", "answer": f"a{i}", "completion": "NO"}
        for i in range(20)
    ]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    cfg, run = _config(
        tmp_path,
        f"  train_files: [{train}]\n  column_map: {{prompt: question, completion: answer}}\n",
    )
    bundle = build_data(cfg, run)
    text = bundle.encoder.decode(bundle.train_examples[0]["input_ids"])
    assert text.startswith("q0 a0") and "IGNORED" not in text


def test_unknown_columns_name_the_key_to_set(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", [{"foo": "x", "bar": "y"}] * 5)
    cfg2, run2 = _config(tmp_path, f"  sources: [{{path: {train}}}]\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\].*column_map"):
        build_data(cfg2, run2)
    cfg3, run3 = _config(
        tmp_path, f"  sources: [{{path: {train}, column_map: {{prompt: nope}}}}]\n"
    )
    with pytest.raises(ConfigError, match=r"data\.sources\[0\].*'nope'"):
        build_data(cfg3, run3)


def test_format_forces_the_record_shape(tmp_path: Path):
    rows = [{"instruction": f"do {i}", "input": "", "output": f"ok {i}"} for i in range(10)]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n  format: chat\n")
    with pytest.raises(ConfigError, match=r"data\.train_files: format 'chat' needs"):
        build_data(cfg, run)
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n  format: alpaca\n")
    assert len(build_data(cfg, run).train_examples) == 10
    # prompt_completion reads instruction as the prompt and output as the completion (synonyms)
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n  format: prompt_completion\n")
    first = build_data(cfg, run).train_examples[0]
    assert first["input_ids"][:1] == [1] and len(first["input_ids"]) < 20


def _long_rows(n: int) -> list[dict]:
    sentence = "The quick brown fox jumps over the lazy dog. "
    return [
        {"prompt": f"Question {i}: " + sentence * (1 + i % 6), "completion": "Answer. " * (1 + i)}
        for i in range(n)
    ]


def test_length_budget_truncates_and_reports(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _long_rows(30))
    cfg, run = _config(
        tmp_path,
        f"  train_files: [{train}]\n"
        "  length:\n    max_total_length: 48\n    strategy: word_boundary\n"
        "    column_side: {prompt: left}\n"
        "    content_distribution: priority\n    priority: [completion, prompt]\n",
    )
    bundle = build_data(cfg, run)
    length = bundle.report["length"]
    assert length["truncated_records"] > 0
    assert length["records"] == length["kept"] == 30
    assert all(len(e["input_ids"]) <= 48 for e in bundle.train_examples)
    assert "truncated" in length["summary"]
    # left side: the end of the prompt is kept, the beginning is cut
    first_cut = next(
        bundle.encoder.decode(e["input_ids"])
        for e in bundle.train_examples
        if "Question" not in bundle.encoder.decode(e["input_ids"])
    )
    assert "dog." in first_cut


def test_length_excess_drop_counts_dropped_rows_and_raise_stops(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _long_rows(20))
    cfg, run = _config(
        tmp_path,
        f"  train_files: [{train}]\n"
        "  length:\n    per_column_limits: {prompt: 120}\n    excess: drop\n",
    )
    bundle = build_data(cfg, run)
    dropped = bundle.report["length"]["dropped"]
    assert dropped == {"char_limit:prompt": sum(len(r["prompt"]) > 120 for r in _long_rows(20))}
    # dropped by the policy, not quarantined: their own file, not counted as errors
    lines = (run / "data" / "dropped.jsonl").read_text().splitlines()
    assert len(lines) == sum(dropped.values()) == bundle.report["train"]["dropped"]
    assert "characters > limit 120" in json.loads(lines[0])["reason"]
    assert not (run / "data" / "quarantine.jsonl").exists()
    assert bundle.report["quarantined_rows"] == 0
    cfg, run = _config(
        tmp_path,
        f"  train_files: [{train}]\n  length:\n    max_total_length: 20\n    excess: raise\n",
    )
    with pytest.raises(DataError, match=r"max_total_length 20 at .*t\.jsonl:line 1"):
        build_data(cfg, run)


def test_length_keys_are_checked(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _qa_rows(5))
    cfg, run = _config(
        tmp_path, f"  train_files: [{train}]\n  length:\n    per_column_limits: {{question: 5}}\n"
    )
    with pytest.raises(ConfigError, match=r"data\.length\.per_column_limits: \['question'\]"):
        build_data(cfg, run)
    with pytest.raises(ConfigError, match="strategy"):
        load_config(None, ["data.length.strategy=sentence"])


def test_max_error_rate_aborts_with_counts_path_and_key(tmp_path: Path):
    rows = _qa_rows(20) + [{"prompt": "no completion"}] * 5
    train = _jsonl(tmp_path / "t.jsonl", rows)
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n  max_error_rate: 0.1\n")
    with pytest.raises(DataError) as err:
        build_data(cfg, run)
    message = str(err.value)
    assert "5 of 25 training rows (20.0%)" in message
    assert str(run / "data" / "quarantine.jsonl") in message
    assert "data.max_error_rate" in message
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n  max_error_rate: 0.25\n")
    assert build_data(cfg, run).report["quarantined_rows"] == 5


def test_processed_cache_hit_and_misses(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _qa_rows(30))
    yaml_text = f"  train_files: [{train}]\n  packing: {{enabled: true}}\n"
    cfg, run = _config(tmp_path, yaml_text)
    first = build_data(cfg, run)
    assert first.report["cache"] == "miss"
    second = build_data(cfg, run)
    assert second.report["cache"] == "hit"
    assert second.train_examples == first.train_examples
    assert second.eval_examples == first.eval_examples
    assert second.report["packing"] == first.report["packing"]
    # a loader-only key does not change the processed data
    cfg_b, _ = _config(tmp_path, yaml_text + "  shuffle: false\n")
    assert build_data(cfg_b, run).report["cache"] == "hit"
    # a processing key does
    cfg_t, _ = _config(tmp_path, yaml_text + "  template: chatml\n")
    assert build_data(cfg_t, run).report["cache"] == "miss"
    # so does a changed input file
    _jsonl(train, _qa_rows(31))
    assert build_data(cfg, run).report["cache"] == "miss"
    assert build_data(cfg, run).report["cache"] == "hit"
    cfg_off, _ = _config(tmp_path, yaml_text + "  cache: false\n")
    assert build_data(cfg_off, run).report["cache"] == "off"


def test_cache_dir_is_shared_between_runs(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", [*_qa_rows(12), {"prompt": "x"}])
    shared = tmp_path / "shared-cache"
    cfg, run = _config(
        tmp_path, f"  train_files: [{train}]\n  cache_dir: {shared}\n  max_error_rate: 0.1\n"
    )  # one bad row of 13 is over the default 5%
    assert build_data(cfg, run).report["cache"] == "miss"
    other = load_config(None, [f"run.output_dir={tmp_path / 'run2'}", *_overrides(cfg)])
    bundle = build_data(other, tmp_path / "run2")
    assert bundle.report["cache"] == "hit"
    # the quarantine comes back with the cached data
    assert (tmp_path / "run2" / "data" / "quarantine.jsonl").read_text().count("\n") == 1


def _overrides(cfg) -> list[str]:
    d = cfg.data
    return [
        f"data.train_files=[{d.train_files[0]}]",
        f"data.cache_dir={d.cache_dir}",
        "data.tokenizer.vocab_size=300",
        "data.max_length=128",
        "data.batch_size=4",
        f"data.max_error_rate={d.max_error_rate}",
    ]


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [{k: v.tolist() for k, v in next(it).items()} for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_streaming_resume_is_exact(tmp_path: Path, packing: bool):
    a = _jsonl(tmp_path / "a.jsonl", _qa_rows(37, "A "))
    b = _jsonl(tmp_path / "b.jsonl", [*_qa_rows(11, "B "), {"prompt": "bad"}])
    cfg, run = _config(
        tmp_path,
        "  streaming: true\n"
        f"  packing: {{enabled: {str(packing).lower()}, buffer_size: 3}}\n"
        f"  sources: [{{path: {a}, weight: 2}}, {{path: {b}, weight: 1}}]\n",
    )
    whole = build_data(cfg, run)
    assert whole.report["streaming"] is True and whole.train_examples == []
    expected = _take(whole.loader, 12)  # past the end of the first epoch
    assert whole.report["quarantined_rows"] >= 1

    first = build_data(cfg, run)
    it = iter(first.loader)
    got = [{k: v.tolist() for k, v in next(it).items()} for _ in range(5)]
    cursor = json.loads(json.dumps(first.loader.state_dict()))  # as a checkpoint stores it
    if packing:
        assert len(cursor["packer"]["rows"]) <= 3
    resumed = build_data(cfg, run)
    resumed.loader.load_state_dict(cursor)
    got += _take(resumed.loader, 7)
    assert got == expected
    if packing:
        assert int(max(max(r) for r in expected[0]["doc_ids"])) > 1
        assert len(expected[0]["input_ids"][0]) == 128


def test_streaming_error_rate_aborts_while_reading(tmp_path: Path):
    rows = [{"prompt": "p", "completion": "c"} if i % 2 else {"prompt": "p"} for i in range(300)]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    cfg, run = _config(
        tmp_path,
        f"  streaming: true\n  train_files: [{train}]\n  max_error_rate: 0.2\n",
    )
    bundle = build_data(cfg, run)
    with pytest.raises(DataError, match=r"data\.max_error_rate 0\.2"):
        _take(bundle.loader, 200)


def test_existing_keys_unchanged_on_the_json_lines_path(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _qa_rows(10))
    cfg, run = _config(tmp_path, f"  train_files: [{train}]\n")
    bundle = build_data(cfg, run)
    template = get_template("plain")
    want, _ = prepare_examples(
        _qa_rows(10), template, bundle.encoder, add_bos=True, add_eos=True,
        loss_mode="completion_only", max_length=128,
    )  # fmt: skip
    assert bundle.train_examples == [r.value for r in want if isinstance(r, Ok)]
    assert bundle.report["sources"] is None
    assert bundle.report["length"]["truncated_records"] == 0  # all within data.max_length
    assert os.path.exists(bundle.report["cache_path"])


def test_a_system_column_becomes_the_system_message(tmp_path: Path):
    rows = [
        {"question": f"q{i}", "answer": f"a{i}", "system_prompt": "Be brief."} for i in range(8)
    ]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    cfg, run = _config(
        tmp_path,
        f"  template: chatml\n  loss_mode: assistant_only\n  sources: [{{path: {train}}}]\n",
    )
    bundle = build_data(cfg, run)
    text = bundle.encoder.decode(bundle.train_examples[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq0")


def test_streaming_keys_are_checked(tmp_path: Path):
    train = _jsonl(tmp_path / "t.jsonl", _qa_rows(10))
    base = f"  streaming: true\n  train_files: [{train}]\n"
    cfg, run = _config(tmp_path, base + "  group_by_length: true\n")
    with pytest.raises(ConfigError, match=r"data\.group_by_length"):
        build_data(cfg, run)
    # out-of-domain values stop at load time (the field's declared domain)
    with pytest.raises(ConfigError, match=r"data\.packing\.buffer_size must be >= 1"):
        _config(tmp_path, base + "  packing: {enabled: true, buffer_size: 0}\n")
    with pytest.raises(ConfigError, match=r"data\.max_error_rate must be in \[0, 1\]"):
        _config(tmp_path, f"  train_files: [{train}]\n  max_error_rate: 1.5\n")
