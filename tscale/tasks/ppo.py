"""PPO from the policy's own samples with a value function (``task.type: ppo``).

The rollout stage is GRPO's (:class:`~tscale.tasks.grpo.GRPOTask`: prompts, sampling with the KV
cache, rewards from ``task.rewards``), with groups optional (``num_generations`` may be 1) and
per-token advantages instead of group-relative ones:

1. **values** of the sampling-time critic at every completion position (the hidden state whose
   logits predict the token, as TRL's ``PPOTrainer``), without a graph; the old-policy
   log-probs (the sampler's for μ = 1, recomputed once for μ > 1) and, with β > 0, the
   reference's, as GRPO;
2. **per-token rewards** (:func:`tscale.losses.rl.kl_rewards`): ``−β · KL_t(π_old ‖ π_ref)`` at
   every completion token (``kl_estimator`` k1 or k3) plus the total reward at the last one;
3. **GAE** (:func:`tscale.losses.rl.gae`, γ and λ) → advantages and returns; the advantages are
   whitened over the completion tokens of the whole (gathered) batch with
   ``whiten_advantages``. All of it is stored in the rollout batch, so microbatches and ranks
   see the same numbers.

The loss: the clipped surrogate (:func:`tscale.losses.rl.policy_loss` with ``[N, T]``
advantages) plus ``vf_coef`` times the clipped value loss (:func:`tscale.losses.rl.value_loss`,
``cliprange_value``). Both are sums over the loss mask's tokens and share one normaliser (the
token count), so the step's global division gives TRL's ``pg_loss + vf_coef · vf_loss`` (two
token means over the same mask) for any microbatch split or world size.

The value function (:mod:`tscale.models.value`) is a trainable tree in ``params``:
``value_model: shared`` is a ``[1, H]`` head on the policy's trunk (one forward gives logits and
values), ``separate`` a critic model (the starting weights, or ``value_init_path``'s reward
model, plus its head). An export writes the policy alone (:meth:`PPOTask.export_params`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import metrics as M
from tscale.core import tree as T
from tscale.core.fields import field
from tscale.core.state import TrainState
from tscale.errors import ConfigError
from tscale.losses.rl import gae, kl_penalty, kl_rewards, policy_loss, value_loss, whiten
from tscale.models.protocol import frozen_kw
from tscale.models.reward import RewardHead, RewardModel, with_score_head
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.models.value import PolicyWithValue, find_policy_with_value, policy_params
from tscale.rl.stats import all_gather_rows, rank_and_world
from tscale.tasks.base import FrozenTree, LossFn, TaskContext, register_task
from tscale.tasks.grpo import GRPOTask, _logps, rollout_metrics

__all__ = ["PPOTask"]


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    count = m.sum()
    return float((x.double() * m).sum() / count) if count > 0 else 0.0


def _masked_std(x: torch.Tensor, m: torch.Tensor) -> float:
    count = m.sum()
    if count < 2:
        return 0.0
    mu = (x.double() * m).sum() / count
    return float((((x.double() - mu) * m) ** 2).sum().div(count - 1).sqrt())


@register_task
@attrs.frozen(kw_only=True)
class PPOTask(GRPOTask):
    """PPO with a value head: GAE over per-token KL rewards, clipped policy and value losses
    (TRL's ``PPOTrainer``; Schulman et al. 2017, arXiv:1707.06347; Ouyang et al. 2022)."""

    type: Literal["ppo"] = field(
        "ppo", "Online RL: PPO with a value function (GAE, clipped policy and value losses)."
    )
    num_generations: int = field(
        1, "Completions sampled per prompt (PPO needs no groups; TRL samples 1).", ge=1
    )
    beta: float = field(
        0.05,
        "β of the per-token KL to the reference in the rewards (TRL's kl_coef; 0: no "
        "reference pass).",
        ge=0.0,
    )
    kl_estimator: Literal["k1", "k3"] = field(
        "k1", "The per-token KL estimator of the reward: k1 (log π_old − log π_ref) or k3."
    )
    gamma: float = field(1.0, "γ: the discount of GAE.", ge=0.0, le=1.0)
    lam: float = field(0.95, "λ of GAE.", ge=0.0, le=1.0)
    whiten_advantages: bool = field(
        True, "Whiten the advantages over the completion tokens of the whole batch."
    )
    vf_coef: float = field(0.1, "Weight of the value loss beside the policy loss.", ge=0.0)
    cliprange_value: float = field(
        0.2, "Clip range of the value loss around the sampling-time values.", ge=0.0
    )
    value_model: Literal["shared", "separate"] = field(
        "shared",
        "shared: a [1, H] value head on the policy's trunk; separate: a critic model of its "
        "own (the starting weights plus a head: a second decoder's params, gradients and "
        "optimizer state, and a second forward/backward per step).",
    )
    value_init_path: str | None = field(
        None,
        "An HF *ForSequenceClassification folder (a tscale reward-model export) the separate "
        "critic starts from, as TRL starts its value model from the reward model.",
    )

    key_metrics: ClassVar[tuple[str, ...]] = ("reward", "value/error")

    # ---------------------------------------------------------------- options

    def check(self, config: Any) -> None:
        super().check(config)
        refusals = {
            "loss_type": (
                self.loss_type != "dapo",
                "ppo's policy and value losses are token means over the batch (dapo)",
            ),
            "scale_rewards": (
                self.scale_rewards != "group",
                "group scaling is GRPO's; ppo whitens its GAE advantages (task.whiten_advantages)",
            ),
            "importance_sampling_level": (
                self.importance_sampling_level != "token",
                "ppo's advantages are per token",
            ),
            "mask_zero_std_groups": (
                self.mask_zero_std_groups,
                "ppo has no groups to filter (its baseline is the value function)",
            ),
            "share_prompt": (
                self.share_prompt,
                "ppo's forward reads values at every completion row (one row per completion)",
            ),
        }
        for key, (bad, why) in refusals.items():
            if bad:
                raise ConfigError(f"task.{key}: not used by task.type ppo: {why}; remove it")
        if config.lora.enabled and self.value_model == "separate":
            raise ConfigError(
                "lora.enabled: task.value_model separate would train a whole critic beside the "
                "adapters (not built); use task.value_model: shared with LoRA, or lora.enabled: "
                "false"
            )
        if config.parallel.overlap_reduce:
            raise ConfigError(
                "parallel.overlap_reduce: task.type ppo's value trees are outside the "
                "per-layer reduction hook; set parallel.overlap_reduce: false"
            )
        if self.value_init_path is not None:
            if self.value_model != "separate":
                raise ConfigError(
                    "task.value_init_path: a reward model initialises a separate critic; set "
                    "task.value_model: separate (a shared head reads the policy's trunk)"
                )
            if not (Path(self.value_init_path) / "config.json").is_file():
                raise ConfigError(
                    f"task.value_init_path: {self.value_init_path} is not an HF folder (no "
                    "config.json); give a tscale reward-model export (tscale export of a "
                    "task.type reward run)"
                )

    # ---------------------------------------------------------------- the contract

    def extend_model(
        self,
        model: Any,
        params: TensorDictBase,
        config: TransformerConfig,
        *,
        key: torch.Tensor,
        read_reward: Callable[..., Any],
    ) -> tuple[PolicyWithValue, TensorDict]:
        """The policy with its value function: a fresh ``[1, H]`` head (shared, initialised as
        a reward model's score head), or a critic made of the starting weights plus a fresh
        head, or read from ``value_init_path`` (separate)."""
        if self.value_model == "shared":
            pv = PolicyWithValue(model, head=RewardHead.of(config))
            return pv, pv.with_value(params, key)
        leaf = next(t for t in T.leaves(params) if t.is_floating_point())
        if self.value_init_path is None:
            critic_config = config
            critic = with_score_head(T.clone(params), key, config)
        else:
            read = read_reward(self.value_init_path, dtype=leaf.dtype, device=leaf.device)
            critic_config, critic = read.config, read.params
            if read.num_labels != 1 or critic_config.vocab_size < config.vocab_size:
                raise ConfigError(
                    f"task.value_init_path: {self.value_init_path} must be a one-label reward "
                    f"model over the policy's tokens (num_labels {read.num_labels}, vocab "
                    f"{critic_config.vocab_size} < {config.vocab_size})"
                )
            critic_config = attrs.evolve(
                critic_config,
                attention_backend=config.attention_backend,
                norm_backend=config.norm_backend,
            )
        reward = RewardModel(Transformer(critic_config), RewardHead.of(critic_config))
        pv = PolicyWithValue(model, critic=reward)
        return pv, pv.with_value(params, key, critic=critic)

    def export_params(self, params: TensorDictBase) -> TensorDictBase:
        """The policy alone: an export has no value head or critic."""
        return policy_params(params)

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        """As GRPO's (a frozen copy of the starting policy when β > 0), without the value
        trees."""
        policy = policy_params(ctx.params) if ctx.params is not None else None
        return super().prepare(attrs.evolve(ctx, params=policy))

    def stat_names(self) -> list[str]:
        return [*super().stat_names(), "returns/mean", "non_score_reward"]

    # ---------------------------------------------------------------- the rollout's parts

    def _extra_inputs(
        self,
        out: TensorDict,
        state: TrainState,
        ctx: TaskContext,
        ref: Callable[..., torch.Tensor] | None,
    ) -> None:
        """The sampling-time values (one trunk forward with the shared head, the critic's
        forward otherwise), the old-policy log-probs and the reference's, without a graph."""
        pv = find_policy_with_value(ctx.model)
        params, frozen = state.params, frozen_kw(state.frozen or None)
        with torch.no_grad():
            logits = None
            if pv.shared:
                h = ctx.model.hidden_states(params, out, **frozen)
                out["old_values"] = pv.values_from_hidden(params, h).float()
                if self.num_iterations > 1:
                    logits = ctx.model.logits_from_hidden(params, h, **frozen)
            else:
                out["old_values"] = pv.critic_values(params, out).float()
                if self.num_iterations > 1:
                    logits = ctx.apply_fn(params, out, **frozen)
            if logits is not None:
                out["old_logps"] = _logps(logits, out, self.temperature)[0].detach()
            else:
                out["old_logps"] = out["sampler_logps"]
            if ref is not None:
                out["ref_logps"] = _logps(ref(out, state.frozen), out, self.temperature)[0]

    def rollout_advantages(
        self, total: torch.Tensor, batch: TensorDict
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token advantages ``[n, T]`` by GAE over the KL-shaped rewards (whitened over the
        gathered batch's completion tokens), the returns stored as ``batch["returns"]``, and
        the statistics of the global batch. An unscorable completion (reward None) scores 0."""
        rank, _ = rank_and_world()
        mask = batch["completion_mask"]
        old = batch["old_logps"]
        score = torch.nan_to_num(total.to(torch.float32), nan=0.0).to(mask.device)
        ref = batch.get("ref_logps", None)
        beta = self.beta if ref is not None else 0.0
        rewards = kl_rewards(
            score,
            old,
            ref if ref is not None else old,
            mask,
            beta=beta,
            estimator=self.kl_estimator,
        )
        advantages, returns = gae(
            rewards, batch["old_values"], mask, gamma=self.gamma, lam=self.lam
        )
        batch["returns"] = returns.to(torch.float32)
        m = mask.to(torch.float64)
        non_score = (rewards.double() * m).sum(-1) - score.double() * (m.sum(-1) > 0)
        adv_all = all_gather_rows(advantages.float()).cpu()
        ret_all = all_gather_rows(returns.float()).cpu()
        m_all = all_gather_rows(mask.to(torch.int64)).cpu().to(torch.float64)
        stats = {
            "advantages/mean": _masked_mean(adv_all, m_all),
            "advantages/std": _masked_std(adv_all, m_all),
            "returns/mean": _masked_mean(ret_all, m_all),
            "non_score_reward": float(all_gather_rows(non_score).double().mean()),
        }
        if self.whiten_advantages and m_all.sum() > 1:
            adv_all = (whiten(adv_all.double(), m_all) * m_all).to(torch.float32)
        rows = mask.shape[0]
        return adv_all[rank * rows : (rank + 1) * rows].to(mask.device), stats

    # ---------------------------------------------------------------- the loss

    def loss(self, ctx: TaskContext) -> LossFn:
        model, temp = ctx.model, self.temperature
        pv = find_policy_with_value(model)
        names = self.stat_names()

        def loss_fn(
            params: TensorDictBase,
            batch: Mapping[str, torch.Tensor],
            *,
            frozen: Mapping[str, Any] | None = None,
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            kw = frozen_kw(frozen)
            if pv.shared:  # one trunk forward: logits and values (at logits_index only)
                h = model.hidden_states(params, batch, **kw)
                logits = model.logits_from_hidden(params, h, **kw)
                values = pv.values_from_hidden(params, h)
            else:
                logits = model.apply(params, batch, **kw)
                values = pv.critic_values(params, batch)
            logps, entropies = _logps(logits, batch, temp, entropy=True)
            mask = batch["loss_mask"]
            pg = policy_loss(
                logps,
                batch["old_logps"],
                batch["advantages"],
                mask,
                loss_type="dapo",
                epsilon=self.epsilon,
                epsilon_high=self.epsilon_high,
                delta=self.delta,
                entropies=entropies,
            )
            vf = value_loss(
                values.float(),
                batch["old_values"],
                batch["returns"],
                mask,
                cliprange_value=self.cliprange_value,
            )
            tokens = pg.normaliser  # the loss mask's tokens: value_loss's count too
            weight = tokens.to(logps.dtype)
            aux: dict[str, Any] = {M.NORMALISER: tokens, **pg.metrics, **vf.metrics}
            aux["policy/loss"] = M.mean(pg.loss_sum.detach(), weight)
            aux["value/loss"] = M.mean(vf.loss_sum.detach().to(weight.dtype), weight)
            ref = batch.get("ref_logps", None)
            if ref is not None:
                m = mask.to(logps.dtype)
                kl = kl_penalty(logps.detach(), ref, self.kl_estimator)
                aux["kl"] = M.mean((kl * m).sum(), m.sum())
            aux |= rollout_metrics(logps, batch, names)
            return pg.loss_sum + self.vf_coef * vf.loss_sum.to(pg.loss_sum.dtype), aux

        return loss_fn
