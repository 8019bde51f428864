"""A reward model's whole HF export (weights, config.json, tokenizer with a pad of its own):
``AutoTokenizer`` pads a batch of texts and ``AutoModelForSequenceClassification`` scores them as
tscale does; and the builder that starts a reward run from a folder or a random init."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

from tscale.config.load import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.errors import CheckpointError
from tscale.models.reward import SCORE_WEIGHT, RewardHead, RewardModel, reward_architecture
from tscale.models.transformer import Transformer
from tscale.testing.hf_folders import STYLES, make_model_folder
from tscale.train import builders
from tscale.train.export import (
    decide_token_ids,
    read_tokenizer,
    reward_pad,
    write_reward_export,
)

transformers = pytest.importorskip("transformers")

TEXTS = ["the cat sees a bird", "red", "quick old dog jumps over the quiet river and sleeps"]


@pytest.fixture(scope="module", params=STYLES)
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp(request.param), request.param)


def test_export_scores_padded_texts_as_tscale(folder: Path, tmp_path: Path) -> None:
    cfg = load_config({"model": {"path": str(folder)}, "task": {"type": "reward"}})
    model, params = builders.build_model(
        cfg, read_tokenizer(folder).vocab_size, R.key(0), reward=True
    )
    flat = T.flatten(params)
    assert SCORE_WEIGHT in flat and not any(k.startswith("lm_head") for k in flat)
    params["score", "weight"] = torch.randn(1, model.config.hidden_size)  # a trained-looking head

    out = write_reward_export(model.config, params, tmp_path / "rm", tokenizer_dir=folder)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == [reward_architecture(model.config.family)]
    pad = hf_config["pad_token_id"]
    assert isinstance(pad, int) and pad != hf_config["eos_token_id"]
    assert not (out / "generation_config.json").exists()

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == pad and tok.padding_side == "right"
    # each text as a reply ending with the template's end of turn: what a pair's side looks like
    convs = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": t}] for t in TEXTS]
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    enc = tok(rendered, padding=True, return_tensors="pt", add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # the batch is really padded
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**enc).logits

    rm = RewardModel(Transformer(model.config), RewardHead.of(model.config))
    ours = []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
        alone = ids[mask.bool()][None]
        assert int(alone[0, -1]) != pad
        with torch.no_grad():
            ours.append(rm.apply(params, {"input_ids": alone})[0, -1])
    torch.testing.assert_close(torch.stack(ours), theirs, rtol=1e-5, atol=1e-5)
    assert theirs.std() > 0.05


def test_reward_pad_choice(folder: Path) -> None:
    spec = read_tokenizer(folder)
    ids = decide_token_ids(spec)
    pad, token = reward_pad(spec, ids)
    assert spec.pad_is_eos and pad not in ids.stop and pad != spec.bos_id
    assert spec.tokenizer.token_to_id(token) == pad
    # a real pad of the tokenizer is kept
    real = attrs.evolve(spec, pad_id=pad, pad_token=token, pad_is_eos=False)
    assert reward_pad(real, ids) == (pad, token)
    # nothing to pad with but the stop ids: refused with a way out
    everything = tuple(spec.tokenizer.get_added_tokens_decoder())
    with pytest.raises(CheckpointError, match="add_tokens"):
        reward_pad(spec, attrs.evolve(ids, stop=everything))


def test_build_model_reward_from_a_sequence_classification_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    hf = transformers.LlamaForSequenceClassification(config)
    hf.save_pretrained(tmp_path)
    cfg = load_config({"model": {"path": str(tmp_path)}, "task": {"type": "reward"}})
    _, params = builders.build_model(cfg, 64, R.key(0), reward=True)
    torch.testing.assert_close(params["score", "weight"], hf.score.weight.detach())


def test_build_model_reward_from_random_init() -> None:
    cfg = load_config({"task": {"type": "reward"}})
    model, params = builders.build_model(cfg, 100, R.key(0), reward=True)
    flat = T.flatten(params)
    assert flat[SCORE_WEIGHT].shape == (1, model.config.hidden_size)
    assert not any(k.startswith("lm_head") for k in flat)
    _, again = builders.build_model(cfg, 100, R.key(0), reward=True)
    torch.testing.assert_close(again["score", "weight"], flat[SCORE_WEIGHT], rtol=0, atol=0)
