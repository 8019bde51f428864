"""The reward task's loss on hand-built group batches: against a loop over the groups, against
TRL's ``RewardTrainer.compute_loss`` (called live on a bare trainer), through a real reward
model with gradients, and split into microbatches."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from tscale.config.load import load_config
from tscale.core import metrics as M
from tscale.core import rng as R
from tscale.errors import ConfigError, ShapeError
from tscale.models.reward import RewardHead, RewardModel
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.tasks import TASKS
from tscale.tasks.base import TaskContext
from tscale.tasks.reward import RewardTask, evaluate_pairs, make_reward_loss, split_score

# ---------------------------------------------------------------- hand-built group rows

# One row of the shared-prompt layout per list: (doc, branch) per token. Docs 1..3 in row 0
# (doc 2 has no rejected branch: not a pair), docs 1..2 in row 1, padding (0, 0) at the ends.
_ROWS = [
    [(1, 0), (1, 0), (1, 1), (1, 1), (1, 2), (1, 2), (1, 2), (2, 0), (2, 1), (2, 1), (3, 0),
     (3, 1), (3, 2), (3, 2), (0, 0), (0, 0)],
    [(1, 0), (1, 0), (1, 0), (1, 1), (1, 2), (1, 2), (2, 0), (2, 1), (2, 1), (2, 1), (2, 2),
     (2, 2), (0, 0), (0, 0), (0, 0), (0, 0)],
]  # fmt: skip


def _layout() -> dict[str, torch.Tensor]:
    doc = torch.tensor([[d for d, _ in row] for row in _ROWS])
    branch = torch.tensor([[k for _, k in row] for row in _ROWS])
    return {"doc_ids": doc, "branch_ids": branch}


def _pairs_by_loop(scores: torch.Tensor) -> list[tuple[float, float]]:
    """(chosen, rejected) of every doc that has both, from each branch's last token."""
    out = []
    for b, row in enumerate(_ROWS):
        last: dict[tuple[int, int], int] = {}
        for t, (d, k) in enumerate(row):
            if d > 0 and k > 0:
                last[(d, k)] = t
        for d in sorted({d for d, _ in last}):
            if (d, 1) in last and (d, 2) in last:
                out.append((float(scores[b, last[(d, 1)]]), float(scores[b, last[(d, 2)]])))
    return out


def _reference_loss(pairs: list[tuple[float, float]], margin: float, coef: float | None) -> float:
    c = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    losses = -F.logsigmoid(c - r - margin)
    if coef is not None:
        losses = losses + coef * (c + r) ** 2
    return float(losses.mean())


def _fixed_scores(scores: torch.Tensor):
    """An apply function that returns ``scale * scores`` (scale a trainable param)."""

    def apply_fn(params: Any, batch: Any, **kw: Any) -> torch.Tensor:
        return (params["scale"] * scores)[..., None]

    return apply_fn


@pytest.mark.parametrize(("margin", "coef"), [(0.0, None), (0.5, None), (0.0, 0.01), (1.0, 0.1)])
def test_loss_equals_a_loop_over_the_groups(margin: float, coef: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 16, generator=g, dtype=torch.float64) * 2
    batch = _layout()
    params = TensorDict({"scale": torch.tensor(1.0, dtype=torch.float64)}, batch_size=[])
    loss_fn = make_reward_loss(
        _fixed_scores(scores), margin=margin, center_rewards_coefficient=coef
    )
    loss_sum, aux = loss_fn(params, batch)
    pairs = _pairs_by_loop(scores)
    assert len(pairs) == 4 and int(aux["tokens"]) == 4
    assert float(loss_sum) / 4 == pytest.approx(_reference_loss(pairs, margin, coef), rel=1e-12)
    got = M.finalise(aux)
    c = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    assert float(got["accuracy"]) == pytest.approx(float((c > r).double().mean()))
    assert float(got["margin"]) == pytest.approx(float((c - r).mean()))
    assert float(got["rewards/chosen"]) == pytest.approx(float(c.mean()))
    assert float(got["rewards/rejected"]) == pytest.approx(float(r.mean()))
    assert float(got["mean_reward"]) == pytest.approx(float(torch.cat([c, r]).mean()))
    assert float(got["min_reward"]) == pytest.approx(float(torch.cat([c, r]).min()))
    assert float(got["max_reward"]) == pytest.approx(float(torch.cat([c, r]).max()))


def _trl_reward(chosen: torch.Tensor, rejected: torch.Tensor, margin: float, coef: float | None):
    """TRL 1.16's ``RewardTrainer.compute_loss`` on the given rewards (one process)."""
    from trl.trainer.reward_trainer import RewardTrainer

    trainer = object.__new__(RewardTrainer)
    ident = lambda t: t  # noqa: E731 - one process: gathers are the identity
    for name, value in {
        "accelerator": SimpleNamespace(gather=ident, gather_for_metrics=ident),
        "model": SimpleNamespace(training=True),
        "args": SimpleNamespace(center_rewards_coefficient=coef),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }.items():
        setattr(trainer, name, value)
    logits = torch.cat([chosen, rejected])[:, None]
    inputs: dict[str, Any] = {"attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.full_like(chosen, margin)
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("margin", "coef"), [(0.0, None), (0.7, 0.01)])
def test_loss_and_metrics_equal_trl(margin: float, coef: float | None) -> None:
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 16, generator=g, dtype=torch.float64)
    params = TensorDict({"scale": torch.tensor(1.0, dtype=torch.float64)}, batch_size=[])
    loss_fn = make_reward_loss(
        _fixed_scores(scores), margin=margin, center_rewards_coefficient=coef
    )
    loss_sum, aux = loss_fn(params, _layout())
    pairs = _pairs_by_loop(scores)
    chosen = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    rejected = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    trl_loss, trl_metrics = _trl_reward(chosen, rejected, margin, coef)
    ours = M.finalise(aux)
    assert float(loss_sum / aux["tokens"]) == pytest.approx(trl_loss, rel=1e-12)
    for name in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert float(ours[name]) == pytest.approx(trl_metrics[name], rel=1e-12), name


def test_microbatches_reduce_to_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 16, generator=g, dtype=torch.float64)
    batch = _layout()
    params = TensorDict({"scale": torch.tensor(1.5, dtype=torch.float64)}, batch_size=[])
    whole_sum, whole = make_reward_loss(_fixed_scores(scores))(params, batch)
    parts = [
        make_reward_loss(_fixed_scores(scores[i : i + 1]))(
            params, {k: v[i : i + 1] for k, v in batch.items()}
        )
        for i in range(2)
    ]
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(whole_sum), rel=1e-12)
    merged = M.finalise(M.combine(parts[0][1], parts[1][1]))
    for name, value in M.finalise(whole).items():
        assert float(merged[name]) == pytest.approx(float(value), rel=1e-12), name


def test_loss_through_a_reward_model_has_gradients_for_the_head() -> None:
    config = TransformerConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        dtype=torch.float64,
    )  # fmt: skip
    model = RewardModel(Transformer(config), RewardHead.of(config))
    params = model.init(R.key(0))
    batch = {
        **_layout(),
        "input_ids": torch.randint(3, 40, (2, 16), generator=torch.Generator().manual_seed(3)),
    }
    loss_fn = RewardTask(center_rewards_coefficient=0.01).loss(
        TaskContext(model=model, apply_fn=model.apply, data=None, device=torch.device("cpu"),
                    config=None)
    )  # fmt: skip

    def mean_loss(p: Any) -> torch.Tensor:
        s, aux = loss_fn(p, batch)
        return s / aux["tokens"]

    grads = torch.func.grad(mean_loss)(params)
    assert float(grads["score", "weight"].abs().sum()) > 0
    assert float(grads["model", "layers", "0", "mlp", "up_proj", "weight"].abs().sum()) > 0
    # the loss equals the loop over the model's own per-token scores
    with torch.no_grad():
        scores = model.apply(params, batch)[..., 0]
    expected = _reference_loss(_pairs_by_loop(scores), 0.0, 0.01)
    assert float(mean_loss(params)) == pytest.approx(expected, rel=1e-10)
    # logits_index (an LM loss's trained positions) is ignored: rewards read sequence ends
    index = torch.zeros(2, 3, dtype=torch.int64)
    assert float(mean_loss(params)) == float(
        loss_fn(params, {**batch, "logits_index": index})[0] / 4
    )
    metrics = evaluate_pairs(loss_fn, params, [batch, batch])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-10)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_no_pairs_gives_zero_loss_and_count() -> None:
    scores = torch.randn(1, 4, dtype=torch.float64)
    batch = {"doc_ids": torch.tensor([[1, 1, 1, 0]]), "branch_ids": torch.tensor([[0, 1, 1, 0]])}
    params = TensorDict({"scale": torch.tensor(1.0, dtype=torch.float64)}, batch_size=[])
    loss_sum, aux = make_reward_loss(_fixed_scores(scores))(params, batch)
    assert float(loss_sum) == 0.0 and int(aux["tokens"]) == 0
    assert math.isinf(float(M.finalise(aux)["min_reward"]))


def test_several_labels_are_refused() -> None:
    params = TensorDict({}, batch_size=[])
    loss_fn = make_reward_loss(lambda p, b, **kw: torch.zeros(2, 16, 2))
    with pytest.raises(ShapeError, match="one score per token"):
        loss_fn(params, _layout())


def test_split_score_and_registration() -> None:
    assert TASKS["reward"] is RewardTask
    config = TransformerConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2
    )
    params = RewardModel(Transformer(config), RewardHead.of(config)).init(R.key(0))
    decoder, head = split_score(params)
    assert "score" not in decoder.keys() and list(head.keys()) == ["score"]  # noqa: SIM118


def test_config_domains() -> None:
    cfg = load_config(
        {"task": {"type": "reward", "margin": 0.5, "center_rewards_coefficient": 0.01}}
    )
    assert cfg.task == RewardTask(margin=0.5, center_rewards_coefficient=0.01)
    with pytest.raises(ConfigError, match=r"task\.margin"):
        load_config({"task": {"type": "reward", "margin": -1.0}})
    with pytest.raises(ConfigError, match=r"task\.center_rewards_coefficient"):
        load_config({"task": {"type": "reward", "center_rewards_coefficient": -0.1}})
