"""Greedy generation: left padding is invisible, and tokens equal ``transformers`` generate."""

from __future__ import annotations

import pytest
import torch
import transformers

from tscale.core import rng
from tscale.core import tree as T
from tscale.errors import ShapeError
from tscale.models import Transformer, TransformerConfig, greedy

transformers.logging.set_verbosity_error()


CONFIG = TransformerConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.2,  # large enough that greedy continuations vary instead of repeating
    tie_word_embeddings=False,
)
MODEL = Transformer(CONFIG)
PARAMS = MODEL.init(rng.key(3))
PROMPTS = [[5, 9, 2, 33], [7], [40, 41, 42, 43, 44, 45, 46], [1, 1]]
PAD = 0
NEVER = -1  # an eos id no model emits


def hf_generate(prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """New tokens of HF greedy generation (KV cache, left-padded batch), each cut at eos."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG.to_hf_dict()))
    model.load_state_dict(T.flatten(PARAMS), strict=True)
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=PAD,
        )
    rows = [row[width:] for row in out.tolist()]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def test_left_padded_batch_equals_each_prompt_alone() -> None:
    batched = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=8, eos_id=NEVER, pad_id=PAD)
    alone = [greedy(MODEL.apply, PARAMS, [p], max_new_tokens=8, eos_id=NEVER, pad_id=PAD)[0]
             for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == 8 for row in batched)


def test_pad_id_value_does_not_matter() -> None:
    a = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=5, eos_id=NEVER, pad_id=0)
    b = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=5, eos_id=NEVER, pad_id=37)
    assert a == b


def test_equals_transformers_generate() -> None:
    ours = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=NEVER, pad_id=PAD)
    never = CONFIG.vocab_size + 1
    for prompt, row in zip(PROMPTS, ours, strict=True):
        assert [row] == hf_generate([prompt], 10, eos_id=never)
    assert ours == hf_generate(PROMPTS, 10, eos_id=never)  # HF's own left padding agrees
    assert len({tuple(r) for r in ours}) > 1  # the prompts lead to different continuations


def test_stops_at_eos_and_excludes_it() -> None:
    free = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=None, pad_id=PAD)
    eos = free[0][3]  # a token the first prompt emits (at step 4 or earlier)
    stopped = greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=PAD)
    for row_free, row in zip(free, stopped, strict=True):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row == row_free[:cut]
        assert eos not in row
    assert 0 < len(stopped[0]) < 10 and any(len(row) == 10 for row in stopped)
    assert stopped == hf_generate(PROMPTS, 10, eos_id=eos)


def test_edge_cases() -> None:
    assert greedy(MODEL.apply, PARAMS, PROMPTS, max_new_tokens=0, eos_id=1, pad_id=PAD) == [
        [] for _ in PROMPTS
    ]
    assert greedy(MODEL.apply, PARAMS, [], max_new_tokens=3, eos_id=1, pad_id=PAD) == []
    with pytest.raises(ShapeError, match="prompt 1 is empty"):
        greedy(MODEL.apply, PARAMS, [[1], []], max_new_tokens=3, eos_id=1, pad_id=PAD)
    with pytest.raises(ShapeError, match="max_new_tokens"):
        greedy(MODEL.apply, PARAMS, [[1]], max_new_tokens=-1, eos_id=1, pad_id=PAD)
