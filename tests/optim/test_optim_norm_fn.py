"""``norm_fn``: the clip in front of every optimizer can take the norm of a sharded whole."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tscale.optim.alias import OPTIMIZER_TYPES
from tscale.optim.transforms import clip_by_global_norm


def test_clip_uses_the_given_norm():
    g = TensorDict({"w": torch.full((4,), 3.0)}, [])
    clip = clip_by_global_norm(1.0, norm_fn=lambda leaves: torch.tensor(12.0))
    out, _ = clip.update(g.clone(), clip.init(g))
    # the whole tree's norm is 12 (this shard's is 6): every shard scales by 1 / 12
    torch.testing.assert_close(out["w"], torch.full((4,), 3.0 / (12.0 + 1e-6)))


@pytest.mark.parametrize("name", sorted(OPTIMIZER_TYPES))
def test_every_optimizer_record_passes_norm_fn_to_its_clip(name: str):
    """The clip is the builder's, in front of every optimizer: one clip, one norm call."""
    if name == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    calls = []

    def norm(leaves):
        calls.append(len(leaves))
        return torch.tensor(1e6)

    rec = OPTIMIZER_TYPES[name](lr=1e-3)
    tx = rec.build(1e-3, norm_fn=norm)
    p = TensorDict({"w": torch.ones(4, 4)}, [])
    state = tx.init(p)
    extra = {"hessian": p.apply(torch.ones_like)} if rec.capabilities.needs_objective else {}
    tx.update(p.apply(torch.ones_like), state, p, **extra)
    assert calls == [1]
