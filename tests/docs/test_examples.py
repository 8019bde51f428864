"""The code in docs/ runs and does what the guides say."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.core import rng
from tscale.testing import assert_trees_equal

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_custom_step_example_trains():
    losses = _load("custom_step").main(steps=40)
    assert losses[-1] < 0.5 * losses[0]


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 10_000))
def test_custom_step_is_deterministic_and_keeps_structure(seed):
    """The property test the guide recommends for your own step."""
    ex = _load("custom_step")
    model = ex.Transformer(
        ex.TransformerConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            max_position_embeddings=32,
        )
    )
    tx = ex.adamw(1e-2)

    def fresh():
        p = model.init(rng.key(seed))
        return ex.TrainState.create(p, tx.init(p), rng.key(seed + 1))

    batch = ex.copy_task_batch(rng.key(seed))
    step = ex.make_z_loss_step(model, tx)
    a, ma = step(fresh(), batch)
    b, mb = step(fresh(), batch)
    assert_trees_equal(a, b)
    assert torch.equal(ma["loss"], mb["loss"])
    assert list(a.params.keys(True, True)) == list(fresh().params.keys(True, True))


def test_guide_quotes_the_tested_file():
    """Every code block of custom_step.md marked with the file name is a verbatim excerpt."""
    guide = (DOCS / "custom_step.md").read_text()
    source = (DOCS / "examples" / "custom_step.py").read_text()
    blocks = re.findall(r"```python\n# from docs/examples/custom_step.py\n(.*?)```", guide, re.S)
    assert blocks, "the guide quotes no code from the example file"
    for block in blocks:
        assert block in source, f"the guide's code block is not in the example file:\n{block}"
