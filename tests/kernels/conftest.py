"""Kernel tests: the Triton kernels run on CPU under the interpreter (``TRITON_INTERPRET=1``).

How the switch works (checked against triton 3.9):

* ``triton.jit`` picks compiled or interpreted when the decorator runs. Triton's *own* ``@jit``
  library (``tl.sum``, ``tl.zeros`` …) is decorated when ``triton`` is first imported, and a
  process that first imported it with ``TRITON_INTERPRET=1`` cannot compile kernels afterwards
  (``triton.compile`` asserts on it).
* tscale's kernels call only Triton builtins and ``tscale/kernels/_triton_lang.py``, and the
  module holding each kernel's Triton half is executed lazily once per mode
  (``tscale.kernels._dispatch.triton_module``). The mode of a kernel is therefore whatever
  ``TRITON_INTERPRET`` says when it is first called, in a process whose ``triton`` was imported
  in compiled mode.

So this file imports ``triton`` now, with ``TRITON_INTERPRET`` unset, and an autouse fixture sets
``TRITON_INTERPRET=1`` per test with ``monkeypatch`` (restored after each test). Nothing leaks into
the other test directories that share the xdist worker, and the GPU tests and the ahead-of-time
compile tests, which unset the variable, get compiled kernels in the same process.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is not None:
    _outer = os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401 - imported in compiled mode, see the module docstring
    finally:
        if _outer is not None:
            os.environ["TRITON_INTERPRET"] = _outer


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel test runs with TRITON_INTERPRET=1 unless it unsets it itself."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
