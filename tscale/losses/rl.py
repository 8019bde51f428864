"""Online-RL losses as pure functions of per-token log-probabilities: GRPO (and its Dr. GRPO,
DAPO and GSPO variants), RLOO and PPO.

Shapes: ``N`` completions (``G`` consecutive rows per prompt, a *group*), ``T`` completion
positions. Per-token tensors are ``[N, T]`` and aligned with a 0/1 completion ``mask`` ``[N, T]``
(padding, and truncated completions when they are masked, are 0). Nothing here touches a
model, reads the host or does I/O; Python-level options are validated eagerly.

**Sums and normalisers.** A loss returns ``(loss_sum, normaliser, metrics)``. ``normaliser`` is
this batch's share of an *additive* count (tokens, sequences, sequences × L_max): summed over
microbatches and ranks it is the global count, and the step divides the summed loss and
gradients by it (``aux["tokens"]`` in :mod:`tscale.step.compose`). Every loss type is therefore a
(sum, count) pair whose quotient over the global batch is the objective, and neither gradient
accumulation nor world size changes the gradient as long as a group is never split (the
advantages come from the whole group). :func:`policy_normaliser` gives the same count on its own,
for a step that needs the global count before the loss runs.

Metrics are :class:`~tscale.core.metrics.Metric` records that declare their reduction (weighted
mean, max, min), named as TRL logs them.

Notation: ``π_θ`` the policy, ``π_old`` the policy that sampled (or the one before this
optimisation epoch), ``π_ref`` the reference, ``r_{i,t} = π_θ(o_{i,t}) / π_old(o_{i,t})``, ``A_i``
the advantage, ``|o_i|`` the completion length, ``ε_low``/``ε_high`` the clip range.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from tscale.core.metrics import Metric, maximum, mean, minimum
from tscale.errors import ConfigError, ShapeError

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "POLICY_LOSS_TYPES",
    "SCALE_REWARDS",
    "PolicyLoss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kl_rewards",
    "policy_loss",
    "policy_normaliser",
    "rloo_advantages",
    "rloo_policy_loss",
    "value_loss",
    "whiten",
    "zero_std_groups",
]

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]

SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
POLICY_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


class PolicyLoss(NamedTuple):
    """A summed loss, the additive count it is divided by, and metrics with their reductions."""

    loss_sum: torch.Tensor
    normaliser: torch.Tensor
    metrics: dict[str, Metric]


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _groups(rewards: torch.Tensor, group_size: int, where: str) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ShapeError(f"{where}: rewards must be [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ShapeError(
            f"{where}: {rewards.numel()} rewards do not split into groups of {group_size}; "
            "a group (the G completions of one prompt) must stay whole"
        )
    return rewards.view(-1, group_size)


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation over the non-NaN entries (NaN below two of them)."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    centred = x - torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True).to(x.dtype)
    var = torch.nansum(centred**2, dim=dims, keepdim=True) / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, math.nan))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dims)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    *,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO's group-relative advantages ``A_i = (R_i − mean_group R) / (std + eps)``.

    GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) divides by the group's standard
    deviation (``scale_rewards="group"``); Liu et al. 2025 ("Understanding R1-Zero-Like Training",
    Dr. GRPO, arXiv:2503.20783) drop the division (``"none"``), and ``"batch"`` divides by the
    standard deviation of the whole batch (Lite PPO, arXiv:2508.08221). The standard deviation is
    Bessel-corrected, as in TRL.

    A NaN reward marks an unscorable completion: it is left out of the group's mean and standard
    deviation and its advantage is 0; a group with a single scorable completion gives 0 under
    ``"group"`` (TRL does the same).

    Args:
        rewards: ``[N]`` rewards of the *whole* batch (gathered over ranks), ``G`` consecutive
            rows per prompt.
        group_size: ``G``.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to the standard deviation.

    Returns:
        ``[N]`` advantages, detached.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(
            f"group_advantages: unknown scale_rewards {scale_rewards!r}; one of {SCALE_REWARDS}"
        )
    rewards = rewards.detach()
    grouped = _groups(rewards, group_size, "group_advantages")
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = _nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        centred = centred / (_nanstd(rewards) + eps)
    return torch.nan_to_num(centred, nan=0.0)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N / G]`` booleans: groups whose rewards have no spread (zero advantage everywhere).

    Their fraction is TRL's ``frac_reward_zero_std``; DAPO's dynamic sampling (Yu et al. 2025,
    arXiv:2503.14476) drops these groups. Unscorable (NaN) rewards are ignored; a group with fewer
    than two scorable completions counts as having no spread (its advantages are all 0; TRL's
    ``isclose`` on its NaN standard deviation counts it as having spread).
    """
    std = _nanstd(_groups(rewards.detach(), group_size, "zero_std_groups"), dim=1)
    return torch.nan_to_num(std, nan=0.0) == 0


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    normalize: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages ``A_i = R_i − (Σ_{j≠i} R_j) / (G − 1)``.

    Kool et al. 2019 ("Buy 4 REINFORCE Samples, Get a Baseline for Free!") and Ahmadian et al.
    2024 ("Back to Basics", arXiv:2402.14740). The baseline averages the scorable siblings only
    (NaN rewards are unscorable and get advantage 0); ``normalize`` then whitens the advantages
    over the batch (``(A − mean) / (std + eps)``, TRL's ``normalize_advantages``). RLOO's KL
    penalty enters the rewards before this call: ``rewards − β · Σ_t kl_penalty(old, ref, "k1")``.

    Returns:
        ``[N]`` advantages, detached.
    """
    rewards = rewards.detach()
    grouped = _groups(rewards, group_size, "rloo_advantages")
    if group_size == 1:
        return torch.zeros_like(rewards)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(rewards.dtype)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the masked entries (unbiased variance).

    PPO's advantage whitening (Schulman et al. 2017, arXiv:1707.06347; the ``masked_whiten`` of
    Ziegler et al. 2019's ``lm-human-preferences``). ``shift_mean=False`` keeps the mean (only
    rescales), as done for rewards. The statistics read masked entries only; entries off the mask
    are transformed too, so mask them downstream.
    """
    m = mask.to(values.dtype)
    count = m.sum()
    mu = (values * m).sum() / count
    var = (((values - mu) * m) ** 2).sum() / (count - 1)
    out = (values - mu) * torch.rsqrt(var + eps)
    return out + mu if not shift_mean else out


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens.

    Schulman et al. 2016 (arXiv:1506.02438): ``δ_t = r_t + γ V_{t+1} − V_t``,
    ``A_t = δ_t + γλ A_{t+1}``, returns ``R_t = A_t + V_t``; the value after the last
    completion token is 0 (the episode ends). Positions off the mask are skipped: ``V_{t+1}`` and
    ``A_{t+1}`` there count as 0, so a right-padded completion ends at its last token.

    Args:
        rewards: ``[N, T]`` per-token rewards (see :func:`kl_rewards`).
        values: ``[N, T]`` value estimates of the sampling-time critic.
        mask: ``[N, T]`` completion mask.

    Returns:
        ``(advantages, returns)``, both ``[N, T]``, detached and zero off the mask.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ShapeError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must share one [N, T] shape"
        )
    m = mask.to(values.dtype)
    rewards, values = rewards.detach() * m, values.detach() * m
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    columns = []
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        columns.append(adv)
        next_value, next_adv = values[:, t], adv
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, (advantages + values) * m


# --------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------


def kl_penalty(
    logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of ``KL(π_θ ‖ π_ref)`` from the sampled tokens' log-probs.

    Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), with
    ``x = log π_ref − log π_θ``: ``k1 = −x`` (unbiased, may be negative; PPO's and RLOO's KL
    reward), ``k2 = x² / 2``, ``k3 = eˣ − x − 1`` (unbiased, ≥ 0; GRPO's KL term).
    """
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl_penalty: unknown estimator {estimator!r}; one of {KL_ESTIMATORS}")
    x = ref_logps - logps
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    return torch.exp(x) - x - 1


def kl_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """PPO's per-token rewards: ``−β · KL_t`` at every completion token, plus the sequence score
    at the last one.

    Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593) and Ouyang et al. 2022 (InstructGPT), with the ``k1`` estimator by default
    (``k3`` on request). ``logps`` are the sampling policy's log-probs (``π_old``), so the rewards
    are constants of the rollout.

    Returns:
        ``[N, T]`` rewards, detached and zero off the mask.
    """
    m = mask.to(logps.dtype)
    kl = kl_penalty(logps.detach(), ref_logps.detach(), estimator)
    # The last completion token: where the running count reaches the row's count.
    counts = mask.to(torch.int64)
    last = (counts.cumsum(1) == counts.sum(1, keepdim=True)) & (counts > 0)
    return (-beta * kl + last.to(logps.dtype) * scores.detach()[:, None]) * m


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------


def policy_normaliser(
    mask: torch.Tensor, loss_type: LossType, max_completion_length: int | None = None
) -> torch.Tensor:
    """This batch's share of the count a GRPO-family loss divides by (int64, additive).

    ``grpo``: the number of completions ``N``. ``bnpo`` and ``dapo``: the completion tokens
    ``Σ mask``. ``dr_grpo``: ``N · max_completion_length``. Summed over microbatches and ranks it is
    the global count (see :func:`policy_loss`).
    """
    _check_loss_type(loss_type, max_completion_length)
    rows = torch.tensor(mask.shape[0], dtype=torch.int64, device=mask.device)
    if loss_type == "grpo":
        return rows
    if loss_type == "dr_grpo":
        assert max_completion_length is not None
        return rows * max_completion_length
    return (mask != 0).sum()


def _check_loss_type(loss_type: str, max_completion_length: int | None) -> None:
    if loss_type not in POLICY_LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; one of {POLICY_LOSS_TYPES}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ConfigError(
            "loss_type 'dr_grpo' divides by N · max_completion_length; pass "
            f"max_completion_length >= 1 (got {max_completion_length})"
        )


def _clip_range(epsilon: float, epsilon_high: float | None) -> tuple[float, float]:
    high = epsilon if epsilon_high is None else epsilon_high
    if not (epsilon >= 0 and high >= 0):
        raise ConfigError(f"epsilon and epsilon_high must be >= 0, got {epsilon}, {epsilon_high}")
    return epsilon, high


def _seq_extrema(
    flags: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over non-empty completions of each completion's mean of ``flags``."""
    per_seq = (flags * m).sum(-1) / lengths.clamp(min=1)
    has = lengths > 0
    inf = torch.full_like(per_seq, math.inf)
    return torch.where(has, per_seq, inf).min(), torch.where(has, per_seq, -inf).max()


def _clip_metrics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: float,
    high: float,
    m: torch.Tensor,
    weight: torch.Tensor,
    sequence_level: bool,
) -> dict[str, Metric]:
    """TRL's clip fractions: a token (or a completion) is clipped when the clip binds the
    objective, ``r < 1 − ε_low`` with ``A < 0`` or ``r > 1 + ε_high`` with ``A > 0``."""
    ratio, advantages = ratio.detach(), advantages.detach()
    is_low = ((ratio < 1 - low) & (advantages < 0)).to(m.dtype)
    is_high = ((ratio > 1 + high) & (advantages > 0)).to(m.dtype)
    region = torch.maximum(is_low, is_high)
    if sequence_level:  # one weight per completion: ``ratio`` is [N, 1]
        w = torch.ones_like(m[:, :1])
        seq_low, seq_high = is_low.squeeze(-1), is_high.squeeze(-1)
        low_min, high_max = seq_low.min(), seq_high.max()
    else:
        w = m
        lengths = m.sum(-1)
        low_min, _ = _seq_extrema(is_low, m, lengths)
        _, high_max = _seq_extrema(is_high, m, lengths)
    return {
        "clip_ratio/low_mean": mean((is_low * w).sum(), weight),
        "clip_ratio/high_mean": mean((is_high * w).sum(), weight),
        "clip_ratio/region_mean": mean((region * w).sum(), weight),
        "clip_ratio/low_min": minimum(low_min),
        "clip_ratio/high_max": maximum(high_max),
        "ratio/mean": mean((ratio * w).sum(), weight),
        "ratio/min": minimum(torch.where(w > 0, ratio, math.inf).min()),
        "ratio/max": maximum(torch.where(w > 0, ratio, -math.inf).max()),
    }


def _check_token_shapes(where: str, mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if mask.dim() != 2:
        raise ShapeError(f"{where}: mask must be [N, T], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ShapeError(
                f"{where}: {name} has shape {tuple(t.shape)}, the mask {tuple(mask.shape)}"
            )


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: ImportanceLevel = "token",
    max_completion_length: int | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    entropies: torch.Tensor | None = None,
) -> PolicyLoss:
    """The clipped surrogate of PPO/GRPO with an optional k3 KL term, as a (sum, count) pair.

    Per token, with ``s_{i,t}`` the importance weight::

        ℓ_{i,t} = −min(s_{i,t} A_i, clip(s_{i,t}, 1 − ε_low, 1 + ε_high) A_i) + β k3_{i,t}

    - PPO's clipped objective: Schulman et al. 2017 (arXiv:1707.06347); GRPO with the k3 KL to
      the reference added to the loss (not the reward): Shao et al. 2024 (arXiv:2402.03300).
    - ``epsilon_high`` (clip-higher, decoupled ε): DAPO, Yu et al. 2025 (arXiv:2503.14476).
    - ``delta``: two-sided clipping, ``s ← min(s, δ)`` in the unclipped branch (INTELLECT-2, Prime
      Intellect 2025, arXiv:2505.07291), as TRL's ``delta``.
    - ``importance_sampling_level``: ``"token"`` gives ``s_{i,t} = r_{i,t}``; ``"sequence"`` gives
      GSPO's ``s_i = exp(mean_t log r_{i,t})``, one weight per completion (Zheng et al. 2025,
      arXiv:2507.18071).
    - ``k3_{i,t} = exp(x) − x − 1`` with ``x = log π_ref − log π_θ`` (Schulman 2020, see
      :func:`kl_penalty`). With ``beta == 0`` no reference is needed (``ref_logps=None``).

    **Loss types as (sum, count).** The step divides ``Σ loss_sum`` by ``Σ normaliser`` over all
    microbatches and ranks; each type's quotient over the global batch is its paper's objective:

    - ``grpo``: sum ``Σ_i (Σ_t ℓ_{i,t} m_{i,t}) / max(|o_i|, 1)``, count ``N`` (completions);
    - ``dapo`` and ``bnpo``: sum ``Σ_{i,t} ℓ_{i,t} m_{i,t}``, count ``Σ_{i,t} m_{i,t}`` (tokens);
    - ``dr_grpo``: sum ``Σ_{i,t} ℓ_{i,t} m_{i,t}``, count ``N · max_completion_length``.

    ``grpo`` is GRPO's per-sequence token mean, averaged over completions (Shao et al. 2024);
    ``dapo`` is DAPO's token-level mean over the whole batch (Yu et al. 2025); ``dr_grpo`` divides
    by a constant (Liu et al. 2025, arXiv:2503.20783), so it needs ``max_completion_length``.

    ``bnpo`` is, in TRL, a token mean over the *local* batch of each microbatch and rank, whose
    gradient therefore changes with the accumulation and world size. tscale divides by the global
    token count instead, and then ``bnpo`` **is** ``dapo``: both names give the same (sum,
    count). With one microbatch on one rank both equal TRL's. TRL's ``dapo`` divides by the
    generation batch's token count spread evenly over its optimizer steps; tscale divides by each
    optimizer step's own token count (equal when a step consumes the whole generation batch).

    Args:
        logps: ``[N, T]`` log-probs of the sampled tokens under ``π_θ`` (differentiated).
        old_logps: ``[N, T]`` the same under ``π_old`` (constants; with one optimisation step per
            generation pass ``logps.detach()``).
        advantages: ``[N]`` per completion (GRPO, RLOO) or ``[N, T]`` per token (PPO with GAE).
        mask: ``[N, T]`` completion mask (0/1).
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"`` (see above).
        epsilon: ``ε_low``. epsilon_high: ``ε_high`` (default ``ε_low``).
        delta: upper bound of the unclipped ratio (two-sided clipping), off by default.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        max_completion_length: ``L_max`` for ``dr_grpo``.
        ref_logps: ``[N, T]`` reference log-probs; needed when ``beta != 0``. When given with
            ``beta == 0`` the KL is still reported (not trained).
        beta: weight of the KL term.
        entropies: ``[N, T]`` per-token entropies, reported as ``entropy`` (not trained).

    Returns:
        :class:`PolicyLoss` ``(loss_sum, normaliser, metrics)``; metrics (TRL's names) are
        ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}``,
        ``ratio/{mean,min,max}`` (per token, or per completion at sequence level), ``kl``
        (token mean, when ``ref_logps`` is given) and ``entropy`` (when given).

    Raises:
        ConfigError: an unknown option, ``dr_grpo`` without ``max_completion_length``, or
            ``beta != 0`` without ``ref_logps``.
        ShapeError: tensors that disagree with the ``[N, T]`` mask.
    """
    _check_loss_type(loss_type, max_completion_length)
    low, high = _clip_range(epsilon, epsilon_high)
    if delta is not None and not delta > 1 + high:
        raise ConfigError(
            f"policy_loss: delta={delta} must exceed 1 + epsilon_high = {1 + high} (it bounds the "
            "ratio above the clip range; INTELLECT-2 uses 4)"
        )
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ConfigError(
            f"policy_loss: unknown importance_sampling_level {importance_sampling_level!r}; "
            f"one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if beta != 0.0 and ref_logps is None:
        raise ConfigError(
            f"policy_loss: beta={beta} weighs a KL to the reference; pass ref_logps "
            "(or set beta to 0, which needs no reference pass)"
        )
    _check_token_shapes(
        "policy_loss",
        mask,
        logps=logps,
        old_logps=old_logps,
        ref_logps=ref_logps,
        entropies=entropies,
    )
    if advantages.shape not in (mask.shape[:1], mask.shape):
        raise ShapeError(
            f"policy_loss: advantages have shape {tuple(advantages.shape)}; expected "
            f"[{mask.shape[0]}] or {list(mask.shape)}"
        )
    if importance_sampling_level == "sequence" and advantages.dim() != 1:
        raise ShapeError(
            "policy_loss: importance_sampling_level 'sequence' weighs whole completions; "
            f"advantages must be [N], got shape {tuple(advantages.shape)}"
        )
    m = mask.to(logps.dtype)
    adv = advantages.detach().to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    lengths = m.sum(-1)

    log_ratio = logps - old_logps.detach()
    if importance_sampling_level == "token":
        log_weight = log_ratio
        weight = m.sum()
    else:
        log_weight = ((log_ratio * m).sum(-1) / lengths.clamp(min=1)).unsqueeze(-1)
        weight = torch.tensor(float(mask.shape[0]), dtype=m.dtype, device=m.device)
    ratio = torch.exp(log_weight)
    clipped = torch.clamp(ratio, 1 - low, 1 + high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)

    metrics: dict[str, Metric] = _clip_metrics(
        ratio, adv, low, high, m, weight, importance_sampling_level == "sequence"
    )
    if ref_logps is not None:
        kl = kl_penalty(logps, ref_logps.detach(), "k3")
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = mean((kl.detach() * m).sum(), m.sum())
    if entropies is not None:
        metrics["entropy"] = mean((entropies.detach() * m).sum(), m.sum())

    per_token = per_token * m  # broadcasts a sequence-level [N, 1] loss over its tokens
    if loss_type == "grpo":
        loss_sum = (per_token.sum(-1) / lengths.clamp(min=1)).sum()
    else:
        loss_sum = per_token.sum()
    return PolicyLoss(loss_sum, policy_normaliser(mask, loss_type, max_completion_length), metrics)


def rloo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> PolicyLoss:
    """RLOO's clipped objective on whole sequences, as (Σ over completions, ``N``).

    ``ρ_i = exp(Σ_t m_{i,t} (log π_θ − log π_old)_{i,t})`` (the completion's probability ratio),
    ``ℓ_i = −min(ρ_i A_i, clip(ρ_i, 1 − ε_low, 1 + ε_high) A_i)``; the objective is the mean
    over completions (Ahmadian et al. 2024, arXiv:2402.14740, with PPO's clip as TRL's
    ``RLOOTrainer``). The KL to the reference is in the rewards (see :func:`rloo_advantages`).

    Args:
        logps, old_logps: ``[N, T]`` per-token log-probs under ``π_θ`` and ``π_old``.
        advantages: ``[N]``.
        mask: ``[N, T]`` completion mask.

    Returns:
        :class:`PolicyLoss` with the per-completion clip fractions and ratio stats.
    """
    low, high = _clip_range(epsilon, epsilon_high)
    _check_token_shapes("rloo_policy_loss", mask, logps=logps, old_logps=old_logps)
    if advantages.shape != mask.shape[:1]:
        raise ShapeError(
            f"rloo_policy_loss: advantages have shape {tuple(advantages.shape)}, "
            f"expected [{mask.shape[0]}]"
        )
    m = mask.to(logps.dtype)
    adv = advantages.detach().to(logps.dtype)
    log_ratio = ((logps - old_logps.detach()) * m).sum(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - low, 1 + high)
    losses = -torch.min(ratio * adv, clipped * adv)
    rows = torch.tensor(mask.shape[0], dtype=torch.int64, device=mask.device)
    ones = torch.ones_like(m[:, :1])
    metrics = _clip_metrics(ratio[:, None], adv[:, None], low, high, ones, rows.to(m.dtype), True)
    return PolicyLoss(losses.sum(), rows, metrics)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped value loss, as (Σ over tokens, token count).

    ``V_clip = V_old + clip(V − V_old, −c, c)``,
    ``ℓ_t = ½ max((V − R)², (V_clip − R)²)`` (Schulman et al. 2017, arXiv:1707.06347, value
    clipping as in OpenAI's baselines and Ziegler et al. 2019). The token mean over the global
    batch is the objective; its weight against the policy loss (``vf_coef``) is the caller's.

    Returns:
        :class:`PolicyLoss` with ``value/clipfrac`` (tokens where the clipped branch is the
        larger), ``value/mean`` and ``value/error`` (mean squared error to the returns).
    """
    if cliprange_value < 0:
        raise ConfigError(f"value_loss: cliprange_value must be >= 0, got {cliprange_value}")
    _check_token_shapes("value_loss", mask, values=values, old_values=old_values, returns=returns)
    m = mask.to(values.dtype)
    old, target = old_values.detach(), returns.detach()
    clipped = old + torch.clamp(values - old, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - target) ** 2, (clipped - target) ** 2
    per_token = 0.5 * torch.max(unclipped_err, clipped_err) * m
    tokens = (mask != 0).sum()
    metrics = {
        "value/clipfrac": mean(((clipped_err > unclipped_err).to(m.dtype) * m).sum(), m.sum()),
        "value/mean": mean((values.detach() * m).sum(), m.sum()),
        "value/error": mean((unclipped_err.detach() * m).sum(), m.sum()),
    }
    return PolicyLoss(per_token.sum(), tokens, metrics)
