"""Preference data (tscale.data.preference): formats detected and read by the project's reader,
rendered with real chat templates (compared with transformers' apply_chat_template), prompt and
completions tokenized apart, length budgets, quarantine, and the refusals of the wrong task."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.config import load_config
from tscale.core.result import Err, Ok
from tscale.data import TASKS, generate, train_tokenizer
from tscale.data.hf_tokenizer import load_encoder
from tscale.data.introspect import detect_format, inspect_source
from tscale.data.length import LengthBudget, LengthReport
from tscale.data.load import read_records
from tscale.data.preference import (
    PreferenceLimits,
    encode_preferences,
    fit_preference,
    preference_examples,
    split_implicit_prompt,
)
from tscale.data.prompt import BUILTIN_TEMPLATES, ChatTemplate
from tscale.data.tokenize import Encoder
from tscale.errors import DataError
from tscale.tasks.sft import sft_examples
from tscale.testing.hf_folders import make_model_folder
from tscale.train import data_sources
from tscale.train.data_build import Sink, build_data, examples_of
from tscale.train.data_template import SelectedTemplate

transformers = pytest.importorskip("transformers")

PLAIN = BUILTIN_TEMPLATES["plain"]
Q = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
ROWS: dict[str, list[dict[str, Any]]] = {
    "preference": [
        {"prompt": "what is 2 plus 2?", "chosen": " it is 4.", "rejected": " it is 5."},
        {"prompt": "sort 3 1 2:", "chosen": " 1 2 3", "rejected": " 3 2 1", "system": "Be brief."},
    ],
    "preference_chat": [
        {"prompt": Q, "chosen": BLUE, "rejected": GREEN},
        {"chosen": [*Q, *BLUE], "rejected": [*Q, *GREEN]},  # implicit prompt
    ],
    "unpaired_preference": [
        {"prompt": "what is 2 plus 2?", "completion": " it is 4.", "label": True},
        {"prompt": "what is 2 plus 2?", "completion": " it is 5.", "label": False},
    ],
    "unpaired_preference_chat": [
        {"prompt": Q, "completion": BLUE, "label": True},
        {"prompt": Q, "completion": GREEN, "label": False},
    ],
}


def jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {s: make_model_folder(root / s, s) for s in ("qwen2", "llama3")}


@pytest.fixture(scope="module")
def bpe() -> Encoder:
    """tscale's own BPE (BOS added, no chat template), trained on the fly."""
    recs = generate(list(TASKS), 1000, seed=0, min_items=3, max_items=8)
    return Encoder.from_tokenizer(
        train_tokenizer((r["prompt"] + r["completion"] for r in recs), 300)
    )


def _template(encoder: Encoder) -> ChatTemplate:
    assert encoder.chat_template is not None
    return ChatTemplate.from_jinja(encoder.chat_template).with_tokens(
        bos_token=encoder.bos_token or "", eos_token=encoder.eos_token or "", date="2026-01-01"
    )


def _decode(encoder: Encoder, ids: Sequence[int]) -> str:
    return encoder.tokenizer.decode(list(ids), skip_special_tokens=False)


def _hf_text(tok: Any, messages: list[dict], **kw: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, date_string="01 Jan 2026", **kw)


# ---------------------------------------------------------------------------------------------
# Detection and reading
# ---------------------------------------------------------------------------------------------


def test_detection_gives_each_preference_format(tmp_path):
    for fmt, rows in ROWS.items():
        info = inspect_source(jsonl(tmp_path / f"{fmt}.jsonl", rows), cache_dir=tmp_path / "c")
        assert info.format == fmt, fmt
    # unpaired needs boolean labels: a category column named label is SFT data
    rows = [{"prompt": "p", "completion": "c", "label": "sports"}]
    assert detect_format(["prompt", "completion", "label"], rows)[0] == "prompt_completion"
    # a forced preference format follows the values (strings or messages)
    rows = ROWS["preference_chat"]
    assert detect_format(["prompt", "chosen", "rejected"], rows, format="preference")[0] == (
        "preference_chat"
    )
    rows = [{"q": "p", "a": "c", "ok": True}]
    names = {"prompt": "q", "completion": "a", "label": "ok"}
    fmt, mapping = detect_format(["q", "a", "ok"], rows, column_map=names)
    assert (fmt, mapping["label"]) == ("unpaired_preference", "ok")


def test_reader_reads_every_format_and_quarantines_bad_labels(tmp_path):
    bad = {"prompt": "p", "completion": "c", "label": "yes"}  # a string label: an SFT row
    for fmt, rows in ROWS.items():
        records, places, report = read_records([jsonl(tmp_path / f"{fmt}.jsonl", rows)])
        assert len(records) == len(rows) and report.shapes == {fmt: len(rows)}, fmt
        assert places[0].endswith(f"{fmt}.jsonl:line 1")
    # through the sources path with data.format forced (what data.format: preference reads)
    path = jsonl(tmp_path / "mixed.jsonl", [*ROWS["unpaired_preference"], {**bad, "label": 1}])
    source = data_sources.Source("data.train_files", str(path), [str(path)], "train", 1.0, {},
                                 "unpaired_preference")  # fmt: skip
    got = data_sources.read_source(source, cache_dir=tmp_path / "c")
    assert [r["label"] for r in got.records] == [True, False]
    assert [e.reason for e in got.errors] == ["label not a boolean (column 'label' holds int)"]


def test_config_accepts_the_preference_formats(tmp_path):
    for fmt in ("preference", "preference_chat", "unpaired_preference"):
        cfg = load_config(None, [f"data.format={fmt}"])
        assert cfg.data.format == fmt


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization
# ---------------------------------------------------------------------------------------------


def test_strings_with_the_plain_template_are_the_strings(tmp_path, bpe):
    records, places, _ = read_records([jsonl(tmp_path / "p.jsonl", ROWS["preference"][:1])])
    (res,), _ = encode_preferences(records, PLAIN, bpe, where=places)
    ex = res.value
    raw = ROWS["preference"][0]
    ids = bpe.tokenizer.encode
    assert ex["prompt_ids"] == [bpe.bos_id, *ids(raw["prompt"], add_special_tokens=False).ids]
    for text, got in zip((raw["chosen"], raw["rejected"]), ex["completions"], strict=True):
        assert got == [*ids(text, add_special_tokens=False).ids, bpe.eos_id]
    assert ex["branches"] == [1, 2]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_chat_pairs_match_transformers_apply_chat_template(tmp_path, folders, style):
    """TRL's way (prompt rendered with the generation prompt; prompt + reply minus it) on the
    folder's own tokenizer and template; the ids are those of each text alone."""
    enc = load_encoder(folders[style])
    hf = transformers.AutoTokenizer.from_pretrained(folders[style])
    path = jsonl(tmp_path / "c.jsonl", ROWS["preference_chat"])
    records, places, _ = read_records([path])
    results, report = encode_preferences(records, _template(enc), enc, where=places)
    assert report.kept == 2 and report.truncated_records == 0
    for res in results:  # the explicit and the implicit prompt give the same example
        ex = res.value
        prompt_text = _hf_text(hf, Q, add_generation_prompt=True)
        assert _decode(enc, ex["prompt_ids"]) == prompt_text
        hf_prompt = hf.apply_chat_template(Q, add_generation_prompt=True, date_string="01 Jan 2026")
        hf_prompt = hf_prompt["input_ids"] if hasattr(hf_prompt, "keys") else hf_prompt
        assert ex["prompt_ids"] == list(hf_prompt)  # one BOS (llama3's template writes it)
        for reply, ids in zip((BLUE, GREEN), ex["completions"], strict=True):
            full = _hf_text(hf, [*Q, *reply])
            assert _decode(enc, ex["prompt_ids"]) + _decode(enc, ids) == full
            text = full[len(prompt_text) :]
            assert ids == enc.tokenizer.encode(text, add_special_tokens=False).ids
            assert enc.eos_id in ids  # the template's end of turn is the EOS: none appended
        assert ex["branches"] == [1, 2]
    assert results[0] == results[1]


def test_string_rows_with_a_chat_template_are_user_and_assistant_turns(tmp_path, folders):
    enc = load_encoder(folders["qwen2"])
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    records, places, _ = read_records([jsonl(tmp_path / "s.jsonl", ROWS["preference"])])
    results, _ = encode_preferences(records, _template(enc), enc, system="Be kind.", where=places)
    for raw, res in zip(ROWS["preference"], results, strict=True):
        system = [{"role": "system", "content": raw.get("system", "Be kind.")}]  # its own wins
        prompt = [*system, {"role": "user", "content": raw["prompt"]}]
        prompt_text = _hf_text(hf, prompt, add_generation_prompt=True)
        assert _decode(enc, res.value["prompt_ids"]) == prompt_text
        for name, ids in zip(("chosen", "rejected"), res.value["completions"], strict=True):
            full = _hf_text(hf, [*prompt, {"role": "assistant", "content": raw[name]}])
            assert _decode(enc, ids) == full[len(prompt_text) :]


def test_unpaired_rows_branch_by_label(tmp_path, folders):
    enc = load_encoder(folders["qwen2"])
    records, places, _ = read_records(
        [jsonl(tmp_path / "k.jsonl", ROWS["unpaired_preference_chat"])]
    )
    results, _ = encode_preferences(records, _template(enc), enc, unpaired=True, where=places)
    assert [r.value["branches"] for r in results] == [[1], [2]]
    assert [len(r.value["completions"]) for r in results] == [1, 1]
    assert _decode(enc, results[1].value["completions"][0]) == "It is green.<|im_end|>\n"


_PIECES = st.sampled_from(["re", "ver", "se", "so", "rt", "add", ": ", " ", "4", "+", "."])
_TEXT = st.lists(_PIECES, min_size=1, max_size=8).map("".join)


@settings(max_examples=40, deadline=None)
@given(prompt=_TEXT, completion=_TEXT.filter(str.strip))
def test_prompt_and_completion_are_tokenized_apart(bpe, prompt, completion):
    """No BPE merge crosses the border: the ids decode to prompt + completion, and the
    completion's ids are those of the completion alone (whatever merges prompt + completion
    would make: word pieces such as "so" + "rt" merge when encoded together)."""
    record = {"prompt": prompt, "completion": completion, "label": True}
    (res,), _ = encode_preferences([record], PLAIN, bpe, unpaired=True)
    ex = res.value
    (ids,) = ex["completions"]
    assert ids[-1] == bpe.eos_id and ex["prompt_ids"][0] == bpe.bos_id
    assert bpe.decode(ex["prompt_ids"]) + bpe.decode(ids) == prompt + completion
    assert ids[:-1] == bpe.tokenizer.encode(completion, add_special_tokens=False).ids


def test_joint_encoding_would_merge_across_the_border(bpe):
    """The property above is not empty: this tokenizer merges "so" + "rt" into fewer tokens."""

    def ids(text: str) -> list[int]:
        return bpe.tokenizer.encode(text, add_special_tokens=False).ids

    assert ids("sort") != ids("so") + ids("rt")
    (res,), _ = encode_preferences(
        [{"prompt": "so", "completion": "rt", "label": False}], PLAIN, bpe, unpaired=True
    )
    assert res.value["completions"] == [[*ids("rt"), bpe.eos_id]]
    assert res.value["branches"] == [2]


def test_implicit_prompt_split():
    assert split_implicit_prompt([*Q, *BLUE], [*Q, *GREEN]) == (Q, BLUE, GREEN)
    # texts: the shared start ends before a whitespace, so no word is split
    assert split_implicit_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    assert split_implicit_prompt("the cat", "the car") == ("the", " cat", " car")
    assert "share no leading text" in split_implicit_prompt("cat", "dog")
    assert "nothing after" in split_implicit_prompt([*Q, *BLUE], [*Q])
    assert "both be texts" in split_implicit_prompt("x", Q)


def test_template_that_cannot_split_a_completion_is_an_error(folders):
    enc = load_encoder(folders["qwen2"])
    record = {"prompt": Q, "chosen": [{"role": "user", "content": "again"}], "rejected": GREEN}
    (res,), _ = encode_preferences([record], _template(enc), enc, where=["r.jsonl:line 1"])
    assert isinstance(res, Err) and (res.where, res.record) == ("r.jsonl:line 1", record)
    assert "does not render the prompt (with the generation prompt) as the start of prompt + " \
        "chosen" in res.reason  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Length budgets and quarantine
# ---------------------------------------------------------------------------------------------


def test_left_truncation_keeps_the_prompt_end_and_bos(folders):
    enc = load_encoder(folders["llama3"])
    tpl = _template(enc)
    (full,), _ = encode_preferences(ROWS["preference_chat"][:1], tpl, enc)
    prompt, (chosen, rejected) = full.value["prompt_ids"], full.value["completions"]
    assert prompt[0] == enc.bos_id and len(prompt) > 20
    limits = PreferenceLimits(max_prompt_length=10, max_completion_length=len(rejected) - 2)
    (res,), report = encode_preferences(ROWS["preference_chat"][:1], tpl, enc, limits=limits)
    ex = res.value
    assert ex["prompt_ids"] == [enc.bos_id, *prompt[-9:]]  # the end of the prompt, BOS first
    assert ex["completions"] == [chosen, rejected[:-2]]  # completions cut from the right
    assert report.truncated == {"prompt": {"max_prompt_length": 1},
                                "rejected": {"max_completion_length": 1}}  # fmt: skip
    assert (report.truncated_records, report.truncated_examples) == (1, 1)
    # max_length: the prompt gives way first, so both completions stay whole
    limits = PreferenceLimits(max_length=len(rejected) + 5)
    (res,), report = encode_preferences(ROWS["preference_chat"][:1], tpl, enc, limits=limits)
    assert res.value["prompt_ids"] == [enc.bos_id, *prompt[-4:]]
    assert res.value["completions"] == [chosen, rejected]
    assert report.truncated == {"prompt": {"max_length": 1}}


def test_fit_cuts_the_prompt_first_then_completions_and_never_below_bos_and_one_token():
    prompt, comps, cuts = fit_preference(
        [0, 1, 2, 3, 4], [[5, 6, 7], [8]], ("chosen", "rejected"), PreferenceLimits(max_length=4),
        bos_id=0,
    )  # fmt: skip
    assert (prompt, comps) == ([0, 4], [[5, 6], [8]])
    assert cuts == {"prompt": "max_length", "chosen": "max_length"}
    prompt, comps, _ = fit_preference(
        [7, 1, 2], [[5, 6]], ("completion",), PreferenceLimits(max_length=2), bos_id=None
    )
    assert (prompt, comps) == ([2], [[5]])


def test_empty_completions_are_quarantined_with_a_reason(tmp_path, folders):
    enc = load_encoder(folders["qwen2"])
    stage = preference_examples(
        load_config(None, []).data, enc, SelectedTemplate(_template(enc)), max_prompt_length=30
    )
    records = [
        ROWS["preference_chat"][0],
        {"prompt": Q, "chosen": [{"role": "assistant", "content": "  "}], "rejected": GREEN},
    ]
    places = ["f.jsonl:line 1", "f.jsonl:line 2"]
    sink = Sink(tmp_path / "quarantine.jsonl")
    # the prompt gives way down to one token (no BOS here), which is all max_length 1 holds:
    # nothing of either completion fits
    budget = LengthBudget(max_total_length=1)
    ok, errors, dropped, report = examples_of(
        stage, sink, records, places, budget=budget, max_length=None
    )
    assert ok == [] and not dropped and errors.total() == 2
    lines = [json.loads(line) for line in sink.quarantine.read_text().splitlines()]
    assert [(x["where"], x["reason"].split(":")[0]) for x in lines] == [
        ("f.jsonl:line 1", "chosen empty after truncation"),
        ("f.jsonl:line 2", "chosen empty (its messages have no content)"),
    ]
    assert lines[0]["record"] == json.loads(json.dumps(records[0]))  # the original record
    assert report.records == 2 and report.kept == 0 and report.truncated_examples == 0
    with pytest.raises(DataError, match="max_prompt_length must be at least 1"):
        preference_examples(None, enc, _template(enc), max_prompt_length=0)


# ---------------------------------------------------------------------------------------------
# The wrong task: one clear line
# ---------------------------------------------------------------------------------------------


def test_each_task_refuses_the_others_records(bpe):
    cfg = load_config(None, [])
    tpl = SelectedTemplate(PLAIN)
    sft = sft_examples(cfg, bpe, tpl)
    paired = preference_examples(cfg.data, bpe, tpl)
    unpaired = preference_examples(cfg.data, bpe, tpl, unpaired=True)
    sft_row = {"prompt": "a", "completion": "b"}
    cases = [
        (sft, ROWS["preference"][0], r"x:line 1: preference data .* set task\.type: dpo"),
        (sft, ROWS["unpaired_preference"][0], r"x:line 1: unpaired .* set task\.type: kto"),
        (paired, sft_row, r"x:line 1: a supervised fine-tuning record .* set task\.type: sft"),
        (paired, ROWS["unpaired_preference"][0], r"KTO's; set task\.type: kto"),
        (unpaired, ROWS["preference"][0], r"paired preference data .* set task\.type: dpo"),
        (unpaired, sft_row, r"needs prompt, completion and a boolean label: set task\.type: sft"),
    ]
    for stage, record, message in cases:
        with pytest.raises(DataError, match=message) as err:
            stage([record], ["x:line 1"], budget=None, max_length=None)
        assert "\n" not in str(err.value)
    auto_plain = preference_examples(cfg.data, bpe, SelectedTemplate(PLAIN, plain_only=True))
    with pytest.raises(DataError, match=r"no chat_template and the preference data is chat"):
        auto_plain(ROWS["preference_chat"][:1], ["x:line 1"], budget=None, max_length=None)


# ---------------------------------------------------------------------------------------------
# data.format: preference flows to the task's stage
# ---------------------------------------------------------------------------------------------


def test_build_data_hands_preference_records_to_the_task_stage(tmp_path):
    rows = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f" it is {2 * i}.",
         "rejected": f" it is {2 * i + 1}."}
        for i in range(12)
    ]  # fmt: skip
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.train_files=[{data}]",
        "data.tokenizer.vocab_size=300",
        "data.batch_size=2",
        "data.max_length=64",
    ]
    seen: list[dict] = []

    def make_examples(cfg, encoder, template):
        stage = preference_examples(cfg.data, encoder, template, max_prompt_length=16)

        def joined(records, places, *, budget, max_length):  # chosen after the prompt, for the
            results, report = stage(records, places, budget=budget, max_length=max_length)
            out = []
            for res in results:  # loader (the group documents are stage 2's)
                seen.append(res.value)
                ids = res.value["prompt_ids"] + res.value["completions"][0]
                out.append(Ok({"input_ids": ids, "labels": [*ids[1:], -100]}))
            return out, report

        return joined

    for fmt in ("auto", "preference", "streaming"):
        seen.clear()
        extra = "data.streaming=true" if fmt == "streaming" else f"data.format={fmt}"
        cfg = load_config(None, [*overrides, extra])
        bundle = build_data(cfg, tmp_path / f"run-{fmt}", make_examples=make_examples)
        if fmt == "streaming":  # the stage runs as the loader reads (in its own order)
            next(iter(bundle.loader))
        else:
            assert len(bundle.train_examples) == 12
        enc = bundle.encoder
        pairs = {
            enc.decode(ex["prompt_ids"]): [enc.decode(c) for c in ex["completions"]] for ex in seen
        }
        assert len(pairs) == 12 and all(ex["branches"] == [1, 2] for ex in seen)
        assert pairs[rows[3]["prompt"]] == [" it is 6.", " it is 7."]
    # the SFT stage (the default) refuses the same data in one line
    cfg = load_config(None, overrides)
    with pytest.raises(DataError, match=r"pairs\.jsonl:line 1: preference data .*task\.type: dpo"):
        build_data(cfg, tmp_path / "run-sft")


def test_a_tokenizer_trained_here_sees_every_text_of_preference_rows():
    texts = list(data_sources.tokenizer_texts([ROWS["preference_chat"][0], ROWS["preference"][1]]))
    assert texts == [Q[0]["content"], BLUE[0]["content"], GREEN[0]["content"], "Be brief.",
                     "sort 3 1 2:", " 1 2 3", " 3 2 1"]  # fmt: skip


def test_length_report_adds_up():
    a = LengthReport(1, 1, {"prompt": {"max_length": 1}}, {}, 1, 1)
    assert (a + a).truncated == {"prompt": {"max_length": 2}}
