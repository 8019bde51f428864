"""PPO through `tscale train` (``task.type: ppo``) on a tiny random-init model: every metric
reaches metrics.jsonl, shared and separate value functions, microbatches give the step of one
batch, resume is exact with the value head in params and optimizer state, β = 0 has no
reference tree, the value function learns a fixed reward, an export has no value head and
transformers loads it, a reward-model folder initialises the critic."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tscale.cli import main
from tscale.config import load_config
from tscale.errors import ConfigError
from tscale.testing.runs import TINY_GRPO_YAML, TINY_QUICKSTART, step_rows
from tscale.train.run import Run, build_run

ROOT = Path(__file__).resolve().parents[2]
TIMING = "time/"
YAML = TINY_GRPO_YAML.replace("type: grpo", "type: ppo")
"""The tiny GRPO run of the GRPO tests as PPO: 4 prompts x 4 completions, 8 tokens, a reward
with spread (has_letter) beside exact match."""

PPO_METRICS = (
    "reward",
    "reward_std",
    "reward/exact_match",
    "reward/has_letter",
    "reward/unscorable",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "ratio/mean",
    "entropy",
    "logprob_mismatch",
    "advantages/mean",
    "advantages/std",
    "returns/mean",
    "non_score_reward",
    "kl",
    "policy/loss",
    "value/loss",
    "value/clipfrac",
    "value/mean",
    "value/error",
    "time/generation_s",
    "time/rollout_s",
)


def config(tmp: Path) -> Path:
    path = tmp / "ppo.yaml"
    path.write_text(YAML)
    return path


def run_ppo(tmp: Path, name: str, *overrides: str, steps: int = 3) -> list[dict]:
    resume = [a for a in overrides if a == "--resume"]
    rest = [a for a in overrides if a != "--resume"]
    args = [
        "train",
        str(config(tmp)),
        f"run.output_dir={tmp / name}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        *rest,
        *resume,
    ]
    assert main(args) == 0
    return step_rows(tmp / name)


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def built(tmp: Path, *overrides: str) -> Run:
    cfg = load_config(
        str(config(tmp)), [f"run.output_dir={tmp / 'b'}", "train.max_steps=1", *overrides]
    )
    return build_run(cfg, overwrite=True)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_tiny_run_logs_every_metric(tmp_path: Path, value_model: str) -> None:
    rows = run_ppo(tmp_path, "run", f"task.value_model={value_model}")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    for key in PPO_METRICS:
        assert key in first, key
    # the first update's ratio is π_train / π_sampler, the values are the sampling-time ones
    assert first["logprob_mismatch"] <= 1e-5
    assert first["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["value/clipfrac"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # β 0.05: the policy is the reference
    assert first["non_score_reward"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl"] != 0.0
    # the loss normaliser is the completion tokens (4 prompts x 4 completions)
    assert first["tokens"] == round(first["completions/mean_length"] * 16)
    # loss = policy token mean + vf_coef (0.1) x value token mean
    assert first["loss"] == pytest.approx(
        first["policy/loss"] + 0.1 * first["value/loss"], rel=1e-5, abs=1e-7
    )
    # value/loss is ½ the squared error when nothing is clipped
    assert first["value/loss"] == pytest.approx(0.5 * first["value/error"], rel=1e-5)
    assert all(r["grad_norm"] > 0 for r in rows)


def test_separate_critic_starts_as_the_shared_head(tmp_path: Path) -> None:
    """The critic is the starting weights plus a head drawn like the shared one: the first
    step's values (hence advantages, returns and losses) are the shared run's; afterwards the
    two value functions train apart."""
    shared = run_ppo(tmp_path, "shared", "task.value_model=shared")
    separate = run_ppo(tmp_path, "separate", "task.value_model=separate")
    for key in ("value/mean", "value/error", "returns/mean", "advantages/std", "loss"):
        assert separate[0][key] == pytest.approx(shared[0][key], rel=1e-5, abs=1e-7), key
    params = load_file(str(tmp_path / "separate/checkpoints/step_00000003/params.safetensors"))
    assert "critic.score.weight" in params and "value_head.weight" not in params
    assert "critic.lm_head.weight" not in params  # a critic has no LM head
    assert separate[-1]["value/mean"] != shared[-1]["value/mean"]


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_microbatches_give_the_same_step(tmp_path: Path, value_model: str) -> None:
    common = (f"task.value_model={value_model}", "task.num_iterations=2")
    one = run_ppo(tmp_path, "mb1", *common, steps=4)
    two = run_ppo(tmp_path, "mb2", *common, "train.microbatches=2", steps=4)
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["reward"] == b["reward"]
        for key in ("loss", "grad_norm", "policy/loss", "value/loss", "value/error", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_resume_is_exact(tmp_path: Path) -> None:
    whole = run_ppo(tmp_path, "whole", "train.save_every=3", steps=6)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/checkpoints/step_00000003", part / "step_00000003")
    saved = load_file(str(part / "step_00000003/params.safetensors"))
    assert "value_head.weight" in saved  # the head is in params (and its moments in opt_state)
    resumed = run_ppo(tmp_path, "part", "train.save_every=3", "--resume", steps=6)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in whole[3:]]


def test_beta_zero_needs_no_reference(tmp_path: Path) -> None:
    assert set(built(tmp_path, "task.beta=0").state.frozen or {}) == set()
    run = built(tmp_path)  # β 0.05: a frozen copy of the starting policy, no value head in it
    assert set(run.state.frozen) == {"reference"}
    assert "value_head" not in set(run.state.frozen["reference"].keys())
    assert "value_head" in set(run.state.params.keys())
    rows = run_ppo(tmp_path, "b0", "task.beta=0", steps=2)
    assert "kl" not in rows[0] and rows[0]["non_score_reward"] == 0.0


def test_k3_estimator(tmp_path: Path) -> None:
    rows = run_ppo(tmp_path, "k3", "task.kl_estimator=k3", steps=3)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["kl"] >= 0.0 for r in rows)  # k3 is never negative


def test_rollout_stores_gae_of_the_kl_rewards(tmp_path: Path) -> None:
    """The rollout batch holds the sampling-time values, the returns of GAE over the KL-shaped
    per-token rewards and the whitened advantages, as the loss functions compute them."""
    from tscale.core import rng as R
    from tscale.losses.rl import gae, kl_rewards, whiten

    run = built(tmp_path, "task.beta=0.1", "task.lam=0.9")
    batch = run.prepare_batch(next(run.batches))
    out = run.rollout(run.state, batch, R.fold_in(run.state.rng, 0))
    mask = out["completion_mask"]
    assert out["advantages"].shape == mask.shape == out["returns"].shape
    # the reference is the starting policy: the KL is 0 and the rewards are the scores alone
    scores = out["rewards"].float()
    rewards = kl_rewards(scores, out["old_logps"], out["ref_logps"], mask, beta=0.1)
    adv, ret = gae(rewards, out["old_values"], mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(out["returns"], ret)
    torch.testing.assert_close(out["advantages"], (whiten(adv.double(), mask) * mask).float())
    m = mask.float()
    assert float((out["advantages"] * m).sum() / m.sum()) == pytest.approx(0.0, abs=1e-5)


def test_value_function_learns_a_fixed_reward(tmp_path: Path) -> None:
    """Every completion scores 1 (a pattern every string matches), β 0, γ = λ = 1: the return of
    every token is 1, and the value head, starting near 0, must get there."""
    rows = run_ppo(
        tmp_path,
        "fixed",
        "task.beta=0",
        "task.lam=1.0",
        "task.vf_coef=1.0",
        "task.cliprange_value=10.0",
        "task.rewards.functions=[{fn: format_match, kwargs: {pattern: '', mode: search}}]",
        steps=12,
    )
    assert all(r["reward"] == 1.0 and r["returns/mean"] == pytest.approx(1.0) for r in rows)
    errors = [r["value/error"] for r in rows]
    assert errors[0] > 0.5
    assert max(errors[-3:]) < 0.25 * errors[0], errors


def test_export_has_no_value_head_and_transformers_loads_it(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tscale.train.export import export

    run_ppo(tmp_path, "run", steps=2)
    ckpt = load_file(str(tmp_path / "run/checkpoints/step_00000002/params.safetensors"))
    out = export(tmp_path / "run", tmp_path / "hf")
    written = load_file(str(out / "model.safetensors"))
    assert "value_head.weight" in ckpt and not any(k.startswith("value") for k in written)
    for k, v in written.items():
        assert torch.equal(v, ckpt[k]), k
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids).logits.shape == (1, 3, model.config.vocab_size)


def test_lora_trains_adapters_and_the_shared_head(tmp_path: Path) -> None:
    """With LoRA the params are the adapters plus the value head; the reference is the LoRA
    base (no copy); the adapter folder and the merged export hold no value head."""
    from tscale.train.export import export

    run = built(tmp_path, "lora.enabled=true", "task.beta=0.1")
    assert set(run.state.frozen) == {"base"}
    assert "value_head" in set(run.state.params.keys())
    rows = run_ppo(tmp_path, "lora", "lora.enabled=true", "task.beta=0.1", steps=2)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["logprob_mismatch"] <= 1e-5 and rows[-1]["grad_norm"] > 0
    adapter = load_file(str(tmp_path / "lora/adapter/adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    merged = load_file(str(export(tmp_path / "lora", tmp_path / "hf") / "model.safetensors"))
    assert not any(k.startswith("value") for k in merged)


def test_value_init_path_initialises_the_critic(tmp_path: Path) -> None:
    from tscale.checkpoint.reward import save_reward_pretrained
    from tscale.core import tree as T

    run = built(tmp_path, "task.value_model=separate")
    critic = T.flatten(run.state.params["critic"])
    reward = T.unflatten({k: (v * 1.5 if v.is_floating_point() else v) for k, v in critic.items()})
    from tscale.core import rng as R
    from tscale.train import builders

    model, _ = builders.build_model(run.cfg, run.data.encoder.vocab_size, R.key(0))
    config = model.config  # the critic's decoder is the policy's
    folder = save_reward_pretrained(config, reward, tmp_path / "rm", pad_id=0)
    again = built(tmp_path, "task.value_model=separate", f"task.value_init_path={folder}")
    loaded = T.flatten(again.state.params["critic"])
    assert set(loaded) == set(critic)
    for k, v in T.flatten(reward).items():
        assert torch.equal(loaded[k], v), k
    rows = run_ppo(
        tmp_path, "init", "task.value_model=separate", f"task.value_init_path={folder}", steps=2
    )
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.enabled=true", "lora.enabled"),
        ("task.loss_type=grpo", "task.loss_type"),
        ("task.mask_zero_std_groups=true", "task.mask_zero_std_groups"),
        ("task.share_prompt=true", "task.share_prompt"),
        ("parallel.overlap_reduce=true", "parallel.overlap_reduce"),
        ("task.value_init_path=/nonexistent", "task.value_init_path"),
    ],
)
def test_unbuilt_options_are_refused_in_one_line(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        built(tmp_path, override, "task.value_model=separate")
    assert "\n" not in str(err.value)


def test_value_init_path_needs_a_separate_critic(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.value_init_path: .*value_model: separate"):
        built(tmp_path, f"task.value_init_path={tmp_path}")


def test_quickstart_config_trains_from_an_exported_base(tmp_path: Path) -> None:
    from rich.console import Console

    from tscale.train import train
    from tscale.train.export import export

    root = tmp_path / "base"
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", [*TINY_QUICKSTART, f"run.output_dir={root}"]
    )
    train(cfg, console=Console(quiet=True))
    base = export(root, root / "export")
    out = tmp_path / "ppo"
    args = [
        "train",
        str(ROOT / "configs" / "ppo_quickstart.yaml"),
        f"model.path={base}",
        f"run.output_dir={out}",
        "data.synthetic.num_train=64",
        "data.synthetic.num_eval=8",
        "data.batch_size=4",
        "task.max_completion_length=8",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
        "run.threads=1",
        "eval.num_samples=4",
        "eval.max_new_tokens=8",
    ]
    assert main(args) == 0
    rows = step_rows(out)
    assert len(rows) == 2 and rows[0]["logprob_mismatch"] <= 1e-5
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
