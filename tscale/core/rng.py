"""Counter-based random keys, JAX style: a key is a 2-element int64 tensor; split it, never reuse.

Keys are derived with the splitmix64 mixer (Steele et al., "Fast splittable pseudorandom number
generators", OOPSLA 2014) in pure tensor arithmetic, so splitting and folding in happen on device
without a host sync. Sampling goes through a ``torch.Generator`` seeded from the key, which reads
the key on the host: use it at init and evaluation time, not inside a compiled step.
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def key(seed: int) -> torch.Tensor:
    """A fresh key from an integer seed."""
    s = torch.tensor([seed & ((1 << 63) - 1), 0], dtype=torch.int64)
    return _mix(s)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``k`` and an integer (a step counter, a rank, a layer index)."""
    d = torch.as_tensor(data, dtype=torch.int64, device=k.device)
    return _mix(torch.stack([k[0] ^ _mix(d), k[1] + 1]))


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys derived from ``k``, stacked as a ``[num, 2]`` tensor."""
    idx = torch.arange(num, dtype=torch.int64, device=k.device)
    lo = _mix(k[0] ^ _mix(idx))
    hi = _mix(k[1] + idx + 1)
    return torch.stack([lo, hi], dim=1)


def seed_of(k: torch.Tensor) -> int:
    """A non-negative Python int seed from a key (host sync)."""
    v = _mix(k[0] ^ k[1])
    return int(v.item()) & ((1 << 63) - 1)


def generator(k: torch.Tensor, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from ``k`` (host sync: use outside the step)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(k))
    return g


def fold_in_rows(keys: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """:func:`fold_in` of many keys at once: ``keys`` [..., 2], ``data`` broadcastable to
    ``keys[..., 0]``; row i of the result equals ``fold_in(keys[i], data[i])`` (on device)."""
    d = torch.as_tensor(data, dtype=torch.int64, device=keys.device)
    return _mix(torch.stack(torch.broadcast_tensors(keys[..., 0] ^ _mix(d), keys[..., 1] + 1), -1))


def uniform_rows(keys: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` float64 uniforms in the open interval (0, 1) per key: ``keys`` [..., 2] ->
    [..., num]. Column j derives from ``split(key, num)[j, 0]`` (52 of its bits), so neither 0
    nor 1 ever comes out (a Gumbel or exponential transform stays finite)."""
    idx = torch.arange(num, dtype=torch.int64, device=keys.device)
    bits = _mix(keys[..., 0, None] ^ _mix(idx))
    return (_shr(bits, 12).to(torch.float64) + 0.5) * 2.0**-52
