"""Backend choice for the kernels: Triton on CUDA, PyTorch elsewhere, the interpreter on request.

Triton decides between compiling a ``@triton.jit`` function and interpreting it with NumPy when the
decorator runs (``triton.knobs.runtime.interpret``, read from ``TRITON_INTERPRET``). A kernel module
imported once would therefore be frozen in whichever mode was active at import. Instead, the Triton
half of every kernel lives in a private module that :func:`triton_module` executes lazily, once per
mode, and caches under that mode: compiled and interpreted kernels can coexist in one process (the
CPU interpreter tests and the GPU tests run in the same pytest worker), and importing
``tscale.kernels`` never imports Triton. The kernels avoid Triton's own ``@jit`` library, which
is frozen in the mode of ``triton``'s first import (see ``_triton_lang.py``).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

from tscale.errors import TscaleError

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_TRUE = {"1", "true", "on", "yes", "y"}
_MODULES: dict[tuple[str, bool], ModuleType] = {}


class KernelError(TscaleError):
    """A kernel was called with an unsupported option, or a forced backend cannot run here."""


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (read now, with Triton's notion of a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_module(name: str) -> ModuleType:
    """The private module ``tscale.kernels.<name>`` executed in the current Triton mode.

    Each mode (compiled, interpreted) gets its own module object, so its ``@triton.jit`` functions
    and the helpers they call are all of one kind.
    """
    interp = interpret_enabled()
    key = (name, interp)
    mod = _MODULES.get(key)
    if mod is None:
        full = f"tscale.kernels.{name}"
        spec = importlib.util.find_spec(full)
        if spec is None or spec.loader is None:  # pragma: no cover - packaging error
            raise KernelError(f"kernel module {full} is missing from the installation")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[key] = mod
    return mod


def use_triton(backend: str, kernel: str, *tensors: torch.Tensor, supported: str | None) -> bool:
    """Resolve ``backend`` for a call: True runs the Triton kernel, False the PyTorch path.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors when it is installed and the call is
            supported, else PyTorch), ``"triton"`` (forced: CUDA, or CPU tensors with
            ``TRITON_INTERPRET=1``) or ``"torch"``.
        kernel: the public function's name, for error messages.
        tensors: the inputs (device checks).
        supported: ``None`` when the Triton kernel supports this call, else why not.

    Raises:
        KernelError: ``backend`` is unknown, or ``"triton"`` was forced where it cannot run.
    """
    if backend not in BACKENDS:
        raise KernelError(f"{kernel}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and supported is None and triton_available()
    if supported is not None:
        raise KernelError(f"{kernel}: backend='triton' cannot run this call: {supported}")
    if not triton_available():
        raise KernelError(
            f"{kernel}: backend='triton' needs the triton package (pip install 'tscale[triton]')"
        )
    if not on_cuda and not interpret_enabled():
        raise KernelError(
            f"{kernel}: backend='triton' got CPU tensors; Triton runs on CUDA, or on CPU with "
            f"the interpreter (set TRITON_INTERPRET=1). Use backend='auto' to fall back to PyTorch."
        )
    return True


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()
