"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

Chen et al., "Symbolic Discovery of Optimization Algorithms" (NeurIPS 2023), Algorithm 2::

    c_t     = b1 * m_{t-1} + (1 - b1) * g_t
    theta_t = theta_{t-1} - lr_t * (sign(c_t) + wd * theta_{t-1})
    m_t     = b2 * m_{t-1} + (1 - b2) * g_t

Every element moves by exactly ``lr`` (plus decay), so Lion wants a learning rate 3-10x smaller and
a weight decay 3-10x larger than AdamW (the paper's advice).
"""

from __future__ import annotations

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
    _open_update,
    _zeros_like_moments,
    decoupled,
    default_decay_mask,
)

__all__ = ["LionConfig", "lion", "scale_by_lion"]


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Replace the updates by ``sign(b1 * m + (1 - b1) * g)`` and move the momentum ``m`` to
    ``b2 * m + (1 - b2) * g`` (Chen et al., 2023, Algorithm 2, without the learning rate).

    The state is ``{"mu": tree}``: float32 for bfloat16/float16 params, the param dtype for
    float32/float64. Returned updates keep the dtype of the incoming updates.

    Raises:
        ValueError: ``b1``/``b2`` outside [0, 1); at ``init``, a non-floating-point params leaf.
    """
    b1 = _check_beta("b1", b1)
    b2 = _check_beta("b2", b2)

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_lion", params)
        return TensorDict({"mu": _zeros_like_moments(params)}, batch_size=[])

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        mu = T.leaves(state["mu"])
        us, gs, _ = _open_update(updates, mu, "scale_by_lion")
        if not us:
            return updates, state
        # c needs the old momentum and the momentum update needs g: one temporary list.
        c = torch._foreach_lerp(mu, gs, 1.0 - b1)
        torch._foreach_lerp_(mu, gs, 1.0 - b2)
        torch._foreach_sign_(c)
        torch._foreach_copy_(us, c)
        return updates, state

    return GradientTransformation(init, update)


def lion(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    mask: MaskFn | None = default_decay_mask,
) -> GradientTransformation:
    """Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

    ``chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate)``:
    ``theta -= lr * (sign(b1 * m + (1 - b1) * g) + weight_decay * theta)``, decoupled decay as in
    the paper. One moment per parameter (half of Adam's state).

    Args:
        learning_rate: a float or a schedule ``step -> lr`` (see :mod:`tscale.optim.schedules`).
        b1: interpolation between momentum and gradient inside the sign.
        b2: decay rate of the momentum.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        mask: which leaves decay: :func:`~tscale.optim.transforms.default_decay_mask` (not
            norms, biases, embeddings), ``None`` for all, or ``(name, tensor) -> bool``.

    Raises:
        ValueError: any invalid hyper-parameter (the message names it).
    """
    return decoupled(scale_by_lion(b1=b1, b2=b2), learning_rate, weight_decay, mask)


@record
class LionConfig(OptimizerRecord):
    """The sign of an interpolated momentum (Chen et al. 2023); use a
    learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's."""

    factory = staticmethod(lion)
    type: Literal["lion"] = field("lion", "Lion (tscale.optim.lion).")
    betas: tuple[float, float] = field(
        (0.9, 0.99), "[b1, b2]: interpolation inside the sign, momentum decay.", ge=0, lt=1
    )

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        b1, b2 = self.betas
        return lion(learning_rate, b1=b1, b2=b2, weight_decay=self.weight_decay, mask=mask)
