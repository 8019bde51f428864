"""Kernels for the loss and attention: Triton on CUDA, PyTorch references everywhere else.

Each kernel sits beside its PyTorch reference and its ``torch.autograd.Function`` and dispatches
by device (``backend="auto"``): the Triton kernel for CUDA tensors when ``triton`` is installed,
the PyTorch path otherwise. ``backend="triton"`` forces the kernel (on CPU only under
``TRITON_INTERPRET=1``, for tests); ``backend="torch"`` forces PyTorch. Importing this package never
imports Triton. See ``docs/kernels.md``.
"""

from tscale.kernels._dispatch import KernelError, interpret_enabled, triton_available
from tscale.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from tscale.kernels.flash_attention import (
    attention,
    attention_reference,
    branch_bounds,
    doc_ids_from_cu_seqlens,
    document_bounds,
)
from tscale.kernels.rmsnorm import rms_norm, rms_norm_reference

__all__ = [
    "KernelError",
    "attention",
    "attention_reference",
    "branch_bounds",
    "doc_ids_from_cu_seqlens",
    "document_bounds",
    "interpret_enabled",
    "linear_cross_entropy",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "triton_available",
]
