"""The functional core: train state, tree helpers, the gradient entry point, random keys."""

from tscale.core import rng, tree
from tscale.core.grad import value_and_grad
from tscale.core.result import Err, Ok, Result
from tscale.core.state import TrainState

__all__ = ["Err", "Ok", "Result", "TrainState", "rng", "tree", "value_and_grad"]
