"""Preference losses equal TRL's (1.16.0) on the same log-probabilities, live and against goldens.

TRL computes these losses inside trainer methods that expect a model. Each ``_trl_*`` helper
calls the real TRL method on a bare trainer instance (``object.__new__``, no ``__init__``) that
carries only the attributes the method reads, with a stand-in model that returns prepared
per-token log-probs (DPO, KTO: TRL's fused-head ``log_probs``), logits (CPO, ORPO: the NLL
term and the log-probs are computed by TRL from them) or scores (reward model). Nothing of TRL
is re-implemented here.

Each case is a raw input (the tensors the stand-in model returns) plus a config. The live tests
compare TRL and tscale on random raws in float64 (ORPO: TRL casts to float32, so float32
tolerance). The golden file ``golden/preference_trl.json`` holds small raws and TRL's outputs; a
TRL release that moves a definition fails ``test_trl_still_matches_golden``. Regenerate it with
``TSCALE_REGEN_GOLDEN=1 pytest tests/losses/test_preference_losses.py -k regen``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tscale.core.metrics import finalise
from tscale.errors import ConfigError
from tscale.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)

GOLDEN = Path(__file__).parent / "golden" / "preference_trl.json"
TRL_VERSION = "1.16.0"
F64 = {"rtol": 1e-12, "atol": 1e-12}
F32 = {"rtol": 2e-6, "atol": 2e-6}

Raw = dict[str, torch.Tensor]
Out = dict[str, float]

# --------------------------------------------------------------------------------------------
# Raw inputs
# --------------------------------------------------------------------------------------------


def _completion_mask(gen: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """[rows, width] 0/1: column 0 is prompt, then 1..width-1 completion tokens, then padding."""
    lengths = torch.randint(1, width, (rows,), generator=gen)
    pos = torch.arange(width)
    return ((pos >= 1) & (pos <= lengths[:, None])).long()


def _token_logps(gen: torch.Generator, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [rows, width-1] aligned with ``mask[:, 1:]``, zero off the mask."""
    rows, width = mask.shape
    values = -(3 * torch.rand(rows, width - 1, generator=gen, dtype=torch.float64) + 0.01)
    return values * mask[:, 1:]


def dpo_raw(seed: int, pairs: int = 4, width: int = 8) -> Raw:
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(gen, 2 * pairs, width)
    token_logps = _token_logps(gen, mask)
    noise = 3 * torch.randn(2 * pairs, generator=gen, dtype=torch.float64)
    return {
        "completion_mask": mask,
        "token_logps": token_logps,
        "ref_logps": token_logps.sum(1) + noise,
    }


def kto_raw(seed: int, n: int = 6, width: int = 8, kl_shift: float = 0.0) -> Raw:
    gen = torch.Generator().manual_seed(seed)
    label = torch.zeros(n, dtype=torch.bool)
    label[torch.randperm(n, generator=gen)[: n // 2 + 1]] = True
    mask = _completion_mask(gen, n, width)
    kl_mask = _completion_mask(
        gen, n, width - 2
    )  # another width: the stand-in model tells them apart
    token_logps, kl_token_logps = _token_logps(gen, mask), _token_logps(gen, kl_mask)
    noise = 3 * torch.randn(2, n, generator=gen, dtype=torch.float64)
    return {
        "label": label,
        "completion_mask": mask,
        "token_logps": token_logps,
        "ref_logps": token_logps.sum(1) + noise[0],
        "kl_completion_mask": kl_mask,
        "kl_token_logps": kl_token_logps,
        "ref_kl_logps": kl_token_logps.sum(1) + noise[1] + kl_shift,
    }


def logits_raw(seed: int, pairs: int = 4, width: int = 8, vocab: int = 7) -> Raw:
    """Chosen rows then rejected rows: prompt (label -100), completion, padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    prompt = torch.randint(1, 3, (rows,), generator=gen)
    completion = torch.stack(
        [torch.randint(1, width - int(p) + 1, (1,), generator=gen)[0] for p in prompt]
    )
    pos = torch.arange(width)
    attention = (pos < (prompt + completion)[:, None]).long()
    input_ids = torch.randint(0, vocab, (rows, width), generator=gen)
    labels = torch.where(attention.bool() & (pos >= prompt[:, None]), input_ids, -100)
    logits = 2 * torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "logits": logits}


def reward_raw(seed: int, pairs: int = 5) -> Raw:
    gen = torch.Generator().manual_seed(seed)
    return {
        "scores": 2 * torch.randn(2 * pairs, 1, generator=gen, dtype=torch.float64),
        "margin": torch.rand(pairs, generator=gen, dtype=torch.float64),
    }


# --------------------------------------------------------------------------------------------
# TRL, called on bare trainer instances
# --------------------------------------------------------------------------------------------


def _accelerator() -> SimpleNamespace:
    ident = lambda t: t  # noqa: E731 - one process: gathers are the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=ident, gather_for_metrics=ident)


def _bare(cls: type, **attrs: Any) -> Any:
    obj = object.__new__(cls)
    base = {
        "accelerator": _accelerator(),
        "model": SimpleNamespace(training=True),
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for name, value in {**base, **attrs}.items():
        setattr(obj, name, value)
    return obj


def _fused_outputs(log_probs: torch.Tensor) -> SimpleNamespace:
    """What TRL's fused LM head returns; only ``log_probs`` feeds the loss."""
    return SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )


def trl_dpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.trainer.dpo_trainer import DPOTrainer

    loss_type = cfg["loss_type"]
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = _bare(
        DPOTrainer,
        beta=cfg.get("beta", 0.1),
        loss_types=types,
        loss_weights=cfg.get("loss_weights") or [1.0] * len(types),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        ld_alpha=None,
        f_divergence_type=cfg.get("f_divergence", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha", 0.5),
        use_weighting=False,
        precompute_ref_logps=True,
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05)),
    )
    mask = raw["completion_mask"]
    ref_chosen, ref_rejected = raw["ref_logps"].chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    outputs = _fused_outputs(raw["token_logps"])
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    metrics = trainer._metrics["train"]
    return {
        "loss": float(loss),
        "rewards/chosen": metrics["rewards/chosen"][-1],
        "rewards/rejected": metrics["rewards/rejected"][-1],
        "rewards/accuracies": metrics["rewards/accuracies"][-1],
        "rewards/margins": metrics["rewards/margins"][-1],
        "logps/chosen": metrics["logps/chosen"][-1],
    }


def trl_kto(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.trainer.kto_trainer import KTOTrainer

    loss_type = cfg.get("loss_type", "kto")
    trainer = _bare(
        KTOTrainer,
        beta=cfg.get("beta", 0.1),
        loss_type=loss_type,
        desirable_weight=cfg.get("desirable_weight", 1.0),
        undesirable_weight=cfg.get("undesirable_weight", 1.0),
        calculate_KL=loss_type != "apo_zero_unpaired",
        precompute_ref_logps=True,
    )
    mask, kl_mask = raw["completion_mask"], raw["kl_completion_mask"]
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "label": raw["label"],
        "ref_logps": raw["ref_logps"],
        "KL_input_ids": torch.zeros_like(kl_mask),
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "ref_KL_logps": raw["ref_kl_logps"],
    }

    def model(input_ids: torch.Tensor, **kw: Any) -> SimpleNamespace:
        same = input_ids.shape[1] == mask.shape[1]
        return _fused_outputs(raw["token_logps"] if same else raw["kl_token_logps"])

    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    metrics = trainer._metrics["train"]
    return {
        "loss": float(loss),
        "kl": metrics["kl"][-1],
        "rewards/chosen": metrics["rewards/chosen"][-1],
        "rewards/rejected": metrics["rewards/rejected"][-1],
    }


def _pair_batch(raw: Raw) -> dict[str, torch.Tensor]:
    batch = {}
    for side, rows in zip(("chosen", "rejected"), ("chosen", "rejected"), strict=True):
        half = 0 if rows == "chosen" else 1
        for key in ("input_ids", "attention_mask", "labels"):
            batch[f"{side}_{key}"] = raw[key].chunk(2)[half]
    return batch


def trl_cpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = _bare(
        CPOTrainer,
        beta=cfg.get("beta", 0.1),
        loss_type=cfg.get("loss_type", "sigmoid"),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        cpo_alpha=cfg.get("cpo_alpha", 1.0),
        simpo_gamma=cfg.get("simpo_gamma", 0.5),
        alpha=cfg.get("alpha", 0.0),
        is_encoder_decoder=False,
        pad_token_id=0,
    )
    outputs = SimpleNamespace(logits=raw["logits"])
    loss, metrics = CPOTrainer.get_batch_loss_metrics(
        trainer, lambda *a, **kw: outputs, _pair_batch(raw)
    )
    return {
        "loss": float(loss),
        "rewards/chosen": float(metrics["rewards/chosen"]),
        "rewards/rejected": float(metrics["rewards/rejected"]),
    }


def trl_orpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = _bare(
        ORPOTrainer, beta=cfg.get("beta", 0.1), is_encoder_decoder=False, padding_value=0
    )
    outputs = SimpleNamespace(logits=raw["logits"])
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(
        trainer, lambda *a, **kw: outputs, _pair_batch(raw)
    )
    return {
        "loss": float(loss),
        "rewards/chosen": float(metrics["rewards/chosen"]),
        "rewards/rejected": float(metrics["rewards/rejected"]),
    }


def trl_reward(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.trainer.reward_trainer import RewardTrainer

    coef = cfg.get("center_rewards_coefficient")
    trainer = _bare(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=coef))
    rows = raw["scores"].shape[0]
    inputs: dict[str, Any] = {"attention_mask": torch.ones(rows, 3, dtype=torch.long)}
    if cfg.get("margin"):
        inputs["margin"] = raw["margin"]
    outputs = SimpleNamespace(logits=raw["scores"])
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: outputs, inputs)
    return {"loss": float(loss)}


# --------------------------------------------------------------------------------------------
# tscale on the same raws
# --------------------------------------------------------------------------------------------


def _sides(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = values.chunk(2)
    return chosen, rejected


def ours_dpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    logps_w, logps_l = _sides(raw["token_logps"].sum(1))
    ref_w, ref_l = _sides(raw["ref_logps"])
    tokens_w, tokens_l = _sides(raw["completion_mask"].sum(1))
    out = dpo_loss(
        logps_w, logps_l, ref_w, ref_l, chosen_tokens=tokens_w, rejected_tokens=tokens_l, **cfg
    )
    metrics = finalise(
        preference_metrics(out.chosen_rewards, out.rejected_rewards, logps_w, logps_l)
    )
    return {
        "loss": float(out.losses.mean()),
        **{
            k: float(metrics[k])
            for k in (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
            )
        },
    }


def ours_kto(raw: Raw, cfg: dict[str, Any]) -> Out:
    kl = kto_kl_estimate(raw["kl_token_logps"].sum(1), raw["ref_kl_logps"])
    if cfg.get("loss_type") == "apo_zero_unpaired":
        kl = torch.zeros((), dtype=torch.float64)  # TRL logs 0 when it does not estimate the KL
    out = kto_loss(raw["token_logps"].sum(1), raw["ref_logps"], raw["label"], kl, **cfg)
    label = raw["label"]
    return {
        "loss": float(out.losses.mean()),
        "kl": float(kl),
        "rewards/chosen": float(out.rewards[label].mean()),
        "rewards/rejected": float(out.rewards[~label].mean()),
    }


def _logit_sums(raw: Raw) -> dict[str, torch.Tensor]:
    """Summed completion log-probs, completion counts and the ORPO NLL's sums (all attended)."""
    token_logps = (
        F.log_softmax(raw["logits"][:, :-1], dim=-1)
        .gather(-1, raw["input_ids"][:, 1:, None])
        .squeeze(-1)
    )
    completion = raw["labels"][:, 1:] != -100
    attended = raw["attention_mask"][:, 1:].bool()
    return {
        "logps": (token_logps * completion).sum(1),
        "tokens": completion.sum(1),
        "nll_logps": (token_logps * attended).sum(1),
        "nll_tokens": attended.sum(1),
    }


def ours_cpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    sums = _logit_sums(raw)
    logps_w, logps_l = _sides(sums["logps"])
    tokens_w, tokens_l = _sides(sums["tokens"])
    if cfg.get("simpo"):
        kw = {k: v for k, v in cfg.items() if k != "simpo"}
        out = simpo_loss(logps_w, logps_l, tokens_w, tokens_l, **kw)
    else:
        out = cpo_loss(logps_w, logps_l, chosen_tokens=tokens_w, rejected_tokens=tokens_l, **cfg)
    return {
        "loss": float(out.losses.mean()),
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
    }


def ours_orpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    sums = _logit_sums(raw)
    logps_w, logps_l = _sides(sums["logps"])
    tokens_w, tokens_l = _sides(sums["tokens"])
    nll_logps, _ = _sides(sums["nll_logps"])
    nll_tokens, _ = _sides(sums["nll_tokens"])
    out = orpo_loss(
        logps_w, logps_l, tokens_w, tokens_l, nll_logps=nll_logps, nll_tokens=nll_tokens, **cfg
    )
    return {
        "loss": float(out.losses.mean()),
        "rewards/chosen": float(out.chosen_rewards.mean()),
        "rewards/rejected": float(out.rejected_rewards.mean()),
    }


def ours_reward(raw: Raw, cfg: dict[str, Any]) -> Out:
    chosen, rejected = _sides(raw["scores"].squeeze(-1))
    losses = bradley_terry_loss(
        chosen,
        rejected,
        margin=raw["margin"] if cfg.get("margin") else None,
        center_rewards_coefficient=cfg.get("center_rewards_coefficient"),
    )
    return {"loss": float(losses.mean())}


# --------------------------------------------------------------------------------------------
# Cases: (family, config). A family names its raw builder, TRL call and tscale call.
# --------------------------------------------------------------------------------------------

FAMILIES: dict[str, tuple[Callable[..., Raw], Callable[..., Out], Callable[..., Out], dict]] = {
    "dpo": (dpo_raw, trl_dpo, ours_dpo, F64),
    "kto": (kto_raw, trl_kto, ours_kto, F64),
    "cpo": (logits_raw, trl_cpo, ours_cpo, F64),
    "orpo": (logits_raw, trl_orpo, ours_orpo, F32),  # TRL's odds_ratio_loss casts to float32
    "reward": (reward_raw, trl_reward, ours_reward, F64),
}

_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1}
CASES: list[tuple[str, dict[str, Any]]] = [
    *[
        ("dpo", {"loss_type": t, "beta": 0.1, "label_smoothing": _SMOOTHING.get(t, 0.0)})
        for t in DPO_LOSS_TYPES
    ],
    ("dpo", {"loss_type": "sigmoid", "beta": 0.5}),
    ("dpo", {"loss_type": "ipo", "beta": 0.5}),
    ("dpo", {"loss_type": "robust", "beta": 0.3, "label_smoothing": 0.0}),
    ("dpo", {"loss_type": "discopop", "beta": 0.2, "discopop_tau": 0.5}),
    (
        "dpo",
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1},
    ),
    ("dpo", {"loss_type": ["ipo", "sigmoid_norm", "robust"], "label_smoothing": 0.2}),
    ("dpo", {"loss_type": "aot_unpaired", "label_smoothing": 0.2}),
    *[
        ("dpo", {"loss_type": ["sigmoid", "hinge", "ipo"], "f_divergence": f})
        for f in ("forward_kl", "js_divergence")
    ],
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.1, "f_divergence": "js_divergence"}),
    ("dpo", {"loss_type": "sigmoid", "f_divergence": "alpha_divergence", "f_alpha": 1.0}),
    ("kto", {"beta": 0.1}),
    ("kto", {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.7}),
    ("kto", {"beta": 0.1, "loss_type": "apo_zero_unpaired", "desirable_weight": 2.0}),
    *[("cpo", {"loss_type": t, "beta": 0.1}) for t in ("sigmoid", "hinge", "ipo", "simpo")],
    ("cpo", {"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1, "cpo_alpha": 0.5}),
    ("cpo", {"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.25}),
    ("cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}),
    ("orpo", {"beta": 0.1}),
    ("orpo", {"beta": 1.0}),
    ("reward", {}),
    ("reward", {"margin": True}),
    ("reward", {"margin": True, "center_rewards_coefficient": 0.01}),
]

# SimPO through its own entry point, against TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0).
SIMPO_CASES: list[dict[str, Any]] = [
    {"beta": 2.0, "gamma": 0.5},
    {"beta": 2.5, "gamma": 1.4, "label_smoothing": 0.1},
]


def _tolerance(family: str, cfg: dict[str, Any]) -> dict[str, float]:
    """float64 agreement, except where TRL itself rounds through float32: ORPO's
    ``odds_ratio_loss`` casts to float32, and DPO's ``exo_pair`` builds ε as a float32 tensor."""
    loss_type = cfg.get("loss_type", ())
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if family == "dpo" and "exo_pair" in types:
        return F32
    return FAMILIES[family][3]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    family, cfg = case
    return family + "-" + "-".join(f"{k}={v}" for k, v in cfg.items())


def _assert_outputs_close(ours: Out, ref: Out, tol: dict[str, float], what: str) -> None:
    assert ours.keys() == ref.keys(), what
    for key in ref:
        # TRL takes the accuracy of float32 booleans (``.float()``)
        key_tol = F32 if key == "rewards/accuracies" else tol
        close = math.isclose(ours[key], ref[key], rel_tol=key_tol["rtol"], abs_tol=key_tol["atol"])
        assert close, f"{what}: {key} = {ours[key]!r}, reference {ref[key]!r}"


# --------------------------------------------------------------------------------------------
# Live comparison with TRL
# --------------------------------------------------------------------------------------------


def _require_trl() -> None:
    trl = pytest.importorskip("trl")
    if trl.__version__ != TRL_VERSION:
        pytest.skip(f"TRL {trl.__version__} installed; the harness is written for {TRL_VERSION}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl_live(case: tuple[str, dict[str, Any]], seed: int) -> None:
    _require_trl()
    family, cfg = case
    make_raw, trl_fn, ours_fn, _ = FAMILIES[family]
    raw = make_raw(seed)
    tol = _tolerance(family, cfg)
    _assert_outputs_close(ours_fn(raw, cfg), trl_fn(raw, cfg), tol, _case_id(case))


@pytest.mark.parametrize("kl_shift", [-5.0, 0.0, 5.0])
def test_kto_kl_clamp_matches_trl(kl_shift: float) -> None:
    _require_trl()
    raw = kto_raw(7, kl_shift=kl_shift)
    _assert_outputs_close(ours_kto(raw, {}), trl_kto(raw, {}), F64, f"kl_shift={kl_shift}")


@pytest.mark.parametrize("cfg", SIMPO_CASES)
def test_simpo_matches_trl_cpo_simpo(cfg: dict[str, Any]) -> None:
    _require_trl()
    trl_cfg = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg["gamma"]}
    trl_cfg |= {k: v for k, v in cfg.items() if k != "gamma"}
    raw = logits_raw(3)
    ours = ours_cpo(raw, {"simpo": True, **cfg})
    _assert_outputs_close(ours, trl_cpo(raw, trl_cfg), F64, str(cfg))


@pytest.mark.parametrize("f_alpha", [0.3, 0.5, 2.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["hinge", "sigmoid_norm"]])
def test_alpha_divergence_matches_trl_in_float32(f_alpha: float, loss_type: Any) -> None:
    """TRL's α-divergence path casts to float32 (and has no float64 clamp bound): run both there."""
    _require_trl()
    raw = {k: v.float() if v.is_floating_point() else v for k, v in dpo_raw(6).items()}
    raw["ref_logps"] = raw["ref_logps"] - 100  # ratios ≈ e^100: α = 2 hits the clamp at 80
    cfg = {"loss_type": loss_type, "f_divergence": "alpha_divergence", "f_alpha": f_alpha}
    ours, ref = ours_dpo(raw, cfg), trl_dpo(raw, cfg)
    _assert_outputs_close(ours, ref, {"rtol": 1e-5, "atol": 1e-5}, str(cfg))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSS_TYPES) - {"sft", "aot", "aot_unpaired"}))
def test_dpo_per_pair_matches_trl(loss_type: str, seed: int) -> None:
    """Per pair, not only the batch mean: TRL on each one-pair batch against tscale's entry."""
    _require_trl()
    raw = dpo_raw(seed, pairs=3)
    cfg = {"loss_type": loss_type, "label_smoothing": _SMOOTHING.get(loss_type, 0.0)}
    logps_w, logps_l = _sides(raw["token_logps"].sum(1))
    ref_w, ref_l = _sides(raw["ref_logps"])
    tokens_w, tokens_l = _sides(raw["completion_mask"].sum(1))
    losses = dpo_loss(
        logps_w, logps_l, ref_w, ref_l, chosen_tokens=tokens_w, rejected_tokens=tokens_l, **cfg
    ).losses
    for i in range(3):
        rows = [i, i + 3]
        one = {k: v[rows] for k, v in raw.items()}
        expected = trl_dpo(one, cfg)["loss"]
        assert math.isclose(
            float(losses[i]),
            expected,
            rel_tol=2e-6 if loss_type == "exo_pair" else 1e-12,
            abs_tol=1e-12,
        )


def test_cpo_per_pair_terms_match_trl() -> None:
    """Per pair, not only the batch mean: TRL's ``cpo_loss`` returns per-pair losses."""
    _require_trl()
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    gen = torch.Generator().manual_seed(5)
    chosen = -10 * torch.rand(6, generator=gen, dtype=torch.float64)
    rejected = -10 * torch.rand(6, generator=gen, dtype=torch.float64)
    for loss_type in ("sigmoid", "hinge"):
        trainer = _bare(
            CPOTrainer,
            beta=0.2,
            loss_type=loss_type,
            label_smoothing=0.05,
            simpo_gamma=0.5,
            alpha=0.0,
        )
        ref_losses, ref_w, ref_l = CPOTrainer.cpo_loss(trainer, chosen, rejected)
        ours = cpo_loss(
            chosen, rejected, beta=0.2, loss_type=loss_type, label_smoothing=0.05, cpo_alpha=0.0
        )
        torch.testing.assert_close(ours.losses, ref_losses, **F64)
        torch.testing.assert_close(ours.chosen_rewards, ref_w, **F64)
        torch.testing.assert_close(ours.rejected_rewards, ref_l, **F64)


# --------------------------------------------------------------------------------------------
# Golden values (TRL's outputs on stored raws)
# --------------------------------------------------------------------------------------------


def _encode(raw: Raw) -> dict[str, Any]:
    return {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "data": v.tolist()}
        for k, v in raw.items()
    }


def _decode(raw: dict[str, Any]) -> Raw:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])) for k, v in raw.items()}


def _golden_entries() -> list[dict[str, Any]]:
    entries = []
    for case in CASES:
        family, cfg = case
        make_raw = FAMILIES[family][0]
        small = {
            "dpo": {"pairs": 3, "width": 6},
            "kto": {"n": 4, "width": 6},
            "cpo": {"pairs": 2, "width": 6, "vocab": 5},
            "orpo": {"pairs": 2, "width": 6, "vocab": 5},
            "reward": {"pairs": 3},
        }[family]
        entries.append({"family": family, "config": cfg, "raw": make_raw(11, **small)})
    return entries


@pytest.mark.skipif(
    os.environ.get("TSCALE_REGEN_GOLDEN") != "1", reason="set TSCALE_REGEN_GOLDEN=1"
)
def test_regen_golden() -> None:
    _require_trl()
    records = []
    for entry in _golden_entries():
        trl_fn = FAMILIES[entry["family"]][1]
        expected = trl_fn(entry["raw"], entry["config"])
        records.append({**entry, "raw": _encode(entry["raw"]), "trl": expected})
    GOLDEN.parent.mkdir(exist_ok=True)
    payload = {"trl_version": TRL_VERSION, "cases": records}
    GOLDEN.write_text(json.dumps(payload, indent=1) + "\n")


def _golden_cases() -> list[dict[str, Any]]:
    return json.loads(GOLDEN.read_text())["cases"]


def _golden_id(record: dict[str, Any]) -> str:
    return _case_id((record["family"], record["config"]))


@pytest.mark.parametrize("record", _golden_cases() if GOLDEN.exists() else [], ids=_golden_id)
def test_tscale_matches_golden(record: dict[str, Any]) -> None:
    family = record["family"]
    ours_fn, tol = FAMILIES[family][2], _tolerance(family, record["config"])
    ours = ours_fn(_decode(record["raw"]), record["config"])
    _assert_outputs_close(ours, record["trl"], tol, _golden_id(record))


@pytest.mark.parametrize("record", _golden_cases() if GOLDEN.exists() else [], ids=_golden_id)
def test_trl_still_matches_golden(record: dict[str, Any]) -> None:
    """Fails when a TRL release moves a definition (or moves a loss, e.g. into experimental)."""
    pytest.importorskip("trl")
    trl_fn = FAMILIES[record["family"]][1]
    now = trl_fn(_decode(record["raw"]), record["config"])
    _assert_outputs_close(now, record["trl"], F64, _golden_id(record))


def test_golden_file_covers_every_case() -> None:
    assert GOLDEN.exists(), "regenerate: TSCALE_REGEN_GOLDEN=1 pytest -k regen"
    stored = {_golden_id(r) for r in _golden_cases()}
    assert stored == {_case_id(c) for c in CASES}


# --------------------------------------------------------------------------------------------
# Properties and validation (no TRL needed)
# --------------------------------------------------------------------------------------------

_finite = st.floats(-50.0, 0.0, allow_nan=False)
_logps = st.lists(_finite, min_size=1, max_size=6)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@given(_logps, st.floats(0.01, 5.0))
def test_dpo_sigmoid_at_reference_is_ln2(logps: list[float], beta: float) -> None:
    x = _t(logps)
    out = dpo_loss(x, x.flip(0), x, x.flip(0), beta=beta)
    torch.testing.assert_close(out.losses, torch.full_like(x, math.log(2.0)), **F64)


@given(st.data(), st.floats(0.01, 5.0))
def test_dpo_swap_mirrors(data: st.DataObject, beta: float) -> None:
    n = data.draw(st.integers(1, 6))
    pw, pl, rw, rl = (_t(data.draw(st.lists(_finite, min_size=n, max_size=n))) for _ in range(4))
    ours = dpo_loss(pw, pl, rw, rl, beta=beta).losses
    swapped = dpo_loss(pl, pw, rl, rw, beta=beta).losses
    # −log σ(z) − (−log σ(−z)) = −z
    torch.testing.assert_close(ours - swapped, -beta * ((pw - rw) - (pl - rl)), **F64)


@given(st.data(), st.floats(0.01, 5.0))
def test_robust_with_zero_smoothing_is_sigmoid(data: st.DataObject, beta: float) -> None:
    n = data.draw(st.integers(1, 6))
    pw, pl, rw, rl = (_t(data.draw(st.lists(_finite, min_size=n, max_size=n))) for _ in range(4))
    robust = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(robust.losses, dpo_loss(pw, pl, rw, rl, beta=beta).losses, **F64)


@given(st.floats(0.05, 5.0), st.integers(1, 40), st.integers(1, 40))
def test_ipo_minimum_at_half_over_beta(beta: float, len_w: int, len_l: int) -> None:
    """IPO's minimum is at a length-averaged log-ratio gap of 1/(2β): margins β·gap = 0.5."""
    gap = 1 / (2 * beta)
    ref = torch.zeros(1, dtype=torch.float64)
    pw, pl = _t([gap * len_w / 2]), _t([-gap * len_l / 2])
    tokens_w, tokens_l = torch.tensor([len_w]), torch.tensor([len_l])
    kw = {"beta": beta, "loss_type": "ipo", "chosen_tokens": tokens_w, "rejected_tokens": tokens_l}
    at_min = dpo_loss(pw, pl, ref, ref, **kw).losses
    torch.testing.assert_close(at_min, torch.zeros(1, dtype=torch.float64), **F64)
    assert dpo_loss(pw + 0.1, pl, ref, ref, **kw).losses > 0


def test_kto_kl_estimate_from_global_sums_does_not_depend_on_the_split() -> None:
    """A global z₀ is the mean over the whole batch: per-split (sum, count) summed, then divided;
    ``kto_kl_estimate`` on the gathered log-probs gives the same value."""
    raw = kto_raw(3, n=8, kl_shift=2.0)
    policy, ref = raw["kl_token_logps"].sum(1), raw["ref_kl_logps"]
    whole = kto_kl_estimate(policy, ref)
    for cut in (1, 3, 5):
        parts = [(policy[:cut], ref[:cut]), (policy[cut:], ref[cut:])]
        total = sum((p - r).sum() for p, r in parts)
        count = sum(p.numel() for p, _ in parts)
        torch.testing.assert_close(whole, (total / count).clamp(min=0), **F64)
    assert not whole.requires_grad


def test_pair_losses_split_like_the_batch() -> None:
    """Pair-separable losses: summing per-pair losses over microbatches equals the whole batch."""
    raw = dpo_raw(4, pairs=6)
    logps_w, logps_l = _sides(raw["token_logps"].sum(1))
    ref_w, ref_l = _sides(raw["ref_logps"])
    whole = dpo_loss(logps_w, logps_l, ref_w, ref_l, loss_type=["sigmoid", "bco_pair"]).losses
    halves = [
        dpo_loss(logps_w[s], logps_l[s], ref_w[s], ref_l[s], loss_type=["sigmoid", "bco_pair"])
        for s in (slice(0, 2), slice(2, 6))
    ]
    torch.testing.assert_close(whole.sum(), sum(h.losses.sum() for h in halves), **F64)


def test_preference_metrics_reduce_like_trl() -> None:
    raw = dpo_raw(8)
    out = ours_dpo(raw, {"loss_type": "sigmoid"})
    assert 0.0 <= out["rewards/accuracies"] <= 1.0
    assert math.isclose(
        out["rewards/margins"], out["rewards/chosen"] - out["rewards/rejected"], abs_tol=1e-12
    )


def test_rewards_are_detached() -> None:
    x = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    out = dpo_loss(x, x * 2, x.detach(), x.detach())
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "nope"}, "unknown loss_type"),
        ({"loss_type": []}, "empty"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust"),
        ({"loss_type": "exo_pair"}, "exo_pair"),
        ({"loss_type": "ipo"}, "chosen_tokens"),
        ({"loss_type": "sft"}, "chosen_tokens"),
        ({"f_divergence": "kl"}, "f_divergence"),
        ({"loss_type": "bco_pair", "f_divergence": "forward_kl"}, "only"),
    ],
)
def test_dpo_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    x = _t([-1.0, -2.0])
    with pytest.raises(ConfigError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


def test_other_losses_reject_bad_options() -> None:
    x = _t([-1.0, -2.0])
    with pytest.raises(ConfigError, match="loss_type"):
        cpo_loss(x, x, loss_type="nope")
    with pytest.raises(ConfigError, match="chosen_tokens"):
        cpo_loss(x, x, loss_type="sigmoid")  # the NLL term (cpo_alpha=1) needs token counts
    with pytest.raises(ConfigError, match="loss_type"):
        kto_loss(x, x, torch.tensor([True, False]), 0.0, loss_type="nope")
    with pytest.raises(ConfigError, match="nll_tokens"):
        orpo_loss(x, x, torch.tensor([1, 2]), torch.tensor([1, 2]), nll_logps=x)
