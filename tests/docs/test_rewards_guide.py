"""docs/rewards.md: its YAML loads and builds, and its example function scores quickstart
records as the guide says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tscale.config.load import load_config
from tscale.data.synthetic import generate
from tscale.rewards import RewardsConfig, build_reward_set

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_guide_yaml_builds_and_scores_quickstart_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(DOCS / "examples"))  # as PYTHONPATH=docs/examples would
    text = (DOCS / "rewards.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    cfg = load_config(yaml.safe_load(block.group(1))["rewards"], cls=RewardsConfig)
    rs = build_reward_set(cfg)
    assert rs.names == ("exact_match", "format_match", "positional_credit")
    records = generate(["reverse", "sort", "add"], 9, seed=0, min_items=2, max_items=4)
    answers = [r["completion"] for r in records]
    columns = {"completion": answers, "task": [r["task"] for r in records]}
    scores = rs.score([r["prompt"] for r in records], answers, [[0]] * 9, columns)
    # right answers: 1 + 0.1 (format) + 0.5 (full credit) on reverse/sort; add has no credit
    want = [1.1 if r["task"] == "add" else 1.6 for r in records]
    assert scores.total.tolist() == pytest.approx(want)
