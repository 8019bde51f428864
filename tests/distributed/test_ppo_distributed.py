"""PPO under torchrun (2 gloo ranks) follows the one-process run: each rank samples its prompts
with their global keys, values and GAE are per row, the advantages are whitened over the
gathered batch, and the value head's gradient is all-reduced with the rest, so every step's
rewards, returns, losses and value error match (shared head and separate critic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscale.testing.runs import TINY_GRPO_YAML, step_rows


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_ppo_under_ddp_follows_one_process(
    tmp_path: Path, torchrun, tscale_cli, value_model: str
) -> None:
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(TINY_GRPO_YAML.replace("type: grpo", "type: ppo"))
    common = [
        "train.max_steps=3",
        "train.eval_every=0",
        "train.save_every=0",
        f"task.value_model={value_model}",
    ]
    tscale_cli(["train", str(cfg), f"run.output_dir={tmp_path / 'one'}", *common])
    torchrun(["-m", "tscale.cli", "train", str(cfg), f"run.output_dir={tmp_path / 'two'}", *common])
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("reward", "tokens"):
            assert b[key] == a[key], key
        for key in ("loss", "value/loss", "value/error", "returns/mean", "advantages/std", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7)
