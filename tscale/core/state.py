"""The train-state record and its ownership contract (DESIGN.md §2).

``TrainState`` is frozen: new states come from :meth:`TrainState.replace`. A step *consumes* the
state it is given — it may update the tensors of ``params`` and ``opt_state`` in place and return a
record that aliases them — so a caller never touches a state after passing it to a step. With
``donate=False`` the step clones the state first and leaves its argument intact; both modes give
bit-identical results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T


@attrs.frozen(kw_only=True, eq=False)
class TrainState:
    """Everything a step reads and writes.

    Attributes:
        params: the model parameters, a locked nested TensorDict named like the HF checkpoint.
        opt_state: the optimizer state, a TensorDict tree (see ``tscale.optim``).
        step: number of optimizer steps taken, a 0-d int64 tensor (no host sync to advance it).
        rng: a key from :mod:`tscale.core.rng`, advanced by the step when it needs randomness.
        frozen: named trees that take part in the forward but are never trained (the LoRA base,
            a reference model, a reward model …): no gradient, no optimizer state, never written
            by a step. A step passes them to the loss as ``frozen=``.
    """

    params: TensorDictBase
    opt_state: TensorDictBase
    step: torch.Tensor
    rng: torch.Tensor
    frozen: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def create(
        cls,
        params: TensorDictBase,
        opt_state: TensorDictBase,
        rng: torch.Tensor,
        frozen: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """A step-0 state; locks ``params`` so that no step can add or drop a leaf."""
        if not params.is_locked:
            params.lock_()
        step = torch.zeros((), dtype=torch.int64, device=T.leaves(params)[0].device)
        return cls(
            params=params, opt_state=opt_state, step=step, rng=rng, frozen=dict(frozen or {})
        )

    def replace(self, **changes: Any) -> TrainState:
        """A new record with some fields replaced (the old one is not modified)."""
        return attrs.evolve(self, **changes)

    def clone(self) -> TrainState:
        """A copy whose params, optimizer state, step and rng alias nothing of ``self``; the
        frozen trees are shared (no step writes them)."""
        return TrainState(
            params=T.clone(self.params),
            opt_state=T.clone(self.opt_state),
            step=self.step.clone(),
            rng=self.rng.clone(),
            frozen=self.frozen,
        )

    def to_tensordict(self) -> TensorDict:
        """The state as one tree ``{params, opt_state, step, rng}`` (for checkpoints)."""
        return TensorDict(
            {
                "params": self.params,
                "opt_state": self.opt_state,
                "step": self.step,
                "rng": self.rng,
            },
            batch_size=[],
        )
