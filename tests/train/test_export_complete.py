"""A complete HF export: tokenizer files, chat template, generation_config.json, adapter folder.

Every folder here is loaded by the real ``transformers``/``peft`` classes: ``AutoTokenizer``,
``AutoModelForCausalLM``, ``PeftModel``. Model folders come from
:func:`tscale.testing.hf_folders.make_model_folder` (random weights, real tokenizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tscale.checkpoint.hf import from_pretrained
from tscale.cli import main
from tscale.core import tree as T
from tscale.data.prompt import BUILTIN_TEMPLATES, ChatTemplate
from tscale.testing.hf_folders import LLAMA3_TEMPLATE, QWEN2_TEMPLATE, make_model_folder
from tscale.testing.runs import TINY_DATA, TINY_MODEL
from tscale.train.export import (
    decide_token_ids,
    end_of_turn_tokens,
    read_tokenizer,
    write_hf_export,
)

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# A tiny synthetic run (as tests/train/test_export.py's): seconds on a CPU.
TINY = [
    *TINY_MODEL,
    *TINY_DATA,
    "model.tie_word_embeddings=false",
    "scheduler.warmup_steps=2",
    "train.max_steps=6",
    "train.log_every=3",
    "train.progress=false",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=2",
    "eval.num_show=0",
]

SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|eos|>",
)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- end-of-turn detection


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (BUILTIN_TEMPLATES["chatml"], ("<|im_end|>",)),
        (BUILTIN_TEMPLATES["llama-3"], ("<|eot_id|>",)),
        (BUILTIN_TEMPLATES["mistral"], ("</s>",)),
        (BUILTIN_TEMPLATES["gemma"], ("<end_of_turn>",)),
        (BUILTIN_TEMPLATES["qwen"], ("<|im_end|>",)),
        # alpaca writes the tokenizer's eos_token after the response
        (BUILTIN_TEMPLATES["alpaca"].with_tokens(eos_token="<|eos|>"), ("<|eos|>",)),
        (ChatTemplate.from_jinja(QWEN2_TEMPLATE), ("<|im_end|>",)),
        (ChatTemplate.from_jinja(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>"), ("<|eot_id|>",)),
        (BUILTIN_TEMPLATES["plain"], ()),  # nothing follows the reply
    ],
    ids=[
        "chatml",
        "llama-3",
        "mistral",
        "gemma",
        "qwen",
        "alpaca",
        "qwen2-fx",
        "llama3-fx",
        "plain",
    ],
)
def test_end_of_turn_tokens_of_templates(template: ChatTemplate, expected: tuple[str, ...]):
    assert end_of_turn_tokens(template, SPECIALS) == expected


def test_end_of_turn_reads_consecutive_specials_and_ignores_plain_text():
    two = "{% for m in messages %}{{ m['content'] }} <|end|><|eot|>\n{% endfor %}"
    assert end_of_turn_tokens(two, ["<|end|>", "<|eot|>", "<|e"]) == ("<|end|>", "<|eot|>")
    # a tokenizer that added "\n" as a token: the newline after the turn ends nothing
    assert end_of_turn_tokens(BUILTIN_TEMPLATES["gemma"], [*SPECIALS, "\n"]) == ("<end_of_turn>",)
    # a marker that is not a special token of the tokenizer is no end-of-turn token
    assert end_of_turn_tokens(two, ["<|im_end|>"]) == ()
    # a template that refuses the conversation (mistral has no system role) gives nothing
    refusing = "{{ raise_exception('no') }}"
    assert end_of_turn_tokens(refusing, SPECIALS) == ()


# ---------------------------------------------------------------- a tscale-trained tokenizer


def _cli_train(run: Path, *options: str) -> None:
    """``tscale train`` of a tiny synthetic run (a YAML with no model keys, options after)."""
    yaml = run.parent / "tiny.yaml"
    yaml.write_text("run:\n  threads: 2\n")
    assert main(["train", str(yaml), *options, f"run.output_dir={run}", NO_PLOT]) == 0


def test_export_of_a_tscale_run_is_a_complete_tokenizer_folder(tmp_path: Path, capsys):
    _cli_train(tmp_path / "run", *TINY)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    ckpt_tok = Tokenizer.from_file(
        str(next((tmp_path / "run" / "checkpoints").glob("*/tokenizer.json")))
    )
    want = {k: ckpt_tok.token_to_id(f"<|{k}|>") for k in ("bos", "eos", "pad")}

    tok = transformers.AutoTokenizer.from_pretrained(out)
    got = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    assert got == want
    # the same ids as tscale's tokenizer, with the <|bos|> tscale put before every sample
    text = "reverse: a b c"
    assert tok(text).input_ids == [
        want["bos"],
        *ckpt_tok.encode(text, add_special_tokens=False).ids,
    ]
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text

    config, generation = _json(out / "config.json"), _json(out / "generation_config.json")
    for d in (config, generation):
        assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (
            want["bos"],
            want["eos"],
            want["pad"],
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == want["eos"]
    # padded batch generation works out of the box (a pad token exists)
    tok.padding_side = "left"
    batch = tok(["reverse: a b", "sort: 3 1 2 5"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == want["pad"] and batch["attention_mask"][0, 0] == 0
    new = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert batch["input_ids"].shape[1] < new.shape[1] <= batch["input_ids"].shape[1] + 3


def test_lora_adapter_folders_record_their_base_and_carry_the_tokenizer(tmp_path: Path, capsys):
    peft = pytest.importorskip("peft")
    lora = ["lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2"]
    _cli_train(tmp_path / "a", *TINY, *lora)
    adapter_a = tmp_path / "a" / "adapter"
    # from random init there is no HF base folder to name
    assert _json(adapter_a / "adapter_config.json")["base_model_name_or_path"] is None
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "base")]) == 0

    base = tmp_path / "base"
    _cli_train(
        tmp_path / "b",
        *[o for o in TINY if not o.startswith("model.")],  # the base sets the architecture
        *lora,
        f"model.path={base}",
        f"data.tokenizer.path={base / 'tokenizer.json'}",
    )
    adapter = tmp_path / "b" / "adapter"
    assert _json(adapter / "adapter_config.json")["base_model_name_or_path"] == str(base.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (adapter / name).is_file(), name
    tok = transformers.AutoTokenizer.from_pretrained(adapter)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(
        _json(adapter / "adapter_config.json")["base_model_name_or_path"]
    )
    with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    assert main(["export", str(tmp_path / "b"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = tok(["reverse: a b c d", "sort: 4 2 9 1"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        ours, theirs = merged(ids).logits, with_adapter(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- a pretrained model folder


def _base_style(folder: Path) -> None:
    """Make the llama3 fixture a *base* model's folder: eos <|end_of_text|>, as Meta-Llama-3-8B,
    while its chat template still ends turns with <|eot_id|>; sampling settings as released."""
    cfg = _json(folder / "tokenizer_config.json")
    cfg["eos_token"] = "<|end_of_text|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = _json(folder / "generation_config.json")
    gen.update(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=1)  # <|end_of_text|>
    (folder / "generation_config.json").write_text(json.dumps(gen))


def _make_bigram(params, *, to_first: int, then: int):
    """Rewire a Llama so that greedy decoding emits ``to_first`` after any token but
    ``to_first``, and ``then`` after ``to_first``: the blocks write nothing (o_proj and
    down_proj zero), so the last hidden state is the token's embedding, which points along
    dim 0 for every token but ``to_first`` (dim 1); the head maps dim 0 to ``to_first`` and
    dim 1 to ``then``. A deterministic stand-in for a model that learned to end its turn."""
    flat = {k: v.clone() for k, v in T.flatten(params).items()}
    for k in flat:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            flat[k].zero_()
    emb, head = flat["model.embed_tokens.weight"], flat["lm_head.weight"]
    emb.zero_()
    emb[:, 0] = 4.0
    emb[to_first] = 0.0
    emb[to_first, 1] = 4.0
    head.zero_()
    head[to_first, 0] = 1.0
    head[then, 1] = 1.0
    flat["model.norm.weight"].fill_(1.0)
    return T.unflatten(flat)


def test_model_folder_export_chats_and_stops_at_the_end_of_turn(tmp_path: Path):
    src = make_model_folder(tmp_path / "llama", "llama3")
    _base_style(src)
    model = from_pretrained(src)
    spec = read_tokenizer(src)
    eos, eot = (
        spec.tokenizer.token_to_id("<|end_of_text|>"),
        spec.tokenizer.token_to_id("<|eot_id|>"),
    )
    assert spec.eos_id == eos

    out = write_hf_export(
        model.config, model.params, tmp_path / "hf", tokenizer_dir=src, base_dir=src
    )
    config, generation = _json(out / "config.json"), _json(out / "generation_config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, eos, eos)
    assert generation["eos_token_id"] == [eos, eot]
    assert generation["pad_token_id"] == eos and generation["bos_token_id"] == 0
    assert (generation["temperature"], generation["top_p"], generation["do_sample"]) == (
        0.6,
        0.9,
        True,
    )
    assert "transformers_version" not in config and config["use_cache"] is True

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|end_of_text|>",
    )
    messages = [{"role": "user", "content": "reverse: cat dog"}]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = prompt["input_ids"]
    assert tok.decode(ids[0]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[0, 0] == 0 and (ids[0] == 0).sum() == 1  # one BOS, the template's

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    ours = model.apply(model.params, {"input_ids": ids})
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    word = tok.encode(" cat", add_special_tokens=False)[0]
    bigram = _make_bigram(model.params, to_first=word, then=eot)
    out2 = write_hf_export(model.config, bigram, tmp_path / "hf2", tokenizer_dir=src, base_dir=src)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out2)
    new = hf2.generate(**prompt, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert new.tolist() == [word, eot]  # stopped at the end of the turn, not the eos
    assert tok.decode(new, skip_special_tokens=True) == " cat"
    # with the tokenizer's eos alone, the same model would run on past its turn
    runaway = hf2.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert runaway.shape[1] == ids.shape[1] + 8


def test_stop_ids_keep_the_base_models_special_eos_ids(tmp_path: Path):
    src = make_model_folder(tmp_path / "llama", "llama3")
    spec = read_tokenizer(src)
    header = spec.tokenizer.token_to_id("<|start_header_id|>")
    word = spec.tokenizer.encode("cat", add_special_tokens=False).ids[0]
    assert word not in spec.tokenizer.get_added_tokens_decoder()
    # Llama 3.1 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>: added tokens of its tokenizer
    # are kept; an id that is no special token of this tokenizer is not
    ids = decide_token_ids(spec, base_generation={"eos_token_id": [1, header, word, 10**6]})
    assert ids.stop == (4, 1, header)
    assert (ids.bos, ids.eos, ids.pad) == (0, 4, 4)
    assert decide_token_ids(spec).stop == (4,)  # eos and end of turn are one token here


def test_qwen_folder_export_keeps_its_eos_and_template(tmp_path: Path):
    src = make_model_folder(tmp_path / "qwen", "qwen2")
    model = from_pretrained(src)
    out = write_hf_export(
        model.config, model.params, tmp_path / "hf", tokenizer_dir=src, base_dir=src
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|im_end|>")
    config, generation = _json(out / "config.json"), _json(out / "generation_config.json")
    assert config["eos_token_id"] == generation["eos_token_id"] == im_end  # eos is the end of turn
    assert config["bos_token_id"] is None and config["tie_word_embeddings"] is True
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "count: a b"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(
        theirs, model.apply(model.params, {"input_ids": ids}), atol=1e-4, rtol=1e-4
    )


END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.mark.slow
@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_fine_tune_a_model_folder_export_and_chat_with_transformers(tmp_path: Path, style: str):
    """The whole way, from ``model.path`` alone (its tokenizer, special tokens and template):
    SFT on multi-turn chats, ``tscale export``, then ``AutoTokenizer.apply_chat_template`` +
    ``generate`` in transformers stop at the template's end-of-turn token (learned in training,
    not wired), and the export's logits equal tscale's."""
    from tscale.testing.hf_folders import chat_records, write_jsonl

    src = make_model_folder(tmp_path / style, style)
    write_jsonl(chat_records(600, seed=1), tmp_path / "train.jsonl")
    run = tmp_path / "run"
    config = tmp_path / "own.yaml"  # model.path and the data are all it takes
    config.write_text(f"model: {{path: {src}}}\ndata: {{train_files: [{tmp_path}/train.jsonl]}}\n")
    args = [
        "train",
        str(config),
        f"run.output_dir={run}",
        "data.batch_size=16",
        "optimizer.lr=3e-3",  # the folder's weights are random: far from a fine-tuner's 2e-5
        "train.max_steps=120",
        "train.progress=false",
        NO_PLOT,
    ]
    assert main(args) == 0
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    end = tok.convert_tokens_to_ids(END_OF_TURN[style])
    assert tok.pad_token is not None
    generation = _json(out / "generation_config.json")
    stop = generation["eos_token_id"]
    assert end in (stop if isinstance(stop, list) else [stop])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ours = from_pretrained(out)
    stopped = 0
    for record in chat_records(6, seed=7, system_every=0):
        chat = record["messages"][:1]
        ids = tok.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt = ids["input_ids"]
        assert prompt[0].tolist().count(tok.bos_token_id) <= 1  # never two BOS
        with torch.no_grad():
            torch.testing.assert_close(
                hf(input_ids=prompt).logits,
                ours.apply(ours.params, {"input_ids": prompt}),
                atol=1e-4,
                rtol=1e-4,
            )
            new = hf.generate(**ids, max_new_tokens=24, do_sample=False)[0, prompt.shape[1] :]
        stopped += int(new[-1] == end and len(new) < 24)
    assert stopped == 6  # every reply ended with the end-of-turn token, before the limit
