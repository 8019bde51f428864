"""Every YAML example in docs/data.md loads through the real config loader (no stale keys)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tscale.config import load_config

DATA_MD = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_every_yaml_example_in_the_data_guide_loads():
    blocks = re.findall(r"```yaml\n(.*?)```", DATA_MD.read_text(), flags=re.S)
    assert len(blocks) >= 6
    for block in blocks:
        cfg = load_config(yaml.safe_load(block))
        assert cfg.data is not None
