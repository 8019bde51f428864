"""``torch.compile`` of a whole train step: forward, backward and optimizer update in one graph."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase

from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.step.compose import StepFn


class _TracedState(NamedTuple):
    """What a step sees of its state inside the compiled function: ``TrainState``'s fields and
    methods on a NamedTuple, which Dynamo traces (it cannot build the frozen attrs record)."""

    params: TensorDictBase
    opt_state: TensorDictBase
    step: torch.Tensor
    rng: torch.Tensor
    frozen: Any = None

    def replace(self, **changes: Any) -> _TracedState:
        return self._replace(**changes)

    def clone(self) -> _TracedState:
        return _TracedState(
            T.clone(self.params),
            T.clone(self.opt_state),
            self.step.clone(),
            self.rng.clone(),
            self.frozen,
        )


def compile_step(
    step: StepFn,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
) -> StepFn:
    """``step`` compiled with ``torch.compile``; same contract, same results up to rounding.

    The compiled function takes the state's fields and the batch and returns the new fields and
    the metrics; the record is rebuilt outside. Gradients inside go through ``torch.func``
    (:func:`tscale.core.grad.value_and_grad` switches engines while Dynamo traces), so the
    backward and the optimizer's update are traced into the same graph as the forward.

    Compilation happens on the first call and again when a guard fails — e.g. once when a
    batch of a new sequence length arrives, after which Dynamo marks that dim dynamic.

    Args:
        step: ``step(state, batch) -> (state, metrics)``.
        backend: ``torch.compile`` backend: ``"inductor"`` (generated kernels; on CPU it needs
            a C++ compiler), ``"aot_eager"`` (the traced forward/backward graphs run by eager
            kernels: quick to compile, for checking) or ``"eager"``.
        mode, fullgraph, dynamic: passed to ``torch.compile``.
    """

    def fields(params, opt_state, step_t, rng, frozen, batch):
        new, metrics = step(_TracedState(params, opt_state, step_t, rng, frozen), batch)
        return new.params, new.opt_state, new.step, new.rng, metrics

    compiled = torch.compile(
        fields, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic
    )

    def wrapped(state: TrainState, batch: Any):
        params, opt_state, step_t, rng, metrics = compiled(
            state.params, state.opt_state, state.step, state.rng, state.frozen, batch
        )
        if state.params.is_locked and not params.is_locked:
            params.lock_()
        new = state.replace(params=params, opt_state=opt_state, step=step_t, rng=rng)
        return new, metrics

    return wrapped
