"""scale_by_adam's two kernels for the update direction agree: the per-leaf one (CPU) and the
fused multi-tensor one (other devices, exercised here on CPU)."""

from __future__ import annotations

import pytest
import torch

from tscale.optim.transforms import _adam_direction_foreach, _adam_direction_per_leaf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direction_kernels_agree(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (), (2, 3, 2)]
    mu = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    nu = [torch.rand(s, generator=g, dtype=dtype) for s in shapes]
    nu[1].zero_()  # sqrt(0) + eps: the epsilon path
    t = torch.tensor(3.0, dtype=dtype)
    bc1, bc2_sqrt = 1 - 0.9**t, torch.sqrt(1 - 0.999**t)
    a = [torch.empty_like(m) for m in mu]
    b = [torch.empty_like(m) for m in mu]
    _adam_direction_per_leaf(a, mu, nu, bc1, bc2_sqrt, 1e-8)
    _adam_direction_foreach(b, mu, nu, bc1, bc2_sqrt, 1e-8)
    for x, y, m, n in zip(a, b, mu, nu, strict=True):
        expected = (m / bc1) / (n.sqrt() / bc2_sqrt + 1e-8)
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(x, expected, rtol=rtol, atol=0)
        torch.testing.assert_close(y, expected, rtol=rtol, atol=0)
