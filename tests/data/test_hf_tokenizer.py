"""HF tokenizer folders in and out (tscale.data.hf_tokenizer), compared with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tscale.core.result import Err, Ok
from tscale.data import TASKS, generate, train_tokenizer
from tscale.data.hf_tokenizer import add_tokens, load_encoder, save_tokenizer_folder
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import ChatTemplate, get_template, render, render_messages
from tscale.data.tokenize import Encoder
from tscale.errors import DataError
from tscale.testing.hf_folders import QWEN3_TEMPLATE, chat_records, make_model_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {s: make_model_folder(root / s, s) for s in ("qwen2", "llama3")}


@pytest.fixture(scope="module")
def tscale_bpe() -> Encoder:
    recs = generate(list(TASKS), 2000, seed=0, min_items=3, max_items=8)
    return Encoder.from_tokenizer(
        train_tokenizer((r["prompt"] + r["completion"] for r in recs), 384)
    )


def _hf_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # 5.x: a BatchEncoding


def _bound(encoder: Encoder, date: str = "2026-01-01") -> ChatTemplate:
    assert encoder.chat_template is not None
    return ChatTemplate.from_jinja(encoder.chat_template).with_tokens(
        bos_token=encoder.bos_token or "", eos_token=encoder.eos_token or "", date=date
    )


def test_qwen2_folder_special_tokens_and_template(folders):
    enc = load_encoder(folders["qwen2"])
    assert enc.bos_id is None and enc.bos_token is None and not enc.adds_bos
    assert enc.eos_token == "<|im_end|>" and enc.eos_id == enc.tokenizer.token_to_id("<|im_end|>")
    assert enc.pad_is_eos and enc.pad_id == enc.eos_id  # no pad token: eos pads
    assert enc.chat_template == (folders["qwen2"] / "chat_template.jinja").read_text()
    assert enc.model_max_length == 512
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    assert enc.vocab_size == len(hf)
    # Added tokens are single ids, as in transformers.
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = enc.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == enc.tokenizer.token_to_id("<|im_start|>")


def test_llama3_folder_adds_bos_like_transformers(folders):
    enc = Encoder.from_path(folders["llama3"])
    hf = transformers.AutoTokenizer.from_pretrained(folders["llama3"])
    assert enc.adds_bos and enc.bos_token == "<|begin_of_text|>" and enc.bos_id == hf.bos_token_id
    assert (enc.eos_token, enc.eos_id) == ("<|eot_id|>", hf.eos_token_id)
    rec = {"prompt": "reverse: red blue", "completion": " blue red"}
    ours = enc.encode_example(rec, 64).value["input_ids"]
    theirs = hf(rec["prompt"] + rec["completion"])["input_ids"]
    # Untemplated text: the tokenizer's own BOS (once), the text, EOS appended.
    assert ours == [*theirs, enc.eos_id] and ours.count(enc.bos_id) == 1
    assert enc.encode_prompt(rec["prompt"]) == hf(rec["prompt"])["input_ids"]
    # A bare tokenizer.json inside its folder reads the folder's config.
    assert Encoder.from_path(folders["llama3"] / "tokenizer.json").special_tokens == (
        enc.special_tokens
    )


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_training_ids_equal_apply_chat_template(folders, style):
    """tscale's rendered + encoded conversations are transformers' chat-template ids."""
    enc = load_encoder(folders[style])
    hf = transformers.AutoTokenizer.from_pretrained(folders[style])
    records = chat_records(12, seed=3)
    results, _ = prepare_examples(
        records,
        _bound(enc),
        enc,
        add_bos=enc.adds_bos,
        add_eos=True,
        loss_mode="assistant_only",
    )
    for rec, res in zip(records, results, strict=True):
        assert isinstance(res, Ok), res
        # strftime_now: tscale formats the fixed date; the same date string goes to transformers.
        theirs = _hf_ids(hf, rec["messages"], date_string="01 Jan 2026")
        assert res.value["input_ids"] == theirs
        assert theirs[:2] != [enc.bos_id] * 2


def test_strftime_now_formats_the_configured_date(folders):
    enc = load_encoder(folders["llama3"])
    msgs = chat_records(1, seed=0)[0]["messages"]
    text = render_messages(_bound(enc, "2025-03-07"), msgs)
    assert "Today Date: 07 Mar 2025\n" in text and text.startswith("<|begin_of_text|>")
    with pytest.raises(DataError, match=r"data.template_date"):
        _bound(enc, "March 7")


def test_tokenizer_config_variants(tmp_path, folders):
    src = folders["llama3"]
    folder = tmp_path / "variant"
    folder.mkdir()
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False},
        "chat_template": [
            {"name": "tool_use", "template": "{{ 'tools' }}"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
        "add_bos_token": False,  # not read: the post-processor decides, as in transformers 5
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    enc = load_encoder(folder)
    assert (enc.bos_token, enc.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert enc.adds_bos and enc.chat_template.startswith("{{ bos_token }}")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf("red")["input_ids"] == enc.encode_prompt("red")  # transformers agrees: one BOS

    config["eos_token"] = "<|nope|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"data.tokenizer.path: eos_token '<\|nope\|>'"):
        load_encoder(folder)
    config.pop("eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(DataError, match="names no eos_token"):
        load_encoder(folder, key="model.path")
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    config["eos_token"] = "<|eot_id|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="none named 'default'"):
        load_encoder(folder)


def test_path_errors(tmp_path, folders):
    with pytest.raises(DataError, match=r"data.tokenizer.path: .* not found"):
        load_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no tokenizer.json"):
        load_encoder(tmp_path / "empty")
    bare = tmp_path / "bare.json"
    shutil.copy(folders["qwen2"] / "tokenizer.json", bare)
    with pytest.raises(DataError, match=r"bare tokenizer.json without tscale's special tokens"):
        load_encoder(bare)


def test_tscale_bpe_folder_round_trip_and_transformers(tmp_path, tscale_bpe):
    enc = attrs_evolve(tscale_bpe, chat_template=get_template("chatml").source)
    files = save_tokenizer_folder(enc, tmp_path / "tok")
    assert sorted(files) == [
        "chat_template.jinja",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads(files["tokenizer_config.json"].read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert config["unk_token"] is None and config["added_tokens_decoder"]["1"]["special"]
    back = load_encoder(tmp_path / "tok")
    assert (back.pad_id, back.bos_id, back.eos_id, back.adds_bos) == (0, 1, 2, True)
    assert back.chat_template == enc.chat_template and back.vocab_size == enc.vocab_size
    # transformers: same special tokens, BOS added like tscale, the chat template renders.
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    rec = {"prompt": "sort: 3 1 2", "completion": " 1 2 3"}
    assert hf(rec["prompt"])["input_ids"] == enc.encode_prompt(rec["prompt"])
    msgs = [{"role": "user", "content": "sort: 3 1"}, {"role": "assistant", "content": " 1 3"}]
    text = hf.apply_chat_template(msgs, tokenize=False)
    assert text == render_messages(get_template("chatml"), msgs)
    # A checkpoint written before folders holds a bare tscale tokenizer.json: it still loads.
    old = tmp_path / "old_ckpt"
    old.mkdir()
    tscale_bpe.tokenizer.save(str(old / "tokenizer.json"))
    legacy = Encoder.from_path(old)
    assert (legacy.pad_id, legacy.bos_id, legacy.eos_id, legacy.adds_bos) == (0, 1, 2, True)


def test_hf_folder_round_trip_keeps_chat_template_ids(tmp_path, folders):
    for style in ("qwen2", "llama3"):
        enc = load_encoder(folders[style])
        save_tokenizer_folder(enc, tmp_path / style)
        back = load_encoder(tmp_path / style)
        assert back.special_tokens == enc.special_tokens and back.adds_bos == enc.adds_bos
        orig = transformers.AutoTokenizer.from_pretrained(folders[style])
        saved = transformers.AutoTokenizer.from_pretrained(tmp_path / style)
        assert (saved.bos_token_id, saved.eos_token_id) == (orig.bos_token_id, orig.eos_token_id)
        assert saved.pad_token == enc.eos_token  # the pad training used
        for rec in chat_records(4, seed=1):
            kw = {"date_string": "01 Jan 2026"}
            assert _hf_ids(saved, rec["messages"], **kw) == _hf_ids(orig, rec["messages"], **kw)
            assert saved("red blue")["input_ids"] == orig("red blue")["input_ids"]


def test_add_tokens(folders):
    enc = load_encoder(folders["qwen2"])
    more = add_tokens(enc, ["<think>", "</think>", "<|im_start|>", "<think>"])
    assert more.vocab_size == enc.vocab_size + 2  # existing and repeated ones are kept once
    assert more.tokenizer.token_to_id("<think>") == enc.vocab_size
    assert more.tokenizer.encode("<think>x</think>", add_special_tokens=False).ids[0] == (
        enc.vocab_size
    )
    assert enc.tokenizer.token_to_id("<think>") is None  # the original is not changed
    assert add_tokens(enc, ["<|im_end|>"]) is enc


def _think_chat(seed: int) -> list[dict]:
    out = []
    for i, rec in enumerate(chat_records(6, seed=seed, system_every=0)):
        msgs = [
            {**m, "content": f"<think>\nstep {j} of {i}\n</think>\n\n{m['content']}"}
            if m["role"] == "assistant"
            else m
            for j, m in enumerate(rec["messages"])
        ]
        out.append({"messages": msgs})
    return out


def test_generation_blocks_define_spans_for_a_template_that_rewrites_turns(folders):
    """Qwen3-style: earlier turns lose their <think> block. Prefix rendering cannot find their
    spans; the {% generation %} blocks can, and agree with transformers' assistant masks."""
    hf_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    enc = add_tokens(load_encoder(folders["qwen2"]), ["<think>", "</think>"])
    tpl = ChatTemplate.from_jinja(QWEN3_TEMPLATE, name="qwen3")
    assert tpl.has_generation_blocks
    untagged = ChatTemplate.from_jinja(
        QWEN3_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    )
    assert not untagged.has_generation_blocks
    multi = [r for r in _think_chat(5) if len(r["messages"]) > 2]
    assert multi
    for rec in multi:
        assert isinstance(render(rec, untagged), Err)  # quarantined by prefix rendering
        sample = render(rec, tpl).value
        [text], [spans] = hf_utils.render_jinja_template(
            conversations=[rec["messages"]], chat_template=QWEN3_TEMPLATE,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        assert sample.text == text and list(sample.trained_spans) == [tuple(s) for s in spans]
        trained = [sample.text[a:b] for a, b in sample.trained_spans]
        assistants = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert trained[-1] == assistants[-1] + "<|im_end|>"  # the last turn keeps its thinking
        assert all("<think>" not in t for t in trained[:-1])  # earlier ones as rendered
        last = render(rec, tpl, loss_mode="last_turn_only").value
        assert last.trained_spans == sample.trained_spans[-1:]
    # And the ids: equal to apply_chat_template's, labels cover exactly the generation output.
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    hf.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    results, _ = prepare_examples(multi, tpl, enc, add_bos=False, add_eos=True)
    for rec, res in zip(multi, results, strict=True):
        out = hf.apply_chat_template(
            rec["messages"], chat_template=QWEN3_TEMPLATE, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True,
        )  # fmt: skip
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        assert res.value["input_ids"] == ids
        # labels are pre-shifted: token t is trained iff labels[t - 1] != -100
        ours = [0] + [int(x != -100) for x in res.value["labels"][:-1]]
        assert ours[1:] == mask[1:]


def test_markers_in_content_are_an_err():
    tpl = ChatTemplate.from_jinja(QWEN3_TEMPLATE)
    rec = {
        "messages": [{"role": "user", "content": "a\ufdd0"}, {"role": "assistant", "content": "b"}]
    }
    got = render(rec, tpl)
    assert isinstance(got, Err) and "noncharacter" in got.reason


def attrs_evolve(enc: Encoder, **changes) -> Encoder:
    import attrs

    return attrs.evolve(enc, **changes)


def test_saved_post_processor_follows_the_encoder(tmp_path, folders):
    enc = attrs_evolve(load_encoder(folders["llama3"]), adds_bos=False)
    save_tokenizer_folder(enc, tmp_path / "nobos")
    assert not load_encoder(tmp_path / "nobos").adds_bos
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "nobos")
    assert hf("red")["input_ids"] == enc.encode_prompt("red") != [enc.bos_id]


def test_tokenizer_json_is_not_changed_by_save(tmp_path, tscale_bpe):
    before = tscale_bpe.tokenizer.to_str()
    save_tokenizer_folder(tscale_bpe, tmp_path / "t")
    assert tscale_bpe.tokenizer.to_str() == before
    saved = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    # The saved file adds BOS itself (the encoder's rule), plain encoding is unchanged.
    assert saved.encode("sort: 1", add_special_tokens=True).ids[0] == tscale_bpe.bos_id
    assert (
        saved.encode("sort: 1", add_special_tokens=False).ids
        == tscale_bpe.tokenizer.encode("sort: 1", add_special_tokens=False).ids
    )
