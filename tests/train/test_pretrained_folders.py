"""Bring your own pretrained model: SFT from ``model.path`` alone with the folder's tokenizer and
chat template, compared with transformers; added tokens; vocabulary errors."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tscale import cli
from tscale.checkpoint import latest_checkpoint
from tscale.checkpoint.hf import save_pretrained
from tscale.config import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.data.hf_tokenizer import add_tokens, save_tokenizer_folder
from tscale.data.tokenize import Encoder
from tscale.errors import ConfigError
from tscale.testing.hf_folders import QWEN3_TEMPLATE, chat_records, make_model_folder, write_jsonl
from tscale.train import builders, data_build, data_cli

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

transformers = pytest.importorskip("transformers")

RUN = [
    "data.loss_mode=assistant_only",
    "data.max_length=256",
    "data.batch_size=4",
    "data.shuffle=false",
    "optimizer.lr=1e-3",
    "scheduler.warmup_steps=1",
    "train.max_steps=3",
    "train.log_every=1",
    "train.progress=false",
    "eval.num_samples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=3",
    "eval.num_show=0",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {s: make_model_folder(root / s, s) for s in ("qwen2", "llama3")}


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat")
    return (
        write_jsonl(chat_records(16, seed=1), root / "train.jsonl"),
        write_jsonl(chat_records(4, seed=2), root / "eval.jsonl"),
    )


def _overrides(run: Path, train: Path, eval_: Path, *extra: str) -> list[str]:
    return [
        *RUN,
        f"run.output_dir={run}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{eval_}]",
        NO_PLOT,
        *extra,
    ]


def _cli_train(tmp_path: Path, overrides: list[str]) -> int:
    """``tscale train cfg.yaml key=value ...`` (an empty YAML: every key from the overrides)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("# keys given on the command line\n")
    return cli.main(["train", str(cfg), *overrides])


def _hf_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # 5.x: a BatchEncoding


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_sft_from_model_path_alone_trains_on_transformers_ids(
    tmp_path, folders, chat_files, style, capsys
):
    train, eval_ = chat_files
    run = tmp_path / "run"
    # transformers' strftime_now is today: give tscale today's date for the comparison.
    today = datetime.date.today()
    args = _overrides(
        run, train, eval_, f"model.path={folders[style]}", f"data.template_date={today}"
    )
    assert _cli_train(tmp_path, [*args]) == 0
    printed = capsys.readouterr().out
    assert printed.count("it has no pad token: padding with its eos") == 1  # said once
    losses = _losses(run)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    cfg = load_config(None, args)
    bundle = data_build.build_data(cfg, run)
    assert bundle.report["cache"] == "hit"  # the same processed data the run trained on
    summary = bundle.report["tokenizer"]
    assert summary["source"] == str(folders[style]) and summary["template"] == "tokenizer"
    assert summary["pad_is_eos"] and summary["adds_bos"] == (style == "llama3")
    hf = transformers.AutoTokenizer.from_pretrained(folders[style])
    records = [json.loads(x) for x in train.read_text().splitlines()]
    theirs = [_hf_ids(hf, r["messages"]) for r in records]
    if datetime.date.today() != today:  # midnight passed between the two renders
        pytest.skip("the date changed during the test")
    assert [e["input_ids"] for e in bundle.train_examples] == theirs
    enc = bundle.encoder
    for ex, rec in zip(bundle.train_examples, records, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[:2] != [enc.bos_id, enc.bos_id]  # never a BOS twice
        assert (ids[0] == enc.bos_id) == (style == "llama3")
        trained = [x for x in labels if x != -100]
        eot = enc.eos_id
        assert trained.count(eot) == sum(m["role"] == "assistant" for m in rec["messages"])

    # The checkpoint holds the tokenizer as a complete HF folder that transformers loads.
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (ckpt / name).is_file()
    assert (ckpt / "chat_template.jinja").read_text() == hf.chat_template
    saved = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert (saved.bos_token_id, saved.eos_token_id) == (enc.bos_id, enc.eos_id)
    assert saved.pad_token_id == enc.pad_id == enc.eos_id  # no pad in the folder: eos pads
    assert [_hf_ids(saved, r["messages"]) for r in records] == theirs
    # The generation prompt is rendered the same way (add_generation_prompt, no second BOS).
    msgs = records[0]["messages"]
    prompt = hf.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert bundle.encode_prompt(records[0]) == prompt


def test_prompt_completion_with_a_bos_adding_tokenizer_has_one_bos(tmp_path, folders):
    recs = [{"prompt": f"reverse: red blue {i}", "completion": f" {i} blue red"} for i in range(8)]
    train = write_jsonl(recs, tmp_path / "pc.jsonl")
    hf = transformers.AutoTokenizer.from_pretrained(folders["llama3"])
    for template in ("auto", "plain", "llama-3"):  # the folder's template, none, a built-in
        args = _overrides(
            tmp_path / template, train, train, f"model.path={folders['llama3']}",
            f"data.template={template}",
        )  # fmt: skip
        bundle = data_build.build_data(load_config(None, args), tmp_path / template)
        bos = bundle.encoder.bos_id
        for ex, rec in zip(bundle.train_examples, recs, strict=True):
            ids = ex["input_ids"]
            assert ids[0] == bos and ids.count(bos) == 1, template
            assert bundle.encode_prompt(rec).count(bos) == 1
            if template == "plain":  # the post-processor's BOS, the text, EOS appended
                text = rec["prompt"] + rec["completion"]
                assert ids == [*hf(text)["input_ids"], bundle.encoder.eos_id]


def test_chat_data_without_a_chat_template_is_an_error(tmp_path, chat_files, capsys):
    train, eval_ = chat_files
    args = _overrides(tmp_path / "run", train, eval_, "data.tokenizer.vocab_size=300")
    assert _cli_train(tmp_path, [*args]) == 2
    err = capsys.readouterr().err
    assert "data.template: auto" in err and "chatml, llama-3" in err and "plain" in err
    # A built-in then works with tscale's BPE, writing its own BOS/EOS strings (mistral's
    # template refuses system messages: those rows, one in three, are quarantined).
    ok = _overrides(tmp_path / "ok", train, eval_, "data.tokenizer.vocab_size=300")
    cfg = load_config(None, [*ok, "data.template=mistral", "data.max_error_rate=0.5"])
    bundle = data_build.build_data(cfg, tmp_path / "ok")
    assert bundle.report["train"]["quarantined"] > 0
    enc = bundle.encoder
    for ex in bundle.train_examples:
        assert ex["input_ids"][0] == enc.bos_id and ex["input_ids"].count(enc.bos_id) == 1
    assert enc.chat_template is not None and "[INST]" in enc.chat_template


def test_template_errors_name_the_key(tmp_path, chat_files, capsys):
    train, eval_ = chat_files
    base = _overrides(tmp_path / "run", train, eval_, "data.tokenizer.vocab_size=300")
    for value, what in (("missing.jinja", "not found"), ("nonsense", "unknown template")):
        assert _cli_train(tmp_path, [*base, f"data.template={value}"]) == 2
        err = capsys.readouterr().err
        assert "data.template:" in err and what in err
    assert _cli_train(tmp_path, [*base, "data.template=chatml", "data.template_date=soon"]) == 2
    assert "data.template_date" in capsys.readouterr().err


def _think_chat(n: int, seed: int) -> list[dict]:
    out = []
    for i, rec in enumerate(chat_records(n, seed=seed, system_every=0)):
        msgs = [
            {**m, "content": f"<think>\nturn {j} of {i}\n</think>\n\n{m['content']}"}
            if m["role"] == "assistant"
            else m
            for j, m in enumerate(rec["messages"])
        ]
        out.append({"messages": msgs})
    return out


def test_jinja_file_with_generation_blocks_trains_a_template_that_rewrites_turns(tmp_path, folders):
    jinja = tmp_path / "qwen3.jinja"
    jinja.write_text(QWEN3_TEMPLATE)
    records = _think_chat(12, seed=4)
    train = write_jsonl(records, tmp_path / "think.jsonl")
    run = tmp_path / "run"
    args = _overrides(
        run, train, train, f"model.path={folders['qwen2']}", f"data.template={jinja}",
        "data.tokenizer.add_tokens=[<think>, </think>]",
    )  # fmt: skip
    assert _cli_train(tmp_path, [*args]) == 0
    bundle = data_build.build_data(load_config(None, args), run)
    assert len(bundle.train_examples) == len(records)  # none quarantined
    assert bundle.encoder.chat_template == QWEN3_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    hf.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    for ex, rec in zip(bundle.train_examples, records, strict=True):
        out = hf.apply_chat_template(
            rec["messages"], chat_template=QWEN3_TEMPLATE, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        assert ex["input_ids"] == list(out["input_ids"])
        trained = [int(x != -100) for x in ex["labels"][:-1]]
        assert trained == list(out["assistant_masks"])[1:]
    # The embedding (424 rows) already covers the 2 added tokens: it keeps its size.
    params = load_file(str(latest_checkpoint(run / "checkpoints") / "params.safetensors"))
    assert params["model.embed_tokens.weight"].shape[0] == 400 + 24


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_add_tokens_grows_the_embedding_and_exports(tmp_path, chat_files, style):
    folder = make_model_folder(tmp_path / "m", style, extra_vocab=0)  # embedding == tokenizer
    train, eval_ = chat_files
    run = tmp_path / "run"
    new = ["<|tool|>", "<|think|>", "<|end_think|>"]
    args = _overrides(run, train, eval_, f"model.path={folder}", f"data.tokenizer.add_tokens={new}")
    cfg = load_config(None, args)
    key = R.split(R.key(0), 2)[0]
    model, params = builders.build_model(cfg, 403, key)
    flat = T.flatten(params)
    heads = ["model.embed_tokens.weight"] + (["lm_head.weight"] if style == "llama3" else [])
    orig = load_file(str(folder / "model.safetensors"))
    assert model.config.vocab_size == 403
    for name in heads:
        assert flat[name].shape[0] == 403
        torch.testing.assert_close(flat[name][:400], orig[name])
        mean = orig[name].mean(dim=0)
        for row in flat[name][400:]:
            torch.testing.assert_close(row, mean)
    # Deterministic: export rebuilds the model the same way.
    again = T.flatten(builders.build_model(cfg, 403, key)[1])
    assert all(torch.equal(again[n], flat[n]) for n in heads)

    assert _cli_train(tmp_path, [*args]) == 0
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    enc = Encoder.from_path(ckpt, key="checkpoint")
    assert enc.vocab_size == 403 and enc.tokenizer.token_to_id("<|tool|>") == 400
    # What `tscale export` does: the model rebuilt from the checkpoint's config, its params,
    # the tokenizer folder beside them. transformers loads both.
    model, _ = builders.build_model(load_config(ckpt / "config.yaml"), enc.vocab_size, key)
    trained = T.unflatten(load_file(str(ckpt / "params.safetensors")))
    files = sorted(p for p in ckpt.iterdir() if p.name.startswith(("tokenizer", "special", "chat")))
    out = save_pretrained((model.config, trained), tmp_path / "export", tokenizer_files=files)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.get_input_embeddings().weight.shape[0] == 403
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids("<|end_think|>") == 402
    ids = hf_tok("<|tool|>red", add_special_tokens=False)["input_ids"]
    assert ids[0] == 400
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits
    assert logits.shape[-1] == 403 and torch.isfinite(logits).all()


def test_tokenizer_larger_than_the_embedding_is_a_clear_error(tmp_path, folders, chat_files):
    folder = make_model_folder(tmp_path / "m", "qwen2", extra_vocab=0)
    bigger = add_tokens(Encoder.from_path(folder), [f"<|extra_{i}|>" for i in range(5)])
    save_tokenizer_folder(bigger, tmp_path / "tok")
    train, eval_ = chat_files
    args = _overrides(
        tmp_path / "run", train, eval_, f"model.path={folder}",
        f"data.tokenizer.path={tmp_path / 'tok'}",
    )  # fmt: skip
    cfg = load_config(None, args)
    with pytest.raises(ConfigError) as e:
        builders.build_model(cfg, bigger.vocab_size, R.key(0))
    msg = str(e.value)
    assert f"data.tokenizer.path {tmp_path / 'tok'}" in msg and f"model.path {folder}" in msg
    assert "token ids up to 404" in msg and "has 400 rows" in msg and "add_tokens" in msg
    assert _cli_train(tmp_path, [*args]) == 2


def test_model_folder_without_tokenizer(tmp_path, folders, chat_files):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders["qwen2"] / name, bare / name)
    train, eval_ = chat_files
    cfg = load_config(None, _overrides(tmp_path / "run", train, eval_, f"model.path={bare}"))
    with pytest.raises(ConfigError, match=r"model\.path .* has no tokenizer\.json"):
        data_build.build_data(cfg, tmp_path / "run")


def test_data_preview_with_an_hf_folder(tmp_path, folders, chat_files):
    train, eval_ = chat_files
    run = tmp_path / "run"
    cfg = load_config(None, _overrides(run, train, eval_, f"model.path={folders['qwen2']}"))
    console = Console(record=True, width=400)
    data_cli.preview(cfg, console, n=1)
    text = console.export_text()
    assert "<|im_start|>assistant" in text and "<|im_end|>" in text


def test_tscale_bpe_runs_keep_their_ids(tmp_path):
    """Random-init runs with tscale's BPE: [bos] + prompt + completion + [eos], as before
    tokenizer folders (the quickstart's metrics are unchanged)."""
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"run.output_dir={run}",
            "data.synthetic.num_train=64",
            "data.synthetic.num_eval=4",
            "data.tokenizer.vocab_size=300",
            "data.shuffle=false",
        ],
    )
    bundle = data_build.build_data(cfg, run)
    enc = bundle.encoder
    assert (enc.pad_id, enc.bos_id, enc.eos_id, enc.adds_bos, enc.chat_template) == (
        0, 1, 2, True, None,
    )  # fmt: skip
    records = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert len(bundle.train_examples) == len(records)
    for ex, rec in zip(bundle.train_examples, records, strict=True):
        assert ex == enc.encode_example(rec, 64).value
    config = json.loads((run / "data" / "tokenizer" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>", "<|eos|>", "<|pad|>",
    )  # fmt: skip
    assert "chat_template" not in config


def test_processed_cache_covers_template_source_and_date(tmp_path, folders, chat_files):
    train, eval_ = chat_files
    run = tmp_path / "run"
    base = _overrides(run, train, eval_, f"model.path={folders['llama3']}")

    def build(*extra: str) -> data_build.DataBundle:
        return data_build.build_data(load_config(None, [*base, *extra]), run)

    first = build("data.template_date=2025-01-01")
    assert (
        first.report["cache"] == "miss"
        and build("data.template_date=2025-01-01").report["cache"] == "hit"
    )
    other = build("data.template_date=2025-02-01")
    assert other.report["cache"] == "miss"
    assert other.train_examples[0]["input_ids"] != first.train_examples[0]["input_ids"]
    # A .jinja file whose contents change under the same config is a miss too.
    jinja = tmp_path / "t.jinja"
    jinja.write_text(folders["llama3"].joinpath("chat_template.jinja").read_text())
    assert build(f"data.template={jinja}").report["cache"] == "miss"
    assert build(f"data.template={jinja}").report["cache"] == "hit"
    jinja.write_text(jinja.read_text().replace("Cutting Knowledge", "Knowledge"))
    assert build(f"data.template={jinja}").report["cache"] == "miss"


def test_streaming_uses_the_folder_tokenizer_and_template(tmp_path, folders, chat_files):
    train, eval_ = chat_files
    run = tmp_path / "run"
    args = _overrides(run, train, eval_, f"model.path={folders['qwen2']}", "data.streaming=true")
    bundle = data_build.build_data(load_config(None, args), run)
    assert bundle.report["streaming"] and bundle.report["tokenizer"]["template"] == "tokenizer"
    hf = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    records = [json.loads(x) for x in train.read_text().splitlines()]
    expected = {tuple(_hf_ids(hf, r["messages"])) for r in records}
    batch = next(iter(bundle.loader))
    pad = bundle.encoder.pad_id
    for row in batch["input_ids"].tolist():
        while row and row[-1] == pad:  # right padding (eos pads; every sample ends in "\n")
            row.pop()
        assert tuple(row) in expected
    # The eval examples (not streamed) are rendered by the same template.
    evals = [json.loads(x) for x in eval_.read_text().splitlines()]
    assert [e["input_ids"] for e in bundle.eval_examples] == [
        _hf_ids(hf, r["messages"]) for r in evals
    ]
