"""8-bit AdamW: Adam's two moments stored block-wise in 8 bits, through bitsandbytes.

Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization" (ICLR
2022). Each moment of a leaf with at least ``min_8bit_size`` elements is kept as ``uint8`` codes
into a 256-entry dynamic quantisation map (signed for the first moment, unsigned for the second)
plus one float32 ``absmax`` per block of ``block_size`` elements: 2 bytes per parameter and
``8 / block_size`` more, against 8 for float32 Adam. Smaller leaves (norms, biases) keep float32
moments, as bitsandbytes does.

The quantisation is bitsandbytes' own (``bitsandbytes.functional.quantize_blockwise`` /
``dequantize_blockwise`` / ``create_dynamic_map``), so the state is laid out as
``bitsandbytes.optim.AdamW8bit`` lays it out and decodes with its functions. The update is
written here rather than calling bitsandbytes' fused ``optimizer_update_8bit_blockwise``: that
kernel takes the step count and the learning rate as Python numbers, which would need a host sync
per step to read the on-device count and schedule, and it writes the params in place, which
the transform contract forbids (``update`` returns updates; :func:`~tscale.optim.apply_updates`
adds them). Per leaf: dequantise both moments to float32, update them as bitsandbytes' CPU kernel
does (same operations, same order, so the moments match it bit for bit given the same
gradients), quantise them back, and turn the float32 moments into the update.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.core.fields import field
from tscale.optim.base import GradientTransformation
from tscale.optim.record import OptimizerRecord, record
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    _check_beta,
    _check_float_params,
    _check_real,
    _check_structure,
    _count_device,
    _new_count,
    decoupled,
    default_decay_mask,
)

__all__ = ["BLOCK_SIZES", "AdamW8bitConfig", "adamw_8bit", "scale_by_adam_8bit"]

BLOCK_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
"""The block sizes bitsandbytes' block-wise quantisation accepts."""


def _bitsandbytes() -> ModuleType:
    """``bitsandbytes.functional``, or an ImportError that says how to install it."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise ImportError(
            f"8-bit optimizer states need bitsandbytes ({err}); install it with "
            "`pip install 'tscale[bnb]'` or use optimizer.type=adamw"
        ) from err
    return bnb_functional


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> GradientTransformation:
    """Adam's bias-corrected ``m̂ / (sqrt(v̂) + eps)`` with the moments stored in 8 bits.

    State: ``{"count": 0-d int64, "qmap1", "qmap2": (256,) float32 quantisation maps,
    "state1", "state2": trees shaped like the params (uint8 codes for leaves with at least
    ``min_8bit_size`` elements, float32 moments for the others), "absmax1", "absmax2": trees of
    the quantised leaves only, float32 of shape (ceil(numel / block_size),)}``. The maps are
    stored once, not per leaf as bitsandbytes does (they are the same 256 numbers).

    Returned updates keep the dtype of the incoming updates; all arithmetic is float32. Bias
    corrections are 0-d tensors from ``count``: no host sync.

    Args:
        b1, b2, eps: Adam's moment decay rates and denominator epsilon.
        block_size: elements per quantisation block (one of :data:`BLOCK_SIZES`; bitsandbytes'
            optimizers use 256).
        min_8bit_size: leaves with fewer elements keep float32 moments (bitsandbytes: 4096).

    Raises:
        ValueError: an invalid hyper-parameter (named); at ``init``, a params leaf that is not
            floating point.
        ImportError: bitsandbytes is not installed.
    """
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)
    eps = _check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}"
        )
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
        raise ValueError(f"min_8bit_size must be an int >= 1, got {min_8bit_size!r}")
    F = _bitsandbytes()

    def quantised(p: torch.Tensor) -> bool:
        return p.numel() >= min_8bit_size

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_adam_8bit", params)
        names, ps = T.leaf_keys(params), T.leaves(params)
        device = _count_device(params)

        def moment(p: torch.Tensor) -> torch.Tensor:
            dtype = torch.uint8 if quantised(p) else torch.float32
            return torch.zeros(p.shape, dtype=dtype, device=p.device)

        def absmax() -> TensorDict:
            blocks = {
                n: torch.zeros(-(p.numel() // -block_size), dtype=torch.float32, device=p.device)
                for n, p in zip(names, ps, strict=True)
                if quantised(p)
            }
            return T.unflatten(blocks)

        return TensorDict(
            {
                "count": _new_count(params),
                "qmap1": F.create_dynamic_map(signed=True).to(device),
                "qmap2": F.create_dynamic_map(signed=False).to(device),
                "state1": params.apply(moment),
                "state2": params.apply(moment),
                "absmax1": absmax(),
                "absmax2": absmax(),
            },
            batch_size=[],
        )

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        us = T.leaves(updates)
        s1, s2 = T.leaves(state["state1"]), T.leaves(state["state2"])
        _check_structure(updates, us, len(s1), "scale_by_adam_8bit")
        a1, a2 = T.leaves(state["absmax1"]), T.leaves(state["absmax2"])
        qmap1, qmap2 = state["qmap1"], state["qmap2"]
        count = state["count"]
        count.add_(1)
        if not us:
            return updates, state
        t = count.to(torch.float32)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t))

        small = [i for i, s in enumerate(s1) if s.dtype != torch.uint8]
        if small:
            _update_float32(
                [us[i] for i in small],
                [s1[i] for i in small],
                [s2[i] for i in small],
                bc1,
                bc2_sqrt,
            )
        q = 0  # index into the absmax lists, which hold the quantised leaves only
        for u, m8, v8 in zip(us, s1, s2, strict=True):
            if m8.dtype != torch.uint8:
                continue
            m = F.dequantize_blockwise(m8, absmax=a1[q], code=qmap1, blocksize=block_size)
            v = F.dequantize_blockwise(v8, absmax=a2[q], code=qmap2, blocksize=block_size)
            g = u if u.dtype == torch.float32 else u.float()
            # bitsandbytes' CPU kernel: the same float32 operations in the same order
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            F.quantize_blockwise(m, code=qmap1, absmax=a1[q], out=m8, blocksize=block_size)
            F.quantize_blockwise(v, code=qmap2, absmax=a2[q], out=v8, blocksize=block_size)
            # the update from the float32 moments, reusing their buffers
            denom = v.sqrt_().div_(bc2_sqrt).add_(eps)
            u.copy_(m.div_(bc1).div_(denom))
            q += 1
        if q != len(a1):
            raise ValueError(
                f"scale_by_adam_8bit: {q} quantised leaves but {len(a1)} absmax entries "
                "(was the state built for other params?)"
            )
        return updates, state

    def _update_float32(
        us: list[torch.Tensor],
        mu: list[torch.Tensor],
        nu: list[torch.Tensor],
        bc1: torch.Tensor,
        bc2_sqrt: torch.Tensor,
    ) -> None:
        gs = [u if u.dtype == torch.float32 else u.float() for u in us]
        torch._foreach_mul_(mu, b1)
        torch._foreach_add_(mu, gs, alpha=1.0 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, gs, gs, value=1.0 - b2)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, bc1)
        out = torch._foreach_div(mu, denom)
        torch._foreach_copy_(us, out)

    return GradientTransformation(init, update)


def adamw_8bit(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskFn | None = default_decay_mask,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> GradientTransformation:
    """AdamW with 8-bit block-wise moments (:func:`scale_by_adam_8bit`): about 2 bytes of state
    per parameter instead of 8, with updates as ``bitsandbytes.optim.AdamW8bit`` makes them.

    ``chain(scale_by_adam_8bit, add_decayed_weights, scale_by_learning_rate)``, the structure
    of :func:`~tscale.optim.adamw`.

    Args:
        learning_rate: a float or a schedule ``step -> lr``.
        b1, b2, eps: Adam's moment decay rates and denominator epsilon.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        mask: which leaves decay (see :func:`~tscale.optim.adamw`).
        block_size: elements per quantisation block (:data:`BLOCK_SIZES`).
        min_8bit_size: leaves with fewer elements keep float32 moments.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
        ImportError: bitsandbytes is not installed (``pip install 'tscale[bnb]'``).
    """
    return decoupled(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size),
        learning_rate,
        weight_decay,
        mask,
    )


@record
class AdamW8bitConfig(OptimizerRecord):
    """AdamW with both moments stored block-wise in 8 bits
    through bitsandbytes (Dettmers et al. 2022); needs ``pip install 'tscale[bnb]'``."""

    factory = staticmethod(adamw_8bit)
    type: Literal["adamw_8bit"] = field("adamw_8bit", "8-bit AdamW (tscale.optim.adam8bit).")
    betas: tuple[float, float] = field((0.9, 0.999), "Moment decay rates [b1, b2].", ge=0, lt=1)
    eps: float = field(1e-8, "Denominator epsilon.", ge=0)
    block_size: Literal[64, 128, 256, 512, 1024, 2048, 4096] = field(
        256, "Elements per quantisation block (bitsandbytes uses 256)."
    )
    min_8bit_size: int = field(
        4096, "Params with fewer elements keep float32 moments, as bitsandbytes does.", ge=1
    )

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return adamw_8bit(
            learning_rate,
            b1=b1,
            b2=b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            mask=mask,
            block_size=self.block_size,
            min_8bit_size=self.min_8bit_size,
        )
