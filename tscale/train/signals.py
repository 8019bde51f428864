"""SIGTERM and SIGINT during training: finish the step, save, stop (see docs/design.md, §Signals).

:class:`StopSignals` installs handlers for the duration of the training loop and restores the
previous ones after. A first signal only records a request; the loop notices it between steps
(under torchrun all ranks agree on the step, :class:`tscale.train.distributed.StopVote`), saves a
checkpoint and returns. A second Ctrl-C aborts at once (``KeyboardInterrupt``), unless it comes
within ``repeat_window_s`` of the first: one Ctrl-C in a terminal reaches a torchrun worker twice,
from the terminal's process group and forwarded by the agent.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context that turns SIGTERM/SIGINT into a stop request (``requested`` names the signal).

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, *, repeat_window_s: float = 1.0) -> None:
        self.requested: str | None = None
        self.received_at: float | None = None
        self.repeat_window_s = repeat_window_s
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            self.received_at = now
            return
        late = self.received_at is not None and now - self.received_at >= self.repeat_window_s
        if signum == signal.SIGINT and late:  # a second Ctrl-C: abort without saving
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
