"""``norm_fn``: the clip of every optimizer can take the norm of a sharded whole."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tscale.optim.alias import OPTIMIZERS
from tscale.optim.transforms import clip_by_global_norm


def test_clip_uses_the_given_norm():
    g = TensorDict({"w": torch.full((4,), 3.0)}, [])
    clip = clip_by_global_norm(1.0, norm_fn=lambda leaves: torch.tensor(12.0))
    out, _ = clip.update(g.clone(), clip.init(g))
    # the whole tree's norm is 12 (this shard's is 6): every shard scales by 1 / 12
    torch.testing.assert_close(out["w"], torch.full((4,), 3.0 / (12.0 + 1e-6)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_passes_norm_fn_to_its_clip(name: str):
    calls = []

    def norm(leaves):
        calls.append(len(leaves))
        return torch.tensor(1e6)

    tx = OPTIMIZERS[name](1e-3, max_grad_norm=1.0, norm_fn=norm)
    p = TensorDict({"w": torch.ones(4, 4)}, [])
    state = tx.init(p)
    if name == "sophia_g":
        from tscale.optim.sophia import with_hessian_estimate

        state = with_hessian_estimate(state, p.apply(torch.ones_like))
    tx.update(p.apply(torch.ones_like), state, p)
    assert calls == [1]
