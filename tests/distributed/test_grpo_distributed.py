"""GRPO under torchrun (2 gloo ranks) follows the one-process run: each rank samples its
prompts with their global keys, the rewards are gathered for the advantages and the rollout
statistics, so every step's rewards, lengths, token count and loss match."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscale.testing.runs import TINY_GRPO_YAML, step_rows

TIMING = "time/"


def test_grpo_under_ddp_follows_one_process(tmp_path: Path, torchrun, tscale_main) -> None:
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(TINY_GRPO_YAML)
    common = ["train.max_steps=3", "train.eval_every=0", "train.save_every=0", "log.plot=false"]
    tscale_main(["train", str(cfg), f"run.output_dir={tmp_path / 'one'}", *common])
    torchrun(["-m", "tscale.cli", "train", str(cfg), f"run.output_dir={tmp_path / 'two'}", *common])
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "tokens"):
            assert b[key] == a[key], key
        assert b["completions/mean_length"] == a["completions/mean_length"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7)
