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
import itertools
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


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_matches_trl_with_a_masked_completion(loss_type: str, level: str) -> None:
    """``mask_truncated_completions`` leaves rows with an all-zero mask: they still count as
    completions (``grpo``, ``dr_grpo``) and stay out of the per-completion clip extrema."""
    _require_trl()
    raw = rl_raw(4)
    for key in ("mask", "logps", "old_logps", "ref_logps", "entropies"):
        raw[key][[1, 6]] = 0
    cfg = {"loss_type": loss_type, "importance_sampling_level": level, "beta": 0.04}
    _assert_close(ours_grpo(raw, cfg), trl_grpo(raw, cfg), str(cfg))


def test_live_cases_exercise_the_clip() -> None:
    """The raws put tokens on both sides of the clip range, so the comparison covers it."""
    out = ours_grpo(rl_raw(0), {"loss_type": "dapo"})
    assert out["clip_ratio/low_mean"] > 0 and out["clip_ratio/high_mean"] > 0
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


# --------------------------------------------------------------------------------------------
# Properties (no TRL needed)
# --------------------------------------------------------------------------------------------

_reward = st.floats(-10.0, 10.0, allow_nan=False)


def _rewards(data: st.DataObject, groups: int, size: int) -> torch.Tensor:
    values = data.draw(st.lists(_reward, min_size=groups * size, max_size=groups * size))
    return torch.tensor(values, dtype=torch.float64)


@given(st.data(), st.integers(1, 4), st.integers(1, 6), st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_sum_to_zero_per_group(
    data: st.DataObject, groups: int, size: int, scale: str
) -> None:
    rewards = _rewards(data, groups, size)
    advantages = group_advantages(rewards, size, scale)  # type: ignore[arg-type]
    sums = advantages.view(groups, size).sum(1)
    torch.testing.assert_close(sums, torch.zeros(groups, dtype=torch.float64), rtol=0, atol=1e-9)


@given(st.data(), st.integers(1, 4), st.integers(2, 6), st.floats(0.01, 100.0), _reward)
def test_group_advantages_invariant_to_positive_affine_rewards(
    data: st.DataObject, groups: int, size: int, a: float, b: float
) -> None:
    """``A(aR + b) = (R − μ) / (σ + ε/a)`` against ``A(R) = (R − μ) / (σ + ε)``: equal up to the
    ε added to the standard deviation, and exactly equal with ε = 0 where a group has spread."""
    rewards = _rewards(data, groups, size)
    eps = 1e-4
    before = group_advantages(rewards, size, "group", eps=eps)
    after = group_advantages(a * rewards + b, size, "group", eps=eps)
    grouped = rewards.view(groups, size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
    bound = centred.abs() * eps * abs(1 - 1 / a) / ((std + eps / a) * (std + eps))
    assert bool(((after - before).abs() <= bound + 1e-8).all())
    spread = std > 1e-3
    exact_before = group_advantages(rewards, size, "group", eps=0.0)
    exact_after = group_advantages(a * rewards + b, size, "group", eps=0.0)
    torch.testing.assert_close(exact_after[spread], exact_before[spread], rtol=1e-7, atol=1e-7)


def test_group_advantages_of_tied_groups_and_unscorable_completions_are_zero() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, math.nan, 2.0, math.nan, math.nan, 5.0])
    advantages = group_advantages(rewards, 3)
    assert advantages[:3].eq(0).all() and advantages[4] == 0 and advantages[6:].eq(0).all()
    assert advantages[3] < 0 < advantages[5]
    assert zero_std_groups(rewards, 3).tolist() == [True, False, True]


@given(st.data(), st.integers(1, 4), st.integers(2, 6))
def test_rloo_advantages_are_leave_one_out(data: st.DataObject, groups: int, size: int) -> None:
    rewards = _rewards(data, groups, size)
    advantages = rloo_advantages(rewards, size)
    expected = []
    for g in range(groups):
        block = rewards[g * size : (g + 1) * size].tolist()
        for i, r in enumerate(block):
            others = [x for j, x in enumerate(block) if j != i]
            expected.append(r - sum(others) / len(others))
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    sums = advantages.view(groups, size).sum(1)
    torch.testing.assert_close(sums, torch.zeros(groups, dtype=torch.float64), rtol=0, atol=1e-9)


def _batch(seed: int, groups: int, size: int, width: int = 5) -> Raw:
    gen = torch.Generator().manual_seed(seed)
    n = groups * size
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width) < lengths[:, None]).long()
    old = -(3 * torch.rand(n, width, generator=gen, dtype=torch.float64) + 0.05)
    rewards = torch.randint(0, 4, (n,), generator=gen).to(torch.float64)
    return {
        "mask": mask,
        "old_logps": old * mask,
        "logps": (old + 0.3 * torch.randn(n, width, generator=gen, dtype=torch.float64)) * mask,
        "ref_logps": (old + 0.5 * torch.randn(n, width, generator=gen, dtype=torch.float64)) * mask,
        "advantages": group_advantages(rewards, size),
    }


def _loss_and_grad(raw: Raw, rows: slice, **kw: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """A microbatch's (loss_sum, result, d loss_sum / d logps) through its own forward."""
    logps = raw["logps"][rows].clone().requires_grad_(True)
    ref = raw["ref_logps"][rows] if kw.get("beta") else None
    out = policy_loss(
        logps,
        raw["old_logps"][rows],
        raw["advantages"][rows],
        raw["mask"][rows],
        ref_logps=ref,
        **kw,
    )
    (grad,) = torch.autograd.grad(out.loss_sum, logps)
    return out.loss_sum.detach(), out, grad


_loss_types = st.sampled_from(POLICY_LOSS_TYPES)
_levels = st.sampled_from(["token", "sequence"])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(2, 5),
    st.integers(1, 4),
    _loss_types,
    _levels,
    st.sampled_from([0.0, 0.04]),
    st.data(),
)
def test_microbatches_and_ranks_give_the_whole_batch_gradient(
    seed: int,
    groups: int,
    size: int,
    loss_type: str,
    level: str,
    beta: float,
    data: st.DataObject,
) -> None:
    """Groups kept whole, any cut into microbatches (or ranks): the summed losses, gradients and
    normalisers divided once give the whole batch's loss and gradient; metrics combine exactly."""
    raw = _batch(seed, groups, size)
    kw = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "beta": beta,
        "max_completion_length": 7,
        "epsilon_high": 0.28,
    }
    whole_sum, whole, whole_grad = _loss_and_grad(raw, slice(None), **kw)
    cuts = sorted(data.draw(st.sets(st.integers(1, groups - 1), max_size=groups - 1)))
    bounds = [0, *[c * size for c in cuts], groups * size]
    parts = [_loss_and_grad(raw, slice(lo, hi), **kw) for lo, hi in itertools.pairwise(bounds)]
    normaliser = sum(p[1].normaliser for p in parts)
    assert int(normaliser) == int(whole.normaliser)
    assert int(normaliser) == int(policy_normaliser(raw["mask"], loss_type, 7))  # type: ignore[arg-type]
    loss = sum(p[0] for p in parts) / normaliser
    grad = torch.cat([p[2] for p in parts]) / normaliser
    torch.testing.assert_close(loss, whole_sum / whole.normaliser, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, whole_grad / whole.normaliser, rtol=1e-12, atol=1e-14)
    metrics = parts[0][1].metrics
    for p in parts[1:]:
        metrics = combine(metrics, p[1].metrics)
    combined, expected = finalise(metrics), finalise(whole.metrics)
    assert combined.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(combined[k], expected[k], rtol=1e-12, atol=1e-14, msg=k)


def test_bnpo_is_dapo_under_a_global_normaliser() -> None:
    raw = _batch(3, 3, 4)
    bnpo = _loss_and_grad(raw, slice(None), loss_type="bnpo", beta=0.04)
    dapo = _loss_and_grad(raw, slice(None), loss_type="dapo", beta=0.04)
    assert torch.equal(bnpo[0], dapo[0]) and torch.equal(bnpo[2], dapo[2])
    assert torch.equal(bnpo[1].normaliser, dapo[1].normaliser)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), _loss_types, _levels, st.floats(0.01, 0.5), st.floats(0.01, 0.5))
def test_clipped_objective_is_the_unclipped_one_at_ratio_one(
    seed: int, loss_type: str, level: str, eps_low: float, eps_high: float
) -> None:
    """With π_old = π_θ the ratio is 1, inside every clip range: loss and gradient equal the
    unclipped surrogate's (ε = ∞), i.e. the policy gradient −A ∇log π."""
    raw = _batch(seed, 3, 4)
    raw["old_logps"] = raw["logps"]
    common = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "max_completion_length": 6,
    }
    clipped = _loss_and_grad(raw, slice(None), epsilon=eps_low, epsilon_high=eps_high, **common)
    free = _loss_and_grad(raw, slice(None), epsilon=1e9, epsilon_high=1e9, **common)
    torch.testing.assert_close(clipped[0], free[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(clipped[2], free[2], rtol=1e-12, atol=1e-14)
    # the value is −Σ A over the loss type's weights; clip fractions are zero
    m = raw["mask"].double()
    adv = raw["advantages"][:, None] * m
    lengths = m.sum(1, keepdim=True)
    # a sequence weight exp(mean_t log r) is broadcast over the |o| tokens: d/d log π_t = 1 too
    expected_grad = -adv
    if loss_type == "grpo":
        expected_grad = expected_grad / lengths
    torch.testing.assert_close(clipped[2], expected_grad, rtol=1e-12, atol=1e-14)
    metrics = finalise(clipped[1].metrics)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    assert float(metrics["ratio/min"]) == float(metrics["ratio/max"]) == 1.0


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_beta_zero_needs_no_reference(loss_type: str) -> None:
    raw = _batch(5, 2, 3)
    kw = {"loss_type": loss_type, "max_completion_length": 5}
    no_ref = policy_loss(raw["logps"], raw["old_logps"], raw["advantages"], raw["mask"], **kw)
    with_ref = policy_loss(
        raw["logps"],
        raw["old_logps"],
        raw["advantages"],
        raw["mask"],
        ref_logps=raw["ref_logps"],
        beta=0.0,
        **kw,
    )
    assert torch.equal(no_ref.loss_sum, with_ref.loss_sum)
    assert "kl" not in no_ref.metrics and "kl" in with_ref.metrics  # reported, not trained
    with pytest.raises(ConfigError, match="ref_logps"):
        policy_loss(raw["logps"], raw["old_logps"], raw["advantages"], raw["mask"], beta=0.1, **kw)


def test_token_advantages_give_ppo_surrogate() -> None:
    """Per-token advantages (PPO with GAE) under ``dapo``: the token mean of
    ``max(−A r, −A clip(r))`` (Schulman et al. 2017), computed here token by token."""
    raw = _batch(7, 2, 3)
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(raw["mask"].shape, generator=gen, dtype=torch.float64)
    out = policy_loss(raw["logps"], raw["old_logps"], adv, raw["mask"], epsilon=0.2)
    total, count = 0.0, 0
    for i, j in raw["mask"].nonzero().tolist():
        r = math.exp(float(raw["logps"][i, j] - raw["old_logps"][i, j]))
        a = float(adv[i, j])
        total += max(-a * r, -a * min(max(r, 0.8), 1.2))
        count += 1
    assert int(out.normaliser) == count
    assert math.isclose(float(out.loss_sum), total, rel_tol=1e-12)


def test_policy_loss_composes_with_torch_func() -> None:
    """The step differentiates with ``torch.func``: the same gradient as autograd."""
    raw = _batch(9, 2, 3)

    def loss(logps: torch.Tensor) -> torch.Tensor:
        out = policy_loss(
            logps,
            raw["old_logps"],
            raw["advantages"],
            raw["mask"],
            ref_logps=raw["ref_logps"],
            beta=0.1,
        )
        return out.loss_sum / out.normaliser

    _, _, reference = _loss_and_grad(raw, slice(None), beta=0.1)
    normaliser = raw["mask"].sum()
    torch.testing.assert_close(torch.func.grad(loss)(raw["logps"]), reference / normaliser)


def _gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE over one completion of len(rewards) tokens, the value after the last token 0."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


@given(st.integers(0, 2**16), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_a_plain_loop(seed: int, gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, width = 4, 6
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width) < lengths[:, None]).long()
    rewards = torch.randn(n, width, generator=gen, dtype=torch.float64)
    values = torch.randn(n, width, generator=gen, dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i in range(n):
        k = int(lengths[i])
        expected = _gae_loop(rewards[i, :k].tolist(), values[i, :k].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[i, :k], torch.tensor(expected, dtype=torch.float64))
        assert advantages[i, k:].eq(0).all() and returns[i, k:].eq(0).all()
    torch.testing.assert_close(returns, (advantages + values) * mask)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.5, 0.8, 0.9, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))


def test_whiten_over_the_mask() -> None:
    raw = _batch(4, 2, 4)
    m = raw["mask"].bool()
    x = 3 * raw["logps"] + 2
    white = whiten(x, raw["mask"], eps=0.0)
    torch.testing.assert_close(
        white[m].mean(), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(white[m].var(), torch.ones((), dtype=torch.float64))
    kept = whiten(x, raw["mask"], shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept[m].mean(), x[m].mean())


def test_value_loss_matches_a_plain_reference() -> None:
    raw = _batch(6, 2, 3)
    gen = torch.Generator().manual_seed(1)
    shape = raw["mask"].shape
    old = torch.randn(shape, generator=gen, dtype=torch.float64)
    returns = torch.randn(shape, generator=gen, dtype=torch.float64)
    values = (old + 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    out = value_loss(values, old, returns, raw["mask"], cliprange_value=0.2)
    total, clipped_tokens = 0.0, 0
    for i, j in raw["mask"].nonzero().tolist():
        v, vo, r = float(values[i, j].detach()), float(old[i, j]), float(returns[i, j])
        vc = vo + min(max(v - vo, -0.2), 0.2)
        total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
        clipped_tokens += (vc - r) ** 2 > (v - r) ** 2
    assert int(out.normaliser) == int(raw["mask"].sum())
    assert math.isclose(float(out.loss_sum), total, rel_tol=1e-12)
    clipfrac = float(finalise(out.metrics)["value/clipfrac"])
    assert math.isclose(clipfrac, clipped_tokens / int(raw["mask"].sum()), rel_tol=1e-12)
    free = value_loss(values, old, returns, raw["mask"], cliprange_value=1e9)
    mse = 0.5 * (((values - returns) ** 2) * raw["mask"]).sum()
    torch.testing.assert_close(free.loss_sum, mse)


def test_kl_rewards_put_the_score_on_the_last_token() -> None:
    raw = _batch(8, 2, 3)
    scores = torch.arange(6, dtype=torch.float64)
    rewards = kl_rewards(scores, raw["old_logps"], raw["ref_logps"], raw["mask"], beta=0.1)
    kl = kl_penalty(raw["old_logps"], raw["ref_logps"], "k1") * raw["mask"]
    torch.testing.assert_close(rewards.sum(1), scores - 0.1 * kl.sum(1))
    last = raw["mask"].sum(1) - 1
    rows = torch.arange(6)
    torch.testing.assert_close(rewards[rows, last], scores - 0.1 * kl[rows, last])
    assert rewards[raw["mask"] == 0].eq(0).all()
    k3 = kl_rewards(
        scores, raw["old_logps"], raw["ref_logps"], raw["mask"], beta=1.0, estimator="k3"
    )
    assert bool((k3.sum(1) <= scores).all())  # k3 ≥ 0: the penalty only lowers the reward


def test_kl_estimators() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -0.1], dtype=torch.float64)
    x = ref - logps
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), logps - ref)
    torch.testing.assert_close(kl_penalty(logps, ref, "k2"), 0.5 * x**2)
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), x.exp() - x - 1)
    assert bool((kl_penalty(logps, ref, "k3") >= 0).all())
    assert kl_penalty(logps, logps, "k3").eq(0).all()


def test_rloo_policy_loss_normalises_by_completions() -> None:
    raw = _batch(2, 2, 3)
    out = rloo_policy_loss(raw["logps"], raw["old_logps"], raw["advantages"], raw["mask"])
    assert int(out.normaliser) == 6


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"loss_type": "nope"}, ConfigError, "loss_type"),
        ({"loss_type": "dr_grpo"}, ConfigError, "max_completion_length"),
        ({"importance_sampling_level": "batch"}, ConfigError, "importance_sampling_level"),
        ({"epsilon": -0.1}, ConfigError, "epsilon"),
        ({"delta": 1.1, "epsilon_high": 0.2}, ConfigError, "delta"),
        ({"beta": 0.1}, ConfigError, "ref_logps"),
    ],
)
def test_policy_loss_rejects_bad_options(kwargs: dict[str, Any], error: type, message: str) -> None:
    raw = _batch(1, 2, 2)
    with pytest.raises(error, match=message):
        policy_loss(raw["logps"], raw["old_logps"], raw["advantages"], raw["mask"], **kwargs)


def test_shapes_are_checked() -> None:
    raw = _batch(1, 2, 2)
    with pytest.raises(ShapeError, match="old_logps"):
        policy_loss(raw["logps"], raw["old_logps"][:, :2], raw["advantages"], raw["mask"])
    with pytest.raises(ShapeError, match="advantages"):
        policy_loss(raw["logps"], raw["old_logps"], raw["advantages"][:3], raw["mask"])
    token_adv = torch.zeros_like(raw["logps"])
    with pytest.raises(ShapeError, match="sequence"):
        policy_loss(
            raw["logps"],
            raw["old_logps"],
            token_adv,
            raw["mask"],
            importance_sampling_level="sequence",
        )
    with pytest.raises(ShapeError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="gae"):
        gae(raw["logps"], raw["logps"][:, :2], raw["mask"])


def test_no_host_sync() -> None:
    """Every function runs, forward and backward, without reading a tensor on the host."""
    from tscale.testing.optim import NoHostSync

    raw = _batch(3, 3, 4)
    logps = raw["logps"].clone().requires_grad_(True)
    with NoHostSync():
        rewards = torch.arange(12, dtype=torch.float64) % 3
        group_advantages(rewards, 4, "batch")
        rloo_advantages(rewards, 4, normalize=True)
        zero_std_groups(rewards, 4)
        for loss_type in POLICY_LOSS_TYPES:
            for level in ("token", "sequence"):
                out = policy_loss(
                    logps,
                    raw["old_logps"],
                    raw["advantages"],
                    raw["mask"],
                    loss_type=loss_type,  # type: ignore[arg-type]
                    importance_sampling_level=level,  # type: ignore[arg-type]
                    max_completion_length=5,
                    ref_logps=raw["ref_logps"],
                    beta=0.04,
                    entropies=raw["ref_logps"].abs(),
                    delta=2.0,
                )
                (out.loss_sum / out.normaliser).backward()
                finalise(out.metrics)
        rloo_policy_loss(
            logps, raw["old_logps"], raw["advantages"], raw["mask"]
        ).loss_sum.backward()
        values = raw["ref_logps"].clone().requires_grad_(True)
        value_loss(values, raw["old_logps"], raw["logps"], raw["mask"]).loss_sum.backward()
        scores = torch.ones(12, dtype=torch.float64)
        token_rewards = kl_rewards(
            scores, raw["old_logps"], raw["ref_logps"], raw["mask"], beta=0.1
        )
        advantages, _ = gae(token_rewards, raw["old_logps"], raw["mask"], gamma=1.0, lam=0.95)
        whiten(advantages, raw["mask"])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_train_step_with_microbatches_equals_the_whole_batch(loss_type: str, level: str) -> None:
    """Through ``make_train_step``: a policy whose log-probs come from a linear head, one SGD
    step on a rollout batch of 4 groups, whole or in 2 and 4 microbatches (groups kept whole)."""
    from tensordict import TensorDict

    from tscale.core import rng as R
    from tscale.core.state import TrainState
    from tscale.optim import scale
    from tscale.step import make_train_step

    gen = torch.Generator().manual_seed(0)
    n, width, features, vocab = 4 * GROUP, 5, 3, 7
    raw = _batch(1, 4, GROUP, width)
    batch = TensorDict(
        {
            "features": torch.randn(n, width, features, generator=gen, dtype=torch.float64),
            "ids": torch.randint(0, vocab, (n, width), generator=gen),
            "old_logps": raw["old_logps"],
            "ref_logps": raw["ref_logps"],
            "advantages": raw["advantages"],
            "mask": raw["mask"],
        },
        batch_size=[n],
    )

    def loss_fn(params: TensorDict, b: TensorDict) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = b["features"] @ params["w"]
        logps = torch.log_softmax(logits, -1).gather(-1, b["ids"][..., None]).squeeze(-1)
        out = policy_loss(
            logps * b["mask"],
            b["old_logps"],
            b["advantages"],
            b["mask"],
            loss_type=loss_type,  # type: ignore[arg-type]
            importance_sampling_level=level,  # type: ignore[arg-type]
            max_completion_length=width,
            ref_logps=b["ref_logps"],
            beta=0.04,
        )
        return out.loss_sum, {"tokens": out.normaliser, **out.metrics}

    tx = scale(-0.5)  # plain SGD
    w0 = torch.randn(features, vocab, generator=gen, dtype=torch.float64)
    results = []
    for microbatches in (1, 2, 4):
        params = TensorDict({"w": w0.clone()}, batch_size=[])
        state = TrainState.create(params, tx.init(params), R.key(0))
        step = make_train_step(loss_fn, tx, microbatches=microbatches)
        new_state, metrics = step(state, batch)
        results.append((new_state.params["w"], metrics))
    (w_whole, m_whole), *splits = results
    assert (w_whole - w0).abs().max() > 1e-3  # the step moved the policy
    for w_split, m_split in splits:
        torch.testing.assert_close(w_split, w_whole, rtol=1e-12, atol=1e-14)
        assert m_split.keys() == m_whole.keys()
        for k in m_whole:
            torch.testing.assert_close(m_split[k], m_whole[k], rtol=1e-12, atol=1e-14, msg=k)
