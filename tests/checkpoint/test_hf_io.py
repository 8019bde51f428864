"""Loading and saving HF checkpoint directories: shards, tied heads, dtypes and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tscale.checkpoint.hf import from_pretrained, save_pretrained
from tscale.core import rng
from tscale.core import tree as T
from tscale.errors import CheckpointError, ConfigError
from tscale.models import Model, RopeScaling, TransformerConfig, init
from tscale.models.hf import generation_config_json, parse_size

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SMALL: dict[str, Any] = {
    "vocab_size": 61,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _hf_llama(tied: bool = False, **kw: Any) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied, **kw)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def _same_logits(hf: transformers.PreTrainedModel, model: Model) -> None:
    with torch.no_grad():
        theirs = hf(_ids()).logits.float()
    ours = model.apply(model.params, {"input_ids": _ids()}).float()
    tol = 1e-4 if model.config.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------- shards


def test_sharded_hf_checkpoint_loads(tmp_path: Path) -> None:
    hf = _hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in _files(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in _files(tmp_path)
    model = from_pretrained(tmp_path)
    _same_logits(hf, model)


def test_save_sharded_loads_in_transformers_and_back(tmp_path: Path) -> None:
    hf = _hf_llama()
    hf.save_pretrained(tmp_path / "src")
    model = from_pretrained(tmp_path / "src")
    out = save_pretrained(model, tmp_path / "out", max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(hf.state_dict())
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    assert index["metadata"]["total_size"] == total
    for name in shards:  # each shard within the limit (no tensor here is above it alone)
        assert sum(t.numel() * 4 for t in load_file(out / name).values()) <= 20_000
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _same_logits(reloaded, model)
    T.assert_same_structure(from_pretrained(out).params, model.params)

    # Saving again into the same directory, unsharded, leaves no stale shards behind.
    save_pretrained(model, out)
    assert [f for f in _files(out) if "safetensors" in f] == ["model.safetensors"]
    _same_logits(hf, from_pretrained(out))


def test_max_shard_size_strings() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234
    for bad in ("five", "3XB", 0, "-1MB"):
        with pytest.raises(ConfigError, match="max_shard_size"):
            parse_size(bad)


# ---------------------------------------------------------------- tied heads and dtypes


def test_tied_model_round_trips(tmp_path: Path) -> None:
    hf = _hf_llama(tied=True)
    hf.save_pretrained(tmp_path / "src")
    with safe_open(tmp_path / "src" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    model = from_pretrained(tmp_path / "src")
    assert model.config.tie_word_embeddings and "lm_head" not in model.params
    _same_logits(hf, model)

    out = save_pretrained(model, tmp_path / "out")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    _same_logits(reloaded, model)


def test_tied_checkpoint_with_a_stored_head_loads(tmp_path: Path) -> None:
    hf = _hf_llama(tied=True)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_pretrained(tmp_path)
    assert "lm_head" not in model.params
    _same_logits(hf, model)


def test_dtype_from_file_and_cast_on_load(tmp_path: Path) -> None:
    hf = _hf_llama()
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = from_pretrained(tmp_path / "bf16")
    assert model.config.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in T.leaves(model.params))
    _same_logits(hf, model)

    wide = from_pretrained(tmp_path / "bf16", dtype="float32")
    assert wide.config.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in T.leaves(wide.params))
    out = save_pretrained(wide, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert from_pretrained(tmp_path / "bf16", dtype=torch.float16).config.dtype == torch.float16
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        from_pretrained(tmp_path / "bf16", dtype="int8")


# ---------------------------------------------------------------- export of trained params


def test_export_of_initialised_params_loads_in_transformers(tmp_path: Path) -> None:
    config = TransformerConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        init_std=0.2,
    )
    params = init(config, rng.key(0))
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    out = save_pretrained(
        (config, params), tmp_path / "out", tokenizer_files=[tok], extra_config={"eos_token_id": 3}
    )
    assert _files(out) == ["config.json", "model.safetensors", "tokenizer.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    written = json.loads((out / "config.json").read_text())
    assert written["eos_token_id"] == 3 and written["pad_token_id"] is None
    _same_logits(hf, Model(config=config, params=params))


def test_special_token_ids_are_carried_over(tmp_path: Path) -> None:
    hf = _hf_llama(bos_token_id=3, eos_token_id=[4, 5], pad_token_id=6)
    hf.save_pretrained(tmp_path / "src")
    model = from_pretrained(tmp_path / "src")
    assert model.eos_token_ids == (4, 5)
    out = save_pretrained(model, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
        3,
        [4, 5],
        6,
    )


def test_export_errors(tmp_path: Path) -> None:
    config = TransformerConfig(
        vocab_size=11, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2
    )
    params = init(config, rng.key(0))
    lora = {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 16)}
    extra = T.unflatten({**T.flatten(params), **lora})
    with pytest.raises(CheckpointError, match="lora_A"):
        save_pretrained((config, extra), tmp_path / "a")
    with pytest.raises(CheckpointError, match="tokenizer file"):
        save_pretrained((config, params), tmp_path / "b", tokenizer_files=[tmp_path / "nope"])


# ---------------------------------------------------------------- errors on load


def _write_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError) as info:
        from_pretrained(tmp_path / "gpt2")
    message = str(info.value)
    assert "'gpt2'" in message and "config.json" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        assert supported in message

    _hf_llama().save_pretrained(tmp_path / "cls")
    _write_config(tmp_path / "cls", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ConfigError, match="LlamaForSequenceClassification"):
        from_pretrained(tmp_path / "cls")


def test_unsupported_rope_type(tmp_path: Path) -> None:
    _hf_llama().save_pretrained(tmp_path)
    _write_config(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"'yarn'.*default, linear, llama3"):
        from_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    _hf_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")

    def write(t: dict[str, torch.Tensor]) -> None:
        save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})

    write({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj"):
        from_pretrained(tmp_path)
    write({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"
    ):
        from_pretrained(tmp_path)
    write({**tensors, "model.norm.weight": torch.ones(33)})
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(33,\)"):
        from_pretrained(tmp_path)
    write({**tensors, "model.rotary_emb.inv_freq": torch.ones(4)})  # an old buffer: ignored
    from_pretrained(tmp_path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        from_pretrained(tmp_path)
    _hf_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*safetensors"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- config.json variants


def test_v4_style_config_keys() -> None:
    hf = {
        "model_type": "llama",
        **SMALL,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "original_max_position_embeddings": 64},
        "max_position_embeddings": 256,
        "torch_dtype": "bfloat16",
    }
    config = TransformerConfig.from_hf_dict(hf)
    assert config.rope_theta == 500000.0 and config.dtype == torch.bfloat16
    assert config.rope_scaling == RopeScaling(
        rope_type="llama3", factor=32.0, original_max_position_embeddings=64
    )
    assert config.num_kv_heads == 2 and config.head_dim == 8
    # The architectures entry alone identifies the family.
    no_type = {**SMALL, "architectures": ["MistralForCausalLM"], "sliding_window": 7}
    assert TransformerConfig.from_hf_dict(no_type).sliding_window == 7


def test_gemma_legacy_gelu_means_tanh() -> None:
    hf = {"model_type": "gemma", **SMALL, "head_dim": 8, "hidden_act": "gelu"}
    assert TransformerConfig.from_hf_dict(hf).hidden_act == "gelu_pytorch_tanh"
    assert TransformerConfig.from_hf_dict(hf).tie_word_embeddings  # Gemma's default


def test_family_rules() -> None:
    kw: dict[str, Any] = {
        "vocab_size": 10,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_layers": 2,
        "num_heads": 2,
    }
    with pytest.raises(ConfigError, match=r"family 'gpt2'.*llama, mistral"):
        TransformerConfig(**kw, family="gpt2")
    with pytest.raises(ConfigError, match="llama has no sliding-window"):
        TransformerConfig(**kw, sliding_window=4)
    with pytest.raises(ConfigError, match="attn_logit_softcap exists on gemma2 only"):
        TransformerConfig(**kw, family="mistral", attn_logit_softcap=5.0)
    with pytest.raises(ConfigError, match="qwen2 has a bias on q/k/v only"):
        TransformerConfig(**kw, family="qwen2", qkv_bias=False)
    with pytest.raises(ConfigError, match="gemma2 needs sliding_window"):
        TransformerConfig(**kw, family="gemma2")
    with pytest.raises(ConfigError, match="sliding layers but sliding_window is None"):
        TransformerConfig(**kw, family="qwen3", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="hidden_act 'relu'"):
        TransformerConfig(**kw, hidden_act="relu")
    assert TransformerConfig(**kw, family="qwen2").qkv_bias is True
    assert TransformerConfig(**kw, family="gemma").hidden_act == "gelu_pytorch_tanh"


def test_export_keeps_the_source_configs_other_keys(tmp_path: Path) -> None:
    hf = _hf_llama(bos_token_id=3, eos_token_id=4, attention_dropout=0.0, use_cache=False)
    hf.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    hf.save_pretrained(tmp_path / "src")
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    source["torch_dtype"] = "bfloat16"  # the older spelling, contradicting the float32 params
    source["rope_theta"] = 10000.0  # older spelling of what rope_parameters now holds
    (tmp_path / "src" / "config.json").write_text(json.dumps(source))
    model = from_pretrained(tmp_path / "src")
    generation = {"eos_token_id": [4, 5], "pad_token_id": 4, "bos_token_id": 3}
    out = save_pretrained(
        (model.config, model.params),
        tmp_path / "out",
        base_config=model.hf_config,
        extra_config={"eos_token_id": 5},
        generation_config=generation,
    )
    written = json.loads((out / "config.json").read_text())
    assert written["use_cache"] is False and written["attention_dropout"] == 0.0
    assert (written["bos_token_id"], written["eos_token_id"]) == (3, 5)
    for dropped in ("torch_dtype", "quantization_config", "transformers_version", "rope_theta"):
        assert dropped not in written, dropped
    assert written["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == generation
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.float32 and reloaded.generation_config.eos_token_id == [4, 5]
    _same_logits(reloaded, model)


def test_generation_config_json() -> None:
    base = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": 7, "transformers_version": "4.4"}
    got = generation_config_json(bos_id=1, eos_ids=[2, 9, 2], pad_id=None, base=base)
    # settings kept, ids replaced, duplicates dropped, pad falls back to the eos
    assert got == {
        "temperature": 0.6,
        "top_p": 0.9,
        "bos_token_id": 1,
        "eos_token_id": [2, 9],
        "pad_token_id": 2,
    }
    assert generation_config_json(bos_id=None, eos_ids=[2], pad_id=0)["eos_token_id"] == 2
    assert generation_config_json(bos_id=None, eos_ids=[2], pad_id=0)["pad_token_id"] == 0
    assert generation_config_json(bos_id=None, eos_ids=[], pad_id=None)["pad_token_id"] is None
