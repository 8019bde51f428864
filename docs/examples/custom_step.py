"""Write your own train step as one pure function: cross-entropy plus a z-loss.

This file is run by the test suite (tests/docs/test_examples.py); docs/custom_step.md walks
through it. Run it yourself with ``python docs/examples/custom_step.py``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import TrainState, rng, value_and_grad
from tscale.losses import IGNORE_INDEX, token_cross_entropy
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import (
    GradientTransformation,
    adamw,
    apply_updates,
    chain,
    clip_by_global_norm,
    warmup_cosine,
)


def make_z_loss_step(model: Transformer, tx: GradientTransformation, z_weight: float = 1e-4):
    """A step that adds ``z_weight * logsumexp(logits)**2`` per trained token (PaLM's z-loss)."""

    def loss_fn(params: TensorDictBase, batch: TensorDictBase):
        logits = model.apply(params, batch)
        ce_sum, tokens = token_cross_entropy(logits, batch["labels"])
        trained = batch["labels"] != IGNORE_INDEX
        z_sum = (torch.logsumexp(logits.float(), dim=-1).square() * trained).sum()
        # Return sums: the step divides once by the batch's token count.
        return ce_sum + z_weight * z_sum, {"tokens": tokens, "ce_sum": ce_sum}

    grad_fn = value_and_grad(loss_fn)

    def step(state: TrainState, batch: TensorDictBase):
        (_, aux), grads = grad_fn(state.params, batch)
        n = aux["tokens"].clamp_min(1)
        grads = grads.apply(lambda g: g / n)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = apply_updates(state.params, updates)  # in place: the step owns the state
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, {"loss": aux["ce_sum"] / n}  # tensors: no host sync in the step

    return step


def copy_task_batch(key: torch.Tensor, batch_size: int = 16, length: int = 8, vocab: int = 16):
    """Sequences ``x x`` (a random half, then the same half again); train on the second half."""
    half = torch.randint(3, vocab, (batch_size, length), generator=rng.generator(key))
    ids = torch.cat([half, half], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, length - 1 : -1] = ids[:, length:]  # pre-shifted: position t predicts token t+1
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[batch_size])


def main(steps: int = 60) -> list[float]:
    """Train a tiny model on the copy task; returns the loss of every step."""
    model = Transformer(
        TransformerConfig(
            vocab_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=32,
        )
    )
    tx = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(1e-2, 5, steps), weight_decay=0.01))
    init_key, data_key = rng.split(rng.key(0))
    params = model.init(init_key)
    state = TrainState.create(params, tx.init(params), data_key)
    step = make_z_loss_step(model, tx)
    losses = []
    for i in range(steps):
        state, metrics = step(state, copy_task_batch(rng.fold_in(data_key, i)))
        losses.append(metrics["loss"])
    losses = [float(x) for x in losses]  # one host sync, after the loop
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    return losses


if __name__ == "__main__":
    main()
