"""Reductions and math for the kernels that work whichever mode Triton itself was imported in.

Triton's own library functions (``tl.sum``, ``tl.max``, ``tl.sigmoid`` …) are ``@triton.jit``
functions, decorated once when ``triton`` is imported, in the mode ``TRITON_INTERPRET`` selected
then: imported for compiled kernels they cannot be interpreted, and the other way round. The
kernels therefore call only Triton builtins and the helpers here, which are executed per mode like
the kernels (:func:`tscale.kernels._dispatch.triton_module`). In interpreter mode the reductions
pass Triton's own combine functions to ``tl.reduce`` — the interpreter recognises them by identity
and reduces with NumPy without calling them; compiled, they use combine functions defined here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tscale.kernels._dispatch import interpret_enabled


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


if interpret_enabled():
    _ADD = getattr(tl.standard, "_sum_combine", _add)
    _MAX = getattr(tl.standard, "_elementwise_max", _maximum)
    _MIN = getattr(tl.standard, "_elementwise_min", _minimum)
else:
    _ADD, _MAX, _MIN = _add, _maximum, _minimum


@triton.jit
def sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _ADD)


@triton.jit
def max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX)


@triton.jit
def min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN)


@triton.jit
def tanh(x):
    # Through exp: saturates to exactly +-1 at both ends (exp overflows to inf, 2/inf = 0).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
