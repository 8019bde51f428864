"""Online-RL losses equal TRL's (1.16.0) on the same log-probabilities, live and against goldens;
properties of advantages, clipping, KL and microbatch splitting.

TRL computes GRPO's and RLOO's losses inside ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss``, which call a model. The ``trl_*`` helpers call those real methods
on bare trainer instances (``object.__new__``, no ``__init__``) carrying only the attributes the
method reads, with a stand-in model that returns prepared per-token log-probs and entropies
(TRL's fused-head ``log_probs``/``entropy``). Nothing of TRL is re-implemented: the loss, its
gradient with respect to the per-token log-probs and the logged metrics all come from TRL.

The golden file ``golden/rl_trl.json`` holds small raws and TRL's outputs; a TRL release that moves
a definition fails ``test_trl_still_matches_golden``. Regenerate it with
``TSCALE_REGEN_GOLDEN=1 pytest tests/losses/test_rl_losses.py -k regen``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core.metrics import combine, finalise
from tscale.errors import ConfigError, ShapeError
from tscale.losses.rl import (
    POLICY_LOSS_TYPES,
    gae,
    group_advantages,
    kl_penalty,
    kl_rewards,
    policy_loss,
    policy_normaliser,
    rloo_advantages,
    rloo_policy_loss,
    value_loss,
    whiten,
    zero_std_groups,
)

GOLDEN = Path(__file__).parent / "golden" / "rl_trl.json"
TRL_VERSION = "1.16.0"
F64 = {"rtol": 1e-12, "atol": 1e-12}
PROMPT = 3  # prompt width in front of the completion (TRL slices the completion off the end)
GROUP = 4

Raw = dict[str, torch.Tensor]
Out = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Raw inputs: a rollout batch of N = groups × G completions, T completion positions
# --------------------------------------------------------------------------------------------


def rl_raw(seed: int, groups: int = 2, width: int = 6) -> Raw:
    gen = torch.Generator().manual_seed(seed)
    n = groups * GROUP
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width) < lengths[:, None]).long()

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(n, width, generator=gen, dtype=torch.float64)

    old = -(3 * torch.rand(n, width, generator=gen, dtype=torch.float64) + 0.05)
    # ratios e^{±0.3}: many tokens outside [0.8, 1.28], on both sides
    logps = old + noise(0.3)
    ref = old + noise(0.5)
    rewards = torch.randint(0, 3, (n,), generator=gen).to(torch.float64)
    return {
        "mask": mask,
        "logps": logps * mask,
        "old_logps": old * mask,
        "ref_logps": ref * mask,
        "entropies": torch.rand(n, width, generator=gen, dtype=torch.float64) * 2 * mask,
        "advantages": group_advantages(rewards + 0.1 * torch.arange(n), GROUP, "group"),
    }


# --------------------------------------------------------------------------------------------
# TRL, called on bare trainer instances
# --------------------------------------------------------------------------------------------


def _accelerator() -> SimpleNamespace:
    ident = lambda t, **kw: t  # noqa: E731 - one process: gathers and reductions are the identity
    return SimpleNamespace(
        device=torch.device("cpu"),
        gather=ident,
        gather_for_metrics=ident,
        reduce=ident,
        num_processes=1,
        sync_gradients=True,
        is_main_process=True,  # read by TRL's profiling decorator
        autocast=contextlib.nullcontext,
    )


def _bare(cls: type, **attrs: Any) -> Any:
    obj = object.__new__(cls)
    base = {
        "accelerator": _accelerator(),
        "model": SimpleNamespace(training=True),
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "current_gradient_accumulation_steps": 1,
    }
    for name, value in {**base, **attrs}.items():
        setattr(obj, name, value)
    return obj


def _stand_in_model(token_logps: torch.Tensor, entropies: torch.Tensor) -> Any:
    """TRL's fused LM head output over prompt + completion; TRL keeps the last T positions."""
    n = token_logps.shape[0]
    pad = torch.zeros(n, PROMPT, dtype=token_logps.dtype)

    def model(**kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(
            log_probs=torch.cat([pad, token_logps], dim=1),
            entropy=torch.cat([pad, entropies], dim=1),
        )

    return model


def _trl_inputs(raw: Raw) -> dict[str, Any]:
    mask = raw["mask"]
    n = mask.shape[0]
    return {
        "prompt_ids": torch.ones(n, PROMPT, dtype=torch.long),
        "prompt_mask": torch.ones(n, PROMPT, dtype=torch.long),
        "completion_ids": torch.ones_like(mask),
        "completion_mask": mask,
    }


METRIC_KEYS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "entropy",
)


def trl_grpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.trainer.grpo_trainer import GRPOTrainer

    epsilon = cfg.get("epsilon", 0.2)
    beta = cfg.get("beta", 0.0)
    trainer = _bare(
        GRPOTrainer,
        loss_type=cfg["loss_type"],
        importance_sampling_level=cfg.get("importance_sampling_level", "token"),
        epsilon_low=epsilon,
        epsilon_high=cfg.get("epsilon_high") or epsilon,
        beta=beta,
        max_completion_length=cfg.get("max_completion_length", raw["mask"].shape[1]),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(
            use_bias_correction_kl=False, delta=cfg.get("delta"), steps_per_generation=1
        ),
    )
    logps = raw["logps"].clone().requires_grad_(True)
    inputs = _trl_inputs(raw) | {
        "advantages": raw["advantages"],
        "old_per_token_logps": raw["old_logps"],
        "num_items_in_batch": raw["mask"].sum(),
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = raw["ref_logps"]
    model = _stand_in_model(logps, raw["entropies"])
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    loss = loss.detach()
    metrics = trainer._metrics["train"]
    keys = METRIC_KEYS + (("kl",) if beta != 0.0 else ())
    return {"loss": float(loss), "grad": grad.tolist(), **{k: metrics[k][-1] for k in keys}}


def ours_grpo(raw: Raw, cfg: dict[str, Any]) -> Out:
    beta = cfg.get("beta", 0.0)
    logps = raw["logps"].clone().requires_grad_(True)
    out = policy_loss(
        logps,
        raw["old_logps"],
        raw["advantages"],
        raw["mask"],
        ref_logps=raw["ref_logps"] if beta != 0.0 else None,
        entropies=raw["entropies"],
        **({"max_completion_length": raw["mask"].shape[1]} | cfg),
    )
    loss = out.loss_sum / out.normaliser
    (grad,) = torch.autograd.grad(loss, logps)
    loss = loss.detach()
    metrics = finalise(out.metrics)
    keys = METRIC_KEYS + (("kl",) if beta != 0.0 else ())
    return {"loss": float(loss), "grad": grad.tolist(), **{k: float(metrics[k]) for k in keys}}


def trl_rloo(raw: Raw, cfg: dict[str, Any]) -> Out:
    from trl.trainer.rloo_trainer import RLOOTrainer

    epsilon = cfg.get("epsilon", 0.2)
    trainer = _bare(
        RLOOTrainer, epsilon_low=epsilon, epsilon_high=cfg.get("epsilon_high") or epsilon
    )
    # ratios of whole sequences: keep the per-token drift small so some stay inside the clip
    logps = (raw["old_logps"] + 0.15 * (raw["logps"] - raw["old_logps"])).requires_grad_(True)
    inputs = _trl_inputs(raw) | {
        "advantages": raw["advantages"],
        "old_logps": (raw["old_logps"] * raw["mask"]).sum(1),
    }
    loss = RLOOTrainer._compute_loss(trainer, _stand_in_model(logps, raw["entropies"]), inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    loss = loss.detach()
    metrics = trainer._metrics["train"]
    keys = [k for k in METRIC_KEYS if k != "entropy"]
    return {"loss": float(loss), "grad": grad.tolist(), **{k: metrics[k][-1] for k in keys}}


def ours_rloo(raw: Raw, cfg: dict[str, Any]) -> Out:
    logps = (raw["old_logps"] + 0.15 * (raw["logps"] - raw["old_logps"])).requires_grad_(True)
    out = rloo_policy_loss(logps, raw["old_logps"], raw["advantages"], raw["mask"], **cfg)
    loss = out.loss_sum / out.normaliser
    (grad,) = torch.autograd.grad(loss, logps)
    loss = loss.detach()
    metrics = finalise(out.metrics)
    keys = [k for k in METRIC_KEYS if k != "entropy"]
    return {"loss": float(loss), "grad": grad.tolist(), **{k: float(metrics[k]) for k in keys}}


FAMILIES = {"grpo": (trl_grpo, ours_grpo), "rloo": (trl_rloo, ours_rloo)}

CASES: list[tuple[str, dict[str, Any]]] = [
    *[
        ("grpo", {"loss_type": t, "importance_sampling_level": level, "beta": beta})
        for t in POLICY_LOSS_TYPES
        for level in ("token", "sequence")
        for beta in (0.0, 0.04)
    ],
    ("grpo", {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.1}),
    ("grpo", {"loss_type": "grpo", "epsilon": 0.1, "epsilon_high": 0.3, "delta": 1.35}),
    ("grpo", {"loss_type": "dr_grpo", "max_completion_length": 16, "beta": 0.04}),
    ("rloo", {}),
    ("rloo", {"epsilon": 0.1, "epsilon_high": 0.3}),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    family, cfg = case
    return family + "-" + "-".join(f"{k}={v}" for k, v in cfg.items())


def _assert_close(ours: Out, ref: Out, what: str) -> None:
    assert ours.keys() == ref.keys(), what
    for key in ref:
        if key in ("grad", "advantages"):
            # TRL's standard deviations carry a float32 Bessel factor (see the advantage tests)
            tol = F64 if key == "grad" else {"rtol": 1e-7, "atol": 1e-7}
            torch.testing.assert_close(
                torch.tensor(ours[key]), torch.tensor(ref[key]), **tol, msg=f"{what}: {key}"
            )
        else:
            # TRL takes the clip fractions of float32 booleans (``.float()``)
            tol = 1e-7 if key.startswith("clip_ratio/") else 1e-12
            close = math.isclose(ours[key], ref[key], rel_tol=tol, abs_tol=tol)
            assert close, f"{what}: {key} = {ours[key]!r}, TRL {ref[key]!r}"


def _require_trl() -> None:
    trl = pytest.importorskip("trl")
    if trl.__version__ != TRL_VERSION:
        pytest.skip(f"TRL {trl.__version__} installed; the harness is written for {TRL_VERSION}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_live(case: tuple[str, dict[str, Any]], seed: int) -> None:
    _require_trl()
    family, cfg = case
    trl_fn, ours_fn = FAMILIES[family]
    raw = rl_raw(seed)
    _assert_close(ours_fn(raw, cfg), trl_fn(raw, cfg), _case_id(case))


def test_live_cases_exercise_the_clip() -> None:
    """The raws put tokens on both sides of the clip range, so the comparison covers it."""
    out = ours_grpo(rl_raw(0), {"loss_type": "dapo"})
    assert 0 < out["clip_ratio/low_mean"] and 0 < out["clip_ratio/high_mean"]
    assert out["clip_ratio/region_mean"] < 1


# --------------------------------------------------------------------------------------------
# Advantages: TRL's ``_generate_and_score_completions`` with generation and rewards stubbed
# --------------------------------------------------------------------------------------------


def advantage_raw(seed: int, groups: int = 3, width: int = 5) -> Raw:
    """Rewards with ties (zero-spread groups), unscorable (NaN) completions, and token log-probs
    of completions of varied length."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * GROUP
    rewards = torch.randint(0, 3, (n,), generator=gen).to(torch.float64)
    rewards[:GROUP] = 1.0  # one group with no spread
    rewards[GROUP + 1] = math.nan  # an unscorable completion
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    old = -(3 * torch.rand(n, width, generator=gen, dtype=torch.float64) + 0.05)
    ref = old + 0.5 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    mask = (torch.arange(width) < lengths[:, None]).long()
    return {"rewards": rewards, "mask": mask, "old_logps": old * mask, "ref_logps": ref * mask}


class _LogpModel:
    """A stand-in model for TRL's no-grad passes: fixed per-token log-probs of the completion."""

    is_gradient_checkpointing = False
    training = True

    def __init__(self, token_logps: torch.Tensor) -> None:
        self.model = _stand_in_model(token_logps, torch.zeros_like(token_logps))

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        return self.model(**kwargs)


def _bare_rollout(cls: type, raw: Raw, **attrs: Any) -> Any:
    """A bare trainer whose generation returns ``raw``'s completions and whose one reward
    function returns ``raw["rewards"]`` (NaN: unscorable)."""
    mask = raw["mask"]
    n = mask.shape[0]
    completions = [[5] * int(k) for k in mask.sum(1)]
    accelerator = _accelerator()
    accelerator.process_index = 0
    trainer = _bare(
        cls,
        accelerator=accelerator,
        model=_LogpModel(raw["old_logps"]),
        environment_factories=None,
        environments=[],
        tools=None,
        processing_class=SimpleNamespace(batch_decode=lambda ids, **kw: ["c"] * len(ids)),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        num_generations=GROUP,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1, dtype=torch.float64),
        reward_func_names=["r"],
        reward_clip_range=None,
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        args=SimpleNamespace(
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            gradient_checkpointing_kwargs=None,
            per_device_train_batch_size=n,
        ),
        **attrs,
    )
    trainer._calculate_rewards = lambda *args: raw["rewards"][:, None]
    if cls.__name__ == "RLOOTrainer":
        trainer._generate = lambda prompts: ([[1] * PROMPT] * n, completions, ["c"] * n)
    else:
        generated = ([[1] * PROMPT] * n, completions, None, ["c"] * n, None, {}, None, None)
        trainer._generate = lambda prompts: generated
    return trainer


def trl_group_advantages(raw: Raw, scale_rewards: str) -> Out:
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = _bare_rollout(GRPOTrainer, raw, scale_rewards=scale_rewards, beta=0.0)
    n = raw["mask"].shape[0]
    out = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)
    frac = trainer._metrics["train"]["frac_reward_zero_std"][-1]
    return {"advantages": out["advantages"].tolist(), "frac_reward_zero_std": frac}


def trl_rloo_advantages(raw: Raw, beta: float, normalize: bool) -> Out:
    from trl.trainer.rloo_trainer import RLOOTrainer

    trainer = _bare_rollout(
        RLOOTrainer,
        raw,
        beta=beta,
        ref_model=_LogpModel(raw["ref_logps"]),
        normalize_advantages=normalize,
    )
    n = raw["mask"].shape[0]
    out = RLOOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)
    return {"advantages": out["advantages"].tolist()}


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_trl(scale_rewards: str, seed: int) -> None:
    _require_trl()
    raw = advantage_raw(seed)
    ref = trl_group_advantages(raw, scale_rewards)
    ours = group_advantages(raw["rewards"], GROUP, scale_rewards)  # type: ignore[arg-type]
    # TRL's ``nanstd`` takes Bessel's factor count / (count − 1) of int64 tensors, a float32
    # quotient: the standard deviation is float32-accurate, hence 1e-7 for the scaled variants.
    tol = F64 if scale_rewards == "none" else {"rtol": 1e-7, "atol": 1e-7}
    torch.testing.assert_close(ours, torch.tensor(ref["advantages"], dtype=torch.float64), **tol)
    if scale_rewards == "batch":
        return  # TRL then logs whether the *batch* has no spread
    # TRL counts a group as zero-spread when its std is zero (isclose); here no group has a
    # single scorable completion, where the two differ (NaN std: TRL says "has spread").
    frac = zero_std_groups(raw["rewards"], GROUP).double().mean()
    assert math.isclose(float(frac), ref["frac_reward_zero_std"], abs_tol=1e-7)


@pytest.mark.parametrize(("beta", "normalize"), [(0.0, False), (0.0, True), (0.05, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_advantages_match_trl(beta: float, normalize: bool, seed: int) -> None:
    """TRL folds ``β · Σ_t k1(old, ref)`` into the rewards before the leave-one-out baseline."""
    _require_trl()
    raw = advantage_raw(seed)
    ref = trl_rloo_advantages(raw, beta, normalize)
    kl = (kl_penalty(raw["old_logps"], raw["ref_logps"], "k1") * raw["mask"]).sum(1)
    ours = rloo_advantages(raw["rewards"] - beta * kl, GROUP, normalize=normalize)
    tol = {"rtol": 1e-7, "atol": 1e-7} if normalize else F64  # TRL's float32 Bessel factor
    torch.testing.assert_close(ours, torch.tensor(ref["advantages"], dtype=torch.float64), **tol)


def _trl_group_adv(raw: Raw, cfg: dict[str, Any]) -> Out:
    return {"advantages": trl_group_advantages(raw, cfg["scale_rewards"])["advantages"]}


def _ours_group_adv(raw: Raw, cfg: dict[str, Any]) -> Out:
    return {"advantages": group_advantages(raw["rewards"], GROUP, cfg["scale_rewards"]).tolist()}


def _trl_rloo_adv(raw: Raw, cfg: dict[str, Any]) -> Out:
    return trl_rloo_advantages(raw, cfg["beta"], cfg["normalize"])


def _ours_rloo_adv(raw: Raw, cfg: dict[str, Any]) -> Out:
    kl = (kl_penalty(raw["old_logps"], raw["ref_logps"], "k1") * raw["mask"]).sum(1)
    rewards = raw["rewards"] - cfg["beta"] * kl
    return {"advantages": rloo_advantages(rewards, GROUP, normalize=cfg["normalize"]).tolist()}


ADVANTAGE_FAMILIES = {
    "group_advantages": (_trl_group_adv, _ours_group_adv),
    "rloo_advantages": (_trl_rloo_adv, _ours_rloo_adv),
}
GOLDEN_CASES: list[tuple[str, dict[str, Any]]] = [
    *CASES,
    *[("group_advantages", {"scale_rewards": s}) for s in ("group", "batch", "none")],
    ("rloo_advantages", {"beta": 0.0, "normalize": True}),
    ("rloo_advantages", {"beta": 0.05, "normalize": False}),
]


def _golden_raw(family: str) -> Raw:
    if family in ADVANTAGE_FAMILIES:
        return advantage_raw(11, groups=2, width=4)
    return rl_raw(11, groups=2, width=4)


def _fns(family: str) -> tuple[Any, Any]:
    return (FAMILIES | ADVANTAGE_FAMILIES)[family]


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


@pytest.mark.skipif(
    os.environ.get("TSCALE_REGEN_GOLDEN") != "1", reason="set TSCALE_REGEN_GOLDEN=1"
)
def test_regen_golden() -> None:
    _require_trl()
    records = []
    for family, cfg in GOLDEN_CASES:
        raw = _golden_raw(family)
        expected = _fns(family)[0](raw, cfg)
        records.append({"family": family, "config": cfg, "raw": _encode(raw), "trl": expected})
    payload = {"trl_version": TRL_VERSION, "cases": records}
    GOLDEN.write_text(json.dumps(payload, indent=1) + "\n")


def _golden_cases() -> list[dict[str, Any]]:
    return json.loads(GOLDEN.read_text())["cases"] if GOLDEN.exists() else []


def _golden_id(record: dict[str, Any]) -> str:
    return _case_id((record["family"], record["config"]))


@pytest.mark.parametrize("record", _golden_cases(), ids=_golden_id)
def test_tscale_matches_golden(record: dict[str, Any]) -> None:
    ours = _fns(record["family"])[1](_decode(record["raw"]), record["config"])
    _assert_close(ours, record["trl"], _golden_id(record))


@pytest.mark.parametrize("record", _golden_cases(), ids=_golden_id)
def test_trl_still_matches_golden(record: dict[str, Any]) -> None:
    """Fails when a TRL release moves a definition (or the method the harness calls)."""
    pytest.importorskip("trl")
    now = _fns(record["family"])[0](_decode(record["raw"]), record["config"])
    _assert_close(now, record["trl"], _golden_id(record))


def test_golden_file_covers_every_case() -> None:
    assert GOLDEN.exists(), "regenerate: TSCALE_REGEN_GOLDEN=1 pytest -k regen"
    assert {_golden_id(r) for r in _golden_cases()} == {_case_id(c) for c in GOLDEN_CASES}
