"""The impure side: builders from config, the training loop, callbacks."""

from tscale.train.callbacks import Callback, JsonlLogger, ProgressBar
from tscale.train.trainer import TrainResult, evaluate, train

__all__ = ["Callback", "JsonlLogger", "ProgressBar", "TrainResult", "evaluate", "train"]
