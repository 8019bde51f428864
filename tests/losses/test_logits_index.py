"""The LM head on trained positions only (``logits_index``) gives the loss of every position's."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core.grad import value_and_grad
from tscale.data.loader import batch_iter, with_logits_index
from tscale.data.pack import pack_examples
from tscale.losses.lm import IGNORE_INDEX, make_fused_lm_loss, make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig


def _examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = (int(x) for x in torch.randint(1, 12, (2,), generator=g))
        ids = torch.randint(3, 60, (prompt + answer,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (prompt - 1) + ids[prompt:] + [IGNORE_INDEX]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_index_lists_each_rows_trained_positions_in_order():
    labels = torch.tensor([[-100, 5, -100, 7, -100, -100], [-100, -100, -100, -100, -100, -100]])
    batch = TensorDict({"input_ids": torch.zeros_like(labels), "labels": labels}, batch_size=[2])
    got = with_logits_index(batch)
    assert got["logits_index"].tolist() == [[1, 3], [5, 5]]  # padded with the last position
    assert "logits_index" not in batch  # the input batch is left as it was
    assert (labels.gather(1, got["logits_index"]) != IGNORE_INDEX).sum() == 2


def test_losses_and_gradients_equal_every_positions():
    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            dtype=torch.float64,
        )
    )
    params = model.init(R.key(0))
    examples = _examples(12, seed=1)
    packed, _ = pack_examples(examples, 32)
    batches = [*batch_iter(examples, 6, pad_id=0), *batch_iter(packed, 4, pad_id=0)]
    for loss_fn in (make_lm_loss(model.apply), make_fused_lm_loss(model, backend="torch")):
        grad_fn = value_and_grad(loss_fn)
        for batch in batches:
            (full, aux_full), g_full = grad_fn(params, batch)
            (part, aux_part), g_part = grad_fn(params, with_logits_index(batch))
            assert aux_full["tokens"] == aux_part["tokens"] > 0
            torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-12)
            for k, v in g_full.items(True, True):
                torch.testing.assert_close(g_part[k], v, rtol=1e-10, atol=1e-12)
