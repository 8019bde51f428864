"""Every supported family against ``transformers``: tiny random HF checkpoints loaded by tscale.

For each family a tiny model is built with ``transformers`` (every weight, bias and norm set to
random values, so each switch shows in the logits), saved with ``save_pretrained`` and loaded with
:func:`tscale.checkpoint.hf.from_pretrained`. Logits, packed batches, greedy generation with the
KV cache and tscale's own export are compared with the HF model (eager attention, float32).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import transformers

from tscale.checkpoint.hf import from_pretrained, save_pretrained
from tscale.core import tree as T
from tscale.models import FAMILIES, Model, TransformerConfig, apply, generate

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 97
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so all three frequency bands occur
}
# name -> (HF config class, kwargs). Windows of 4-5 tokens are shorter than the test sequences.
SPECS: dict[str, tuple[type, dict[str, Any]]] = {
    "llama3": (transformers.LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-bias-linear-tied": (
        transformers.LlamaConfig,
        {
            "attention_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
        },
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": 4}),
    "qwen2": (
        transformers.Qwen2Config,
        {
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),
    "gemma": (transformers.GemmaConfig, {"head_dim": 32}),
    "gemma2": (
        transformers.Gemma2Config,
        {
            "num_hidden_layers": 3,
            "head_dim": 32,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "phi3": (
        transformers.Phi3Config,
        {
            "sliding_window": 5,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}
NAMES = list(SPECS)
ATOL = 1e-4


def _hf_model(name: str) -> transformers.PreTrainedModel:
    """A tiny random HF model of the family: norms near identity, all else ~N(0, 0.15)."""
    cls, kwargs = SPECS[name]
    config = cls(**{**BASE, **kwargs})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(len(name))
    plus_one = config.model_type.startswith("gemma")
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in key:
                p.copy_((0.0 if plus_one else 1.0) + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


@functools.cache
def _checkpoint(name: str, root: str) -> tuple[transformers.PreTrainedModel, Path]:
    model = _hf_model(name)
    path = Path(root) / name
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("families"))


def _load(name: str, root: str) -> tuple[transformers.PreTrainedModel, Model]:
    hf, path = _checkpoint(name, root)
    return hf, from_pretrained(path)


def _tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def test_every_family_is_covered() -> None:
    assert {SPECS[n][0]().model_type for n in NAMES} == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name: str, root: str) -> None:
    hf, model = _load(name, root)
    assert model.config.family == hf.config.model_type
    assert set(T.flatten(model.params)) | {"lm_head.weight"} >= set(hf.state_dict())
    ids = _tokens(3, 13)
    ours = model.apply(model.params, {"input_ids": ids})
    theirs = _hf_logits(hf, ids)
    assert ours.shape == (3, 13, VOCAB) and ours.dtype == torch.float32
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# A switch whose removal must change the logits: proves the test above exercises it.
SWITCHES = [
    ("llama3", {"rope_scaling": None}),
    ("llama-bias-linear-tied", {"rope_scaling": None}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {"sliding_window": None, "layer_types": None}),
    ("qwen2", {"layer_types": None}),  # sliding on every layer instead of the top one only
    ("gemma2", {"attn_logit_softcap": None}),
    ("gemma2", {"final_logit_softcap": None}),
    ("gemma2", {"query_pre_attn_scalar": None}),
    ("gemma2", {"layer_types": None}),
    ("phi3", {"partial_rotary_factor": 1.0}),
    ("phi3", {"sliding_window": None}),
]


@pytest.mark.parametrize(("name", "changes"), SWITCHES, ids=lambda v: str(v))
def test_each_family_switch_matters(name: str, changes: dict[str, Any], root: str) -> None:
    _, model = _load(name, root)
    ids = _tokens(2, 13)
    ours = model.apply(model.params, {"input_ids": ids})
    other = attrs.evolve(model.config, **changes)
    assert (apply(other, model.params, {"input_ids": ids}) - ours).abs().max() > 1e-3


def _packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return doc_ids, pos


@pytest.mark.parametrize("name", NAMES)
def test_packed_batch_equals_transformers_per_document(name: str, root: str) -> None:
    hf, model = _load(name, root)
    lengths = [6, 9, 3]
    ids = _tokens(1, sum(lengths), seed=1)
    doc_ids, pos = _packed(lengths)
    packed = model.apply(model.params, {"input_ids": ids, "position_ids": pos, "doc_ids": doc_ids})
    start = 0
    for n in lengths:
        alone = _hf_logits(hf, ids[:, start : start + n])
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=ATOL, rtol=0)
        start += n


PROMPTS = [[5, 9, 2, 33, 7, 8], [7, 3], [40, 41, 42, 43]]
PAD = 0


def _hf_generate(hf: transformers.PreTrainedModel, n: int) -> list[list[int]]:
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=VOCAB + 1,  # never emitted: every row runs the full n tokens
            pad_token_id=PAD,
        )
    return [row[width:] for row in out.tolist()]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_with_kv_cache_equals_transformers_generate(name: str, root: str) -> None:
    hf, model = _load(name, root)
    ours = generate(model, model.params, PROMPTS, max_new_tokens=20, pad_id=PAD)
    assert ours == _hf_generate(hf, 20)
    assert all(len(row) == 20 for row in ours)
    assert len({tuple(r) for r in ours}) == len(PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_loads_in_transformers(name: str, root: str, tmp_path: Path) -> None:
    hf, model = _load(name, root)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(hf)
    for key, value in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    ids = _tokens(2, 11, seed=2)
    ours = model.apply(model.params, {"input_ids": ids})
    torch.testing.assert_close(_hf_logits(reloaded, ids), _hf_logits(hf, ids), atol=0, rtol=0)
    torch.testing.assert_close(ours, _hf_logits(reloaded, ids), atol=ATOL, rtol=0)
    again = from_pretrained(out)
    assert again.config == model.config


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_hf_dict(name: str, root: str) -> None:
    hf, model = _load(name, root)
    config = model.config
    as_hf = config.to_hf_dict()
    assert as_hf["model_type"] == hf.config.model_type
    assert as_hf["architectures"] == [type(hf).__name__]
    assert TransformerConfig.from_hf_dict(as_hf) == config
    # The family's HF config class reads it back to the same architecture.
    hf_config = type(hf.config)(**as_hf)
    assert TransformerConfig.from_hf_dict(hf_config.to_dict()) == config
