"""Shared-prefix branches (``batch["branch_ids"]``) through the model's kernel attention path.

A row holds preference groups in the contract's layout (issue 14, stage 2, share_prompt=True):
the prompt but its last token with branch 0, then per completion a copy of the last prompt token
and the completion, with the branch's id and positions restarting at the prompt length. Each
branch's logits must equal the model's default (SDPA) logits on the unpacked ``prompt +
completion`` alone, so this checks the kernels' mask and its wiring without relying on the SDPA
path's own ``branch_ids`` support. ``attention_backend`` "torch"/"auto" take the kernels' PyTorch
path on CPU; "triton" runs the Triton kernel under the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import attrs
import pytest
import torch

from tscale.core import rng as R
from tscale.core.grad import value_and_grad
from tscale.kernels import flash_attention
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig, apply
from tscale.testing import assert_trees_close

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # imported in compiled mode, as tests/kernels/conftest.py explains
    _outer = os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401
    finally:
        if _outer is not None:
            os.environ["TRITON_INTERPRET"] = _outer

VOCAB = 61
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,  # GQA; head_dim 16 (a Triton head dim)
    "max_position_embeddings": 64,
}
# No window shorter than the row: a window counts packed positions, not the unpacked sequence's.
CONFIGS = {
    "llama-gqa": TransformerConfig(**BASE),
    "qwen3-qknorm": TransformerConfig(**BASE, family="qwen3"),
    "gemma2-softcap": TransformerConfig(
        **BASE,
        family="gemma2",
        sliding_window=64,
        attn_logit_softcap=0.05,
        query_pre_attn_scalar=24.0,
    ),
}
GROUPS = [(6, [4, 7]), (3, [5, 2, 6])]  # (prompt length, completion lengths) per document
S = 48


def _row(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[tuple[list[int], list[int]]]]:
    """One packed row and, per branch, its unpacked token ids and its slots in the row."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    doc: list[int] = []
    branch: list[int] = []
    pos: list[int] = []
    unpacked = []
    for d, (p, lengths) in enumerate(GROUPS, start=1):
        prompt = torch.randint(0, VOCAB, (p,), generator=g).tolist()
        ids += prompt[:-1]
        doc += [d] * (p - 1)
        branch += [0] * (p - 1)
        pos += list(range(p - 1))
        for b, n in enumerate(lengths, start=1):
            completion = torch.randint(0, VOCAB, (n,), generator=g).tolist()
            slots = list(range(len(ids), len(ids) + n + 1))
            ids += [prompt[-1], *completion]
            doc += [d] * (n + 1)
            branch += [b] * (n + 1)
            pos += list(range(p - 1, p + n))
            unpacked.append((prompt + completion, slots))
    pad = S - len(ids)
    batch = {
        "input_ids": torch.tensor([ids + [0] * pad]),
        "doc_ids": torch.tensor([doc + [0] * pad]),
        "branch_ids": torch.tensor([branch + [0] * pad]),
        "position_ids": torch.tensor([pos + [0] * pad]),
    }
    return batch, unpacked


def _params(config: TransformerConfig):
    return Transformer(config).init(R.key(0))


def _interpret_and_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Set TRITON_INTERPRET=1 and record the attention kernel's Triton module loads."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    original = flash_attention.triton_module

    def spy(name: str) -> Any:
        calls.append(name)
        return original(name)

    monkeypatch.setattr(flash_attention, "triton_module", spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_branch_logits_equal_unpacked_sequences(name: str, backend: str, monkeypatch):
    calls: list[str] = []
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        calls = _interpret_and_count(monkeypatch)
    config = CONFIGS[name]
    params = _params(config)
    batch, unpacked = _row()
    logits = apply(attrs.evolve(config, attention_backend=backend), params, batch)
    for ids, slots in unpacked:
        alone = apply(config, params, {"input_ids": torch.tensor([ids])})
        prompt = len(ids) - (len(slots) - 1)
        torch.testing.assert_close(logits[0, slots], alone[0, prompt - 1 :], rtol=1e-5, atol=1e-5)
    # The Triton runs went through the kernel, once per layer.
    assert len(calls) == (config.num_layers if backend == "triton" else 0)


def test_without_branch_ids_nothing_changes():
    """Branch ids all 0 (one shared prefix, no branches) give the doc-only logits."""
    config = attrs.evolve(CONFIGS["llama-gqa"], attention_backend="torch")
    params = _params(config)
    batch, _ = _row()
    plain = {k: v for k, v in batch.items() if k != "branch_ids"}
    zeros = plain | {"branch_ids": torch.zeros_like(batch["branch_ids"])}
    torch.testing.assert_close(apply(config, params, zeros), apply(config, params, plain))
    assert not torch.allclose(apply(config, params, batch), apply(config, params, plain))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_gradients_equal_torch_path(monkeypatch):
    """The loss and every parameter gradient through the Triton kernel (interpreted) equal the
    kernels' PyTorch path's on a row with branches."""
    calls = _interpret_and_count(monkeypatch)
    config = TransformerConfig(**{**BASE, "num_layers": 1})
    params = _params(config)
    batch, _ = _row(1)
    labels = torch.roll(batch["input_ids"], -1, 1)
    labels[batch["doc_ids"] == 0] = -100
    batch["labels"] = labels

    def loss(backend: str):
        cfg = attrs.evolve(config, attention_backend=backend)
        return value_and_grad(make_lm_loss(lambda p, b: apply(cfg, p, b)))(params, batch)

    (l0, _), g0 = loss("torch")
    (l1, _), g1 = loss("triton")
    assert calls == ["_flash_attention_triton"] * 2  # forward and backward
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=2e-5)
    assert_trees_close(g1, g0, rtol=2e-5, atol=2e-5)
