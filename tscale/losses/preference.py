"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Every function here takes *summed* log-probabilities of each completion (under the policy and,
where the method has one, the reference model) and, for the length-normalised variants, the
number of completion tokens. None of them touches a model, reads the host or does I/O.

Each returns *per-example* losses: the objective TRL optimises is their mean over the batch, so a
task sums them and divides by the global number of examples (pairs for the paired losses,
completions for KTO), as :mod:`tscale.losses.lm` does with tokens. Where TRL reports rewards
(``rewards/chosen``, ``rewards/rejected``), they come back detached beside the losses;
:func:`preference_metrics` turns them into metrics that reduce exactly over microbatches and ranks.

Notation: ``π`` the policy, ``π_ref`` the reference, ``y_w``/``y_l`` the chosen/rejected
completions, ``|y|`` a completion's token count, ``σ`` the logistic function and
``ρ_w = log π(y_w) − log π_ref(y_w)``, ``ρ_l`` likewise, ``Δ = ρ_w − ρ_l``.

Terms that TRL computes as a token mean over the whole batch (DPO's ``sft`` term, CPO's and ORPO's
NLL) are spread over the examples as ``−log π(y_w)_i / mean_j |y_w|_j``, whose batch mean is TRL's
``−Σ_i log π(y_w)_i / Σ_i |y_w|_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tscale.core.metrics import Metric, mean
from tscale.errors import ConfigError

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "KTO_LOSS_TYPES",
    "PairLoss",
    "UnpairedLoss",
    "bradley_terry_loss",
    "cpo_loss",
    "dpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "orpo_loss",
    "preference_metrics",
    "simpo_loss",
]


class PairLoss(NamedTuple):
    """Per-pair losses ``[B]`` and the detached rewards TRL logs for the chosen/rejected sides."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class UnpairedLoss(NamedTuple):
    """Per-completion losses ``[N]`` and detached rewards ``[N]`` (KTO)."""

    losses: torch.Tensor
    rewards: torch.Tensor


# --------------------------------------------------------------------------------------------
# DPO and its loss types
# --------------------------------------------------------------------------------------------


class _Pair(NamedTuple):
    """What a DPO loss type may read: log-ratios, their f-divergence scores, raw log-probs,
    token counts, options."""

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor | None
    rejected_tokens: torch.Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float


def _delta(p: _Pair) -> torch.Tensor:
    return p.chosen_scores - p.rejected_scores


def _per_token(value: torch.Tensor, tokens: torch.Tensor | None, loss_type: str) -> torch.Tensor:
    if tokens is None:
        raise ConfigError(
            f"dpo_loss: loss_type {loss_type!r} is length-normalised; pass chosen_tokens and "
            "rejected_tokens (the completion token counts)"
        )
    return value / tokens.clamp(min=1).to(value.dtype)


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Conservative logistic loss ``−(1−ε) log σ(z) − ε log σ(−z)`` (cDPO, Mitchell 2023)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _sigmoid(p: _Pair) -> torch.Tensor:
    return -F.logsigmoid(p.beta * _delta(p))


def _sigmoid_norm(p: _Pair) -> torch.Tensor:
    gap = _per_token(p.chosen_scores, p.chosen_tokens, "sigmoid_norm") - _per_token(
        p.rejected_scores, p.rejected_tokens, "sigmoid_norm"
    )
    return -F.logsigmoid(p.beta * gap)


def _hinge(p: _Pair) -> torch.Tensor:
    return torch.relu(1 - p.beta * _delta(p))


def _ipo(p: _Pair) -> torch.Tensor:
    gap = _per_token(p.chosen_scores, p.chosen_tokens, "ipo") - _per_token(
        p.rejected_scores, p.rejected_tokens, "ipo"
    )
    return (gap - 1 / (2 * p.beta)) ** 2


def _robust(p: _Pair) -> torch.Tensor:
    z, eps = p.beta * _delta(p), p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(p: _Pair) -> torch.Tensor:
    z, eps = p.beta * _delta(p), p.label_smoothing
    kl_w = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    kl_l = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return kl_w + kl_l


def _nca_pair(p: _Pair) -> torch.Tensor:
    r_w, r_l = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def _bco_pair(p: _Pair) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: _Pair) -> torch.Tensor:
    half = 0.5 / p.beta
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


def _apo_zero(p: _Pair) -> torch.Tensor:
    return (1 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(
        p.beta * p.rejected_logratios
    )


def _apo_down(p: _Pair) -> torch.Tensor:
    gap = p.chosen_logratios - p.rejected_logratios
    return torch.sigmoid(p.beta * p.chosen_logratios) + (1 - torch.sigmoid(p.beta * gap))


def _aot(p: _Pair) -> torch.Tensor:
    policy = torch.sort(p.chosen_logps - p.rejected_logps, dim=0).values
    reference = torch.sort(p.reference_chosen_logps - p.reference_rejected_logps, dim=0).values
    return _smoothed_logistic(p.beta * (policy - reference), p.label_smoothing)


def _aot_unpaired(p: _Pair) -> torch.Tensor:
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _discopop(p: _Pair) -> torch.Tensor:
    z = p.beta * _delta(p)
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(p: _Pair) -> torch.Tensor:
    if p.chosen_tokens is None:
        raise ConfigError("dpo_loss: loss_type 'sft' needs chosen_tokens (its NLL is a token mean)")
    return _batch_token_mean_nll(p.chosen_logps, p.chosen_tokens)


def _batch_token_mean_nll(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``−logps_i / mean_j tokens_j``: per-example terms whose mean is the batch token-mean NLL."""
    return -logps / tokens.to(logps.dtype).mean()


_DPO_TERMS: dict[str, Callable[[_Pair], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "exo_pair": _exo_pair,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
}
DPO_LOSS_TYPES: tuple[str, ...] = tuple(_DPO_TERMS)

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The types that read the f-divergence scores; the others read the plain log-ratios, so TRL
# allows another divergence with these only.
_F_DIVERGENCE_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def _f_scores(logratios: torch.Tensor, f_divergence: str, alpha: float) -> torch.Tensor:
    """``f'(u)`` at ``u = π/π_ref = exp(ρ)``, f-DPO's replacement of the log-ratio."""
    if f_divergence == "reverse_kl" or (
        f_divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6
    ):
        return logratios  # f'(u) = log u (+ const); the α → 1 limit of the α-divergence
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)  # f'(u) = 1 − 1/u
    if f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)  # f'(u) = log(2u/(1+u))
    # α-divergence, f'(u) = (u^(α−1) − 1)/(α − 1); the exponent clamped at 80 as TRL does
    t = ((alpha - 1.0) * logratios).clamp(max=80.0)
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


def _check_beta(where: str, beta: float) -> None:
    if not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"{where}: beta must be a finite number > 0, got {beta}")


def _dpo_types(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    label_smoothing: float,
    f_divergence: str,
) -> list[tuple[str, float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ConfigError(f"dpo_loss: loss_type is empty; give at least one of {DPO_LOSS_TYPES}")
    unknown = [t for t in types if t not in _DPO_TERMS]
    if unknown:
        raise ConfigError(f"dpo_loss: unknown loss_type {unknown}; known: {DPO_LOSS_TYPES}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ConfigError(
            f"dpo_loss: {len(weights)} loss_weights for {len(types)} loss types {types}"
        )
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"dpo_loss: 'robust' needs label_smoothing in [0, 0.5), got {label_smoothing}"
        )
    if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
        raise ConfigError(
            f"dpo_loss: 'exo_pair' needs label_smoothing in (0, 1) (the paper uses 1e-3), got "
            f"{label_smoothing}"
        )
    if f_divergence not in F_DIVERGENCES:
        raise ConfigError(
            f"dpo_loss: unknown f_divergence {f_divergence!r}; known: {F_DIVERGENCES}"
        )
    if f_divergence != "reverse_kl" and not set(types) <= _F_DIVERGENCE_TYPES:
        raise ConfigError(
            f"dpo_loss: f_divergence {f_divergence!r} works with {sorted(_F_DIVERGENCE_TYPES)} "
            f"only, got {types}"
        )
    return list(zip(types, weights, strict=True))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PairLoss:
    """Direct Preference Optimization and its variants, per pair.

    DPO: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", NeurIPS 2023, arXiv:2305.18290. With ``z = β Δ`` the loss types are:

    - ``sigmoid`` (DPO, eq. 7): ``−log σ(z)``.
    - ``sigmoid_norm``: ``−log σ(β (ρ_w/|y_w| − ρ_l/|y_l|))``, the length-normalised form.
    - ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): ``max(0, 1 − z)``.
    - ``ipo`` (Azar et al. 2023, arXiv:2310.12036, eq. 17): ``(ρ_w/|y_w| − ρ_l/|y_l| − 1/(2β))²``,
      length-averaged as TRL does (agreed with the IPO authors).
    - ``robust`` (rDPO, Chowdhury et al. 2024, arXiv:2403.00409), ``ε`` = ``label_smoothing``,
      the flip probability: ``(−(1−ε) log σ(z) + ε log σ(−z)) / (1 − 2ε)``.
    - ``exo_pair`` (EXO, Ji et al. 2024, arXiv:2402.00856, eq. 16):
      ``σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)``.
    - ``nca_pair`` (NCA, Chen et al. 2024, arXiv:2402.05369):
      ``−log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)``.
    - ``bco_pair`` (BCO, Jung et al. 2024, arXiv:2404.04656; TRL's paired form without the
      running reward shift): ``−log σ(βρ_w) − log σ(−βρ_l)``.
    - ``sppo_hard`` (SPPO, Wu et al. 2024, arXiv:2405.00675, hard labels):
      ``(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²``.
    - ``apo_zero`` / ``apo_down`` (APO, D'Oosterlinck et al. 2024, arXiv:2408.06266, eqs. 7–8):
      ``1 − σ(βρ_w) + σ(βρ_l)`` and ``σ(βρ_w) + 1 − σ(z)``.
    - ``discopop`` (DiscoPOP, Chris Lu et al. 2024, arXiv:2406.08414, eq. 5), ``τ`` =
      ``discopop_tau``, ``m = σ(z/τ)``: ``−log σ(z)(1 − m) + e^{−z} m``.
    - ``sft``: the chosen completions' token-mean NLL over the batch (see the module docstring).
    - ``aot`` / ``aot_unpaired`` (AOT, Melnyk et al. 2024, arXiv:2406.05882): the smoothed
      logistic loss ``−(1−ε) log σ(βd) − ε log σ(−βd)`` on the batch-*sorted* quantities:
      ``d = sort(log π(y_w) − log π(y_l)) − sort(log π_ref(y_w) − log π_ref(y_l))`` and
      ``d = sort(ρ_w) − sort(ρ_l)``. These couple the batch: losses are in sorted order, only
      their mean is meaningful, and a split into microbatches changes them.

    ``f_divergence`` (f-DPO, Wang et al. 2023, arXiv:2309.16240) replaces ``ρ`` by ``f'(e^ρ)``
    in the types that read Δ (``sigmoid``, ``sigmoid_norm``, ``hinge``, ``ipo``, ``exo_pair``,
    ``robust``, ``discopop``): ``reverse_kl`` ``ρ``, ``forward_kl`` ``1 − e^{−ρ}``,
    ``js_divergence`` ``log 2 + log σ(ρ)``, ``alpha_divergence``
    ``(e^{(α−1)ρ} − 1)/(α − 1)`` with ``α`` = ``f_alpha`` (exponent clamped at 80).

    A list of types (TRL's list form, e.g. MPO: ``["sigmoid", "bco_pair", "sft"]`` with weights
    ``[0.8, 0.2, 1.0]``, Wang et al. 2024, arXiv:2411.10442) gives ``Σ_k w_k · loss_k`` per pair.
    ``label_smoothing`` is read by ``robust``, ``exo_pair`` and ``aot*`` only, as in TRL.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs under π.
        reference_chosen_logps, reference_rejected_logps: ``[B]`` the same under π_ref.
        beta: the KL coefficient β (IPO's τ).
        loss_type: one type or a list of types from :data:`DPO_LOSS_TYPES`.
        loss_weights: one weight per type (default all 1).
        label_smoothing: ε of ``robust`` and ``exo_pair``.
        chosen_tokens, rejected_tokens: ``[B]`` completion token counts; needed by ``ipo``,
            ``sigmoid_norm`` (both) and ``sft`` (chosen).
        discopop_tau: τ of ``discopop``.
        f_divergence: one of :data:`F_DIVERGENCES`. f_alpha: α of ``alpha_divergence``.

    Returns:
        :class:`PairLoss` with ``losses [B]`` (TRL's loss is their mean) and the rewards
        ``β ρ_w``, ``β ρ_l`` (detached).

    Raises:
        ConfigError: unknown or empty ``loss_type``, mismatched ``loss_weights``, a
            non-positive ``beta``, ``label_smoothing`` out of range for ``robust``/``exo_pair``,
            or a length-normalised type without token counts.
    """
    _check_beta("dpo_loss", beta)
    terms = _dpo_types(loss_type, loss_weights, label_smoothing, f_divergence)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    pair = _Pair(
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=_f_scores(chosen_logratios, f_divergence, f_alpha),
        rejected_scores=_f_scores(rejected_logratios, f_divergence, f_alpha),
        chosen_logps=policy_chosen_logps,
        rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
    )
    losses = sum(weight * _DPO_TERMS[name](pair) for name, weight in terms)
    assert isinstance(losses, torch.Tensor)  # at least one term (checked above)
    return PairLoss(
        losses,
        (beta * chosen_logratios).detach(),
        (beta * rejected_logratios).detach(),
    )


# --------------------------------------------------------------------------------------------
# Reference-free pair losses: CPO, SimPO, ORPO
# --------------------------------------------------------------------------------------------


CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo")


def _cpo_logits(
    chosen: torch.Tensor, rejected: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-side scores: log-probs, or AlphaPO's ``(1 − p^{−α})/α`` when ``α ≠ 0``."""
    if alpha == 0.0:
        return chosen, rejected
    return (1 - torch.exp(-alpha * chosen)) / alpha, (1 - torch.exp(-alpha * rejected)) / alpha


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> PairLoss:
    """Contrastive Preference Optimization, per pair, with its NLL term.

    Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance
    in Machine Translation", ICML 2024, arXiv:2401.08417 (eq. 3 plus the NLL regulariser):
    ``L = L_pref(s_w − s_l) + cpo_alpha · NLL(y_w)`` with ``s = log π(y)`` (no reference), where
    ``L_pref`` is ``−(1−ε) log σ(βu) − ε log σ(−βu)`` (``sigmoid``), ``max(0, 1 − βu)``
    (``hinge``) or ``(u − 1/(2β))²`` (``ipo``, on length-averaged log-probs). ``simpo`` is
    :func:`simpo_loss`'s term (length-averaged, ``u = s_w − s_l − γ/β``). ``alpha ≠ 0`` uses
    AlphaPO's reward ``s = (1 − π(y)^{−α})/α`` (Gupta et al. 2025, arXiv:2501.03884).
    ``NLL(y_w)`` is the chosen completions' token-mean NLL over the batch (module docstring).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` *summed* completion log-probs.
        chosen_tokens, rejected_tokens: ``[B]`` completion token counts; needed for ``ipo``,
            ``simpo`` (the averaged log-probs) and for the NLL term (``chosen_tokens``).
        beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha: as TRL's ``CPOConfig``.

    Returns:
        :class:`PairLoss`; rewards are ``β s_w``, ``β s_l`` (detached), as TRL logs them.

    Raises:
        ConfigError: unknown ``loss_type``, non-positive ``beta`` or missing token counts.
    """
    _check_beta("cpo_loss", beta)
    if loss_type not in CPO_LOSS_TYPES:
        raise ConfigError(f"cpo_loss: unknown loss_type {loss_type!r}; known: {CPO_LOSS_TYPES}")
    needs_avg = loss_type in ("ipo", "simpo")
    if (needs_avg and (chosen_tokens is None or rejected_tokens is None)) or (
        cpo_alpha != 0.0 and chosen_tokens is None
    ):
        raise ConfigError(
            f"cpo_loss: loss_type {loss_type!r} with cpo_alpha={cpo_alpha} needs chosen_tokens "
            "(and rejected_tokens for 'ipo'/'simpo')"
        )
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if needs_avg:
        assert chosen_tokens is not None and rejected_tokens is not None
        chosen, rejected = (
            chosen / chosen_tokens.to(chosen.dtype),
            rejected / rejected_tokens.to(rejected.dtype),
        )
    score_w, score_l = _cpo_logits(chosen, rejected, alpha)
    u = score_w - score_l
    if loss_type == "simpo":
        losses = _smoothed_logistic(beta * (u - simpo_gamma / beta), label_smoothing)
    elif loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * u, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    else:
        losses = (u - 1 / (2 * beta)) ** 2
    if cpo_alpha != 0.0:
        assert chosen_tokens is not None
        losses = losses + cpo_alpha * _batch_token_mean_nll(policy_chosen_logps, chosen_tokens)
    return PairLoss(losses, (beta * score_w).detach(), (beta * score_l).detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """Simple Preference Optimization, per pair (reference-free, length-normalised).

    Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    NeurIPS 2024, arXiv:2405.14734, eq. 6:
    ``−log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ)``, with label smoothing ε as
    ``−(1−ε) log σ(x) − ε log σ(−x)``. TRL runs it as ``CPOTrainer(loss_type="simpo",
    cpo_alpha=0)`` with ``simpo_gamma = γ``; this equals :func:`cpo_loss` with those settings.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs.
        chosen_tokens, rejected_tokens: ``[B]`` completion token counts.
        beta: the reward scale β. gamma: the target margin γ. label_smoothing: ε.

    Returns:
        :class:`PairLoss`; rewards are ``β log π(y)/|y|`` (detached).
    """
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        cpo_alpha=0.0,
        simpo_gamma=gamma,
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − eˣ)`` for ``x ≤ 0``, switching form at ``−ln 2`` to keep precision
    (Mächler, "Accurately Computing log(1 − exp(−|a|))", 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float = 0.1,
    nll_logps: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | None = None,
) -> PairLoss:
    """Odds Ratio Preference Optimization, per pair, with its NLL term.

    Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
    EMNLP 2024, arXiv:2403.07691, eqs. 4–7: with mean log-probs ``m = log π(y)/|y|`` and
    ``log odds(y) = m − log(1 − e^m)``, ``L = NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))``
    (``λ`` = ``beta``, TRL's name). ``NLL`` is the batch token-mean NLL of ``nll_logps`` over
    ``nll_tokens`` (TRL takes it over the chosen prompt *and* completion, so pass those sums);
    without them the chosen completion's own log-probs and counts are used.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs.
        chosen_tokens, rejected_tokens: ``[B]`` completion token counts.
        beta: λ, the weight of the odds-ratio term.
        nll_logps, nll_tokens: ``[B]`` summed log-probs and token counts of the NLL's tokens.

    Returns:
        :class:`PairLoss`; rewards are ``λ m_w``, ``λ m_l`` (detached), as TRL logs them.
    """
    _check_beta("orpo_loss", beta)
    mean_w = policy_chosen_logps / chosen_tokens.to(policy_chosen_logps.dtype)
    mean_l = policy_rejected_logps / rejected_tokens.to(policy_rejected_logps.dtype)
    log_odds = (mean_w - mean_l) - (_log1mexp(mean_w) - _log1mexp(mean_l))
    if nll_logps is None:
        nll_logps, nll_tokens = policy_chosen_logps, chosen_tokens
    elif nll_tokens is None:
        raise ConfigError("orpo_loss: nll_logps needs nll_tokens (the NLL is a token mean)")
    assert nll_tokens is not None
    losses = _batch_token_mean_nll(nll_logps, nll_tokens) - beta * F.logsigmoid(log_odds)
    return PairLoss(losses, (beta * mean_w).detach(), (beta * mean_l).detach())


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point ``z₀ = max(0, mean_i (log π(y'_i|x_i) − log π_ref(y'_i|x_i)))``.

    The ``y'_i`` are *mismatched* completions (another example's completion after this prompt),
    as in Ethayarajh et al. 2024 (arXiv:2402.01306, §4.1). Detached: no gradient flows through
    the reference point. For a global estimate over microbatches and ranks, pass the gathered
    log-probs (or sum the differences and counts over the whole batch first).

    Returns:
        a 0-d tensor.
    """
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> UnpairedLoss:
    """Kahneman–Tversky Optimization, per completion.

    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024,
    arXiv:2402.01306, eq. 7. With ``ρ = log π(y|x) − log π_ref(y|x)`` and the reference point
    ``z₀`` (:func:`kto_kl_estimate`): desirable ``λ_D (1 − σ(β(ρ − z₀)))``, undesirable
    ``λ_U (1 − σ(β(z₀ − ρ)))``. ``apo_zero_unpaired`` (APO, arXiv:2408.06266) drops ``z₀``:
    ``λ_D (1 − σ(βρ))`` and ``λ_U σ(βρ)``.

    Args:
        policy_logps, reference_logps: ``[N]`` summed completion log-probs.
        desirable: ``[N]`` bool, the KTO label.
        kl: the reference point ``z₀`` (0-d tensor or float); ignored by ``apo_zero_unpaired``.
        beta, desirable_weight, undesirable_weight: β, ``λ_D``, ``λ_U``.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.

    Returns:
        :class:`UnpairedLoss` in input order; TRL's loss is the mean of ``losses``. Rewards are
        ``βρ`` (detached).
    """
    _check_beta("kto_loss", beta)
    if loss_type not in KTO_LOSS_TYPES:
        raise ConfigError(f"kto_loss: unknown loss_type {loss_type!r}; known: {KTO_LOSS_TYPES}")
    logratios = policy_logps - reference_logps
    desirable = desirable.to(torch.bool)
    if loss_type == "kto":
        z0 = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
        good = 1 - torch.sigmoid(beta * (logratios - z0))
        bad = 1 - torch.sigmoid(beta * (z0 - logratios))
    else:
        good = 1 - torch.sigmoid(beta * logratios)
        bad = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return UnpairedLoss(losses, (beta * logratios).detach())


# --------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Pairwise Bradley–Terry loss of a reward model, per pair.

    Bradley and Terry, "Rank Analysis of Incomplete Block Designs", Biometrika 1952, as used for
    reward models by Ouyang et al. 2022 (arXiv:2203.02155, eq. 1):
    ``−log σ(r_w − r_l − m)``, the margin ``m`` as in Llama 2 (Touvron et al. 2023,
    arXiv:2307.09288, eq. 2), plus ``c (r_w + r_l)²`` to centre the rewards (Eisenstein et al.
    2023, arXiv:2312.09244) when ``center_rewards_coefficient = c`` is given.

    Returns:
        ``[B]`` per-pair losses (TRL's loss is their mean).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> dict[str, Metric]:
    """TRL's pair metrics as means over pairs that reduce exactly over microbatches and ranks.

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (``r_w > r_l``),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; no host sync. ``valid`` ([B]
    bool) keeps only the slots that hold a pair (a packed group batch has empty ones).
    """
    if valid is None:
        valid = torch.ones_like(chosen_rewards, dtype=torch.bool)
    n = valid.sum()
    zero = torch.zeros((), dtype=chosen_rewards.dtype, device=chosen_rewards.device)
    values = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return {name: mean(torch.where(valid, value, zero).sum(), n) for name, value in values.items()}
