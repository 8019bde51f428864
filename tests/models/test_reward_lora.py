"""A reward model over the LoRA stack: the adapters and the head train (nothing else), the cast
sits outside, training on pairs lowers the loss, and the merged export scores as tscale does in
``transformers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from tscale.checkpoint.reward import save_reward_pretrained
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.models.lora import LoraConfig
from tscale.models.reward import RewardHead, RewardModel, with_score_head
from tscale.models.stack import CastModel, stack_model
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.alias import adamw
from tscale.step.compose import make_train_step
from tscale.tasks.reward import make_reward_loss, split_score

transformers = pytest.importorskip("transformers")

PAD = 0


def _pairs(n: int, s: int, vocab: int, seed: int) -> TensorDict:
    """``n`` rows of one group each, shared-prompt layout: a 3-token prompt, a chosen
    completion that ends with token 5 and a rejected one that ends with token 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, s), PAD)
    doc = torch.zeros((n, s), dtype=torch.int64)
    branch = torch.zeros((n, s), dtype=torch.int64)
    pos = torch.zeros((n, s), dtype=torch.int64)
    for r in range(n):
        prompt = torch.randint(7, vocab, (3,), generator=g)
        chosen = torch.cat([torch.randint(7, vocab, (2,), generator=g), torch.tensor([5])])
        rejected = torch.cat([torch.randint(7, vocab, (3,), generator=g), torch.tensor([6])])
        row = torch.cat([prompt, chosen, prompt[-1:], rejected])
        ids[r, : len(row)] = row
        doc[r, : len(row)] = 1
        branch[r, 2:6], branch[r, 6:11] = 1, 2
        pos[r, :6] = torch.arange(6)
        pos[r, 6:11] = torch.arange(2, 7)
    fields = {"input_ids": ids, "doc_ids": doc, "branch_ids": branch, "position_ids": pos}
    return TensorDict(fields, batch_size=[n])


def test_lora_reward_model_trains_adapters_and_head_and_exports(tmp_path: Path) -> None:
    config = TransformerConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    decoder = Transformer(config)
    full = with_score_head(decoder.init(R.key(0)), R.key(1), config)
    base, head = split_score(full)
    lora = stack_model(decoder, lora=LoraConfig(rank=4, alpha=8), base=base)
    model = RewardModel(lora, RewardHead.of(config, pad_id=PAD))
    params = T.combine(lora.init(R.key(2)), head)
    names = set(T.flatten(params))
    assert "score.weight" in names and all(
        n == "score.weight" or "lora_" in n for n in names
    )  # the trainable params: adapters and head only

    batch = _pairs(8, 12, config.vocab_size, seed=0)
    plain = RewardModel(decoder, RewardHead.of(config))
    # B = 0 at init: the LoRA reward model is the plain one
    torch.testing.assert_close(model.apply(params, batch), plain.apply(full, batch))

    stacked = CastModel(model, torch.bfloat16)  # the cast outside converts the head too
    tx = adamw(1e-2)
    step = make_train_step(make_reward_loss(stacked.apply), tx)
    state = TrainState.create(params, tx.init(params), R.key(3))
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert first == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=0.1)
    assert float(metrics["loss"]) < 0.5 * first and float(metrics["accuracy"]) == 1.0

    # export as `tscale export` does: merge the adapters, keep the head
    adapters, trained_head = split_score(state.params)
    dense = T.combine(lora.merged(adapters), trained_head)
    out = save_reward_pretrained(config, dense, tmp_path / "rm", pad_id=PAD)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[9, 10, 11, 12, 5, PAD, PAD], [9, 13, 11, 12, 14, 15, 6]])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        ours = model.sequence_scores(state.params, {"input_ids": ids})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
