"""Step builders: pure ``step(state, batch) -> (state, metrics)`` functions."""

from tscale.step.compile import compile_step
from tscale.step.compose import (
    accumulate_gradients,
    make_eval_step,
    make_train_step,
    split_microbatches,
)

__all__ = [
    "accumulate_gradients",
    "compile_step",
    "make_eval_step",
    "make_train_step",
    "split_microbatches",
]
