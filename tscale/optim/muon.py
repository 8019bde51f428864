"""Muon: orthogonalised momentum for hidden matrices, AdamW for everything else.

Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (blog post, 2024,
https://kellerjordan.github.io/posts/muon/; reference code ``KellerJordan/Muon``). For each 2-D
hidden weight, with momentum ``beta``::

    B  = beta B + (1 - beta) G                 (SGD momentum, as a lerp)
    M  = (1 - beta) G + beta B   (Nesterov)    or   M = B
    O  = NewtonSchulz5(M)                      (~ U V^T of M = U S V^T)
    W -= lr (sqrt(max(1, rows / cols)) O + wd W)

Embeddings, the output head, norms and biases go to AdamW (the blog's advice). The split is a
:func:`partition` of the params by a label function, which any pair of transforms can reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.core.fields import field
from tscale.optim.base import GradientTransformation, chain
from tscale.optim.record import Capabilities, OptimizerRecord, record
from tscale.optim.transforms import (
    MaskFn,
    Schedule,
    _check_beta,
    _check_float_params,
    _check_int,
    _open_update,
    _zeros_like_moments,
    add_decayed_weights,
    default_decay_mask,
    scale_by_adam,
    scale_by_learning_rate,
)

__all__ = [
    "NS_COEFFICIENTS",
    "MuonConfig",
    "default_muon_mask",
    "muon",
    "newton_schulz",
    "partition",
    "scale_by_muon",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""``(a, b, c)`` of the quintic ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` (Jordan, 2024)."""

LabelFn = Callable[[str, torch.Tensor], str]
"""``label_fn(name, tensor) -> label``: which transform of a :func:`partition` owns a leaf."""


# --------------------------------------------------------------------------------------------
# partition


def partition(
    transforms_by_label: Mapping[str, GradientTransformation], label_fn: LabelFn
) -> GradientTransformation:
    """Route each leaf to the transform of its label (optax's ``multi_transform``).

    ``label_fn(name, tensor)`` labels each leaf by dotted name (resolved once per params
    structure and cached). Each transform sees only its own sub-tree of updates, state and
    params, and its results are written back in place, so the output has the structure and
    order of the input. The state is ``{label: state}`` for every label (possibly over an empty
    sub-tree).

    Raises:
        ValueError: no transforms, a label that is not a non-empty string without ``.``, a value
            that is not a :class:`GradientTransformation`, ``label_fn`` not callable; at init or
            update, ``label_fn`` returns an unknown label (the message names the leaf).
    """
    if not isinstance(transforms_by_label, Mapping) or not transforms_by_label:
        raise ValueError("transforms_by_label must be a non-empty mapping {label: transform}")
    for label, tx in transforms_by_label.items():
        if not isinstance(label, str) or not label or "." in label:
            raise ValueError(
                f"partition labels must be non-empty strings without '.', got {label!r}"
            )
        if not isinstance(tx, GradientTransformation):
            raise ValueError(
                f"partition transform {label!r} must be a GradientTransformation, got "
                f"{type(tx).__name__} (did you pass the factory instead of calling it?)"
            )
    if not callable(label_fn):
        raise ValueError(f"label_fn must be callable (name, tensor) -> label, got {label_fn!r}")
    labels_all = list(transforms_by_label)
    cache: dict[tuple, dict[str, list[int]]] = {}

    def _groups(names: list[str], ts: list[torch.Tensor]) -> dict[str, list[int]]:
        key = tuple((n, tuple(t.shape)) for n, t in zip(names, ts, strict=True))
        if key not in cache:
            groups: dict[str, list[int]] = {label: [] for label in labels_all}
            for i, (n, t) in enumerate(zip(names, ts, strict=True)):
                label = label_fn(n, t)
                if label not in groups:
                    raise ValueError(
                        f"partition: label_fn gave {label!r} for leaf {n!r}; known labels: "
                        f"{labels_all}"
                    )
                groups[label].append(i)
            cache.clear()  # one params structure per optimizer: keep only the latest
            cache[key] = groups
        return cache[key]

    def _sub(names: list[str], ts: list[torch.Tensor], idx: list[int]) -> TensorDict:
        return T.unflatten({names[i]: ts[i] for i in idx})

    def init(params: TensorDictBase) -> TensorDict:
        names, ps = T.leaf_keys(params), T.leaves(params)
        groups = _groups(names, ps)
        return TensorDict(
            {lb: tx.init(_sub(names, ps, groups[lb])) for lb, tx in transforms_by_label.items()},
            batch_size=[],
        )

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        names, us = T.leaf_keys(updates), T.leaves(updates)
        ps = T.leaves(params) if params is not None else None
        if ps is not None and len(ps) != len(us):
            T.assert_same_structure(params, updates, "params and updates")
        groups = _groups(names, us)
        new_states: dict[str, TensorDictBase] = {}
        for label, tx in transforms_by_label.items():
            idx = groups[label]
            sub_params = _sub(names, ps, idx) if ps is not None else None
            out, new_states[label] = tx.update(
                _sub(names, us, idx), state[label], sub_params, **extra
            )
            dst, src = [], []
            for i, t in zip(idx, T.leaves(out), strict=True):
                if t is not us[i]:
                    dst.append(us[i])
                    src.append(t)
            if dst:
                torch._foreach_copy_(dst, src)
        return updates, TensorDict(new_states, batch_size=[])

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# Newton-Schulz


def newton_schulz(
    G: torch.Tensor, steps: int = 5, *, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximately orthogonalise ``G`` (``U S V^T -> U S' V^T`` with ``S'`` near 1) by the
    quintic Newton-Schulz iteration of Jordan (2024), coefficients :data:`NS_COEFFICIENTS`.

    The coefficients maximise the slope at zero rather than converge: after 5 steps the
    singular values land roughly in [0.7, 1.2] instead of at 1, which the blog reports does not
    hurt training. ``G`` is first scaled to Frobenius norm 1 (so its spectral norm is <= 1);
    wide matrices are iterated as they are and tall ones transposed, so the Gram matrix is the
    small side. Batched over leading dims.

    Args:
        G: a ``[..., rows, cols]`` tensor.
        steps: number of iterations (>= 0).
        eps: added to the norm before dividing (a zero matrix stays zero).
        dtype: compute dtype; ``None`` keeps ``G``'s. The reference runs in bfloat16 on GPUs.

    Returns:
        A tensor of ``G``'s shape in the compute dtype.

    Raises:
        ValueError: ``G`` has fewer than 2 dims or ``steps`` is not an int >= 0.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {tuple(G.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    a, b, c = NS_COEFFICIENTS
    X = G if dtype is None else G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# --------------------------------------------------------------------------------------------
# Muon


def default_muon_mask(name: str, tensor: torch.Tensor) -> bool:
    """Muon for hidden matrices: leaves with >= 2 dims that are neither token embeddings
    (``embed_tokens``) nor the output head (``lm_head``)."""
    return tensor.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``[rows, ...] -> [rows, prod(...)]`` (conv filters and other >2-D weights)."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace each matrix's update by ``sqrt(max(1, rows/cols)) * NewtonSchulz5(M)`` where
    ``M`` is the (Nesterov) momentum (Jordan, 2024), without the learning rate.

    Leaves with more than 2 dims are orthogonalised as ``[shape[0], prod(rest)]``. Leaves of
    the same shape are stacked and iterated as one batch. The state is ``{"momentum": tree}``
    (float32 for bfloat16/float16 params). Returned updates keep the incoming dtype.

    Args:
        momentum: decay rate of the momentum buffer, in [0, 1).
        nesterov: use ``(1 - momentum) g + momentum * buffer`` instead of the buffer.
        ns_steps: Newton-Schulz iterations (>= 0).
        ns_dtype: compute dtype of the iteration; ``None`` is the momentum dtype (float32 or
            float64); ``torch.bfloat16`` is what the reference uses on GPUs.

    Raises:
        ValueError: an invalid argument; at init, a leaf with fewer than 2 dims or not
            floating point.
    """
    momentum = _check_beta("momentum", momentum)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
    ns_steps = _check_int("ns_steps", ns_steps, 0)
    if ns_dtype is not None and not (
        isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point
    ):
        raise ValueError(f"ns_dtype must be None or a floating torch.dtype, got {ns_dtype!r}")

    def init(params: TensorDictBase) -> TensorDict:
        _check_float_params("scale_by_muon", params)
        for name, p in zip(T.leaf_keys(params), T.leaves(params), strict=True):
            if p.ndim < 2:
                raise ValueError(
                    f"scale_by_muon: leaf {name!r} has shape {tuple(p.shape)}; Muon "
                    "orthogonalises matrices (ndim >= 2): route it to AdamW (muon_mask)"
                )
        return TensorDict({"momentum": _zeros_like_moments(params)}, batch_size=[])

    def update(
        updates: TensorDictBase,
        state: TensorDictBase,
        params: TensorDictBase | None = None,
        **extra: Any,
    ) -> tuple[TensorDictBase, TensorDictBase]:
        bufs = T.leaves(state["momentum"])
        us, gs, _ = _open_update(updates, bufs, "scale_by_muon")
        if not us:
            return updates, state
        torch._foreach_lerp_(bufs, gs, 1.0 - momentum)
        if nesterov:
            torch._foreach_lerp_(gs, bufs, momentum)  # gs are ours (the updates or copies)
            ms = gs
        else:
            ms = bufs  # read only: newton_schulz does not write its input

        # One batched iteration per (shape, dtype): hidden layers repeat the same shapes.
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(ms):
            groups.setdefault((tuple(m.shape), m.dtype), []).append(i)
        for idx in groups.values():
            mats = [_as_matrix(ms[i]) for i in idx]
            rows, cols = mats[0].shape
            batch = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)
            out = newton_schulz(batch, ns_steps, dtype=ns_dtype)
            out = out * max(1.0, rows / cols) ** 0.5
            for j, i in enumerate(idx):
                us[i].copy_(out[j].reshape(us[i].shape))
        return updates, state

    return GradientTransformation(init, update)


def muon(
    learning_rate: float | Schedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    weight_decay: float = 0.0,
    adamw_lr: float | Schedule | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    muon_mask: MaskFn | None = None,
    mask: MaskFn | None = default_decay_mask,
    ns_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Muon with auxiliary AdamW (Jordan, "Muon: An optimizer for hidden layers in neural
    networks", 2024; as ``MuonWithAuxAdam`` of the reference code).

    ``partition({"muon": chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate(lr)),
    "adamw": chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate(adamw_lr))})``.
    Muon's learning rate is in units of
    spectral norm per step (the reference's default is 0.02), AdamW's is the usual one (3e-4):
    set ``adamw_lr``.

    Args:
        learning_rate: Muon's learning rate, float or schedule ``step -> lr``.
        momentum: Muon's momentum, in [0, 1).
        nesterov: Nesterov momentum for Muon.
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled decay for both groups (times each group's learning rate).
        adamw_lr: AdamW's learning rate (float or schedule); ``None`` reuses ``learning_rate``.
        adamw_betas: AdamW's ``(b1, b2)``.
        adamw_eps: AdamW's epsilon.
        muon_mask: ``(name, tensor) -> bool``, True for leaves Muon trains;
            ``None`` is :func:`default_muon_mask` (>= 2-D, not ``embed_tokens``/``lm_head``).
        mask: which leaves decay (both groups): :func:`default_decay_mask`, ``None`` for all,
            or ``(name, tensor) -> bool``.
        ns_dtype: compute dtype of Newton-Schulz (``None``: float32/float64 as the momentum;
            ``torch.bfloat16`` as the reference does on GPUs).

    Raises:
        ValueError: any invalid hyper-parameter (the message names it); at init, a leaf
            ``muon_mask`` selects that has fewer than 2 dims.
    """
    if muon_mask is not None and not callable(muon_mask):
        raise ValueError(
            f"muon_mask must be None or a callable (name, tensor) -> bool, got {muon_mask!r}"
        )
    if not isinstance(adamw_betas, tuple | list) or len(adamw_betas) != 2:
        raise ValueError(f"adamw_betas must be a pair (b1, b2), got {adamw_betas!r}")
    select = default_muon_mask if muon_mask is None else muon_mask
    hidden = chain(
        scale_by_muon(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
    try:
        adam = scale_by_adam(b1=adamw_betas[0], b2=adamw_betas[1], eps=adamw_eps)
    except ValueError as err:
        raise ValueError(f"adamw_betas/adamw_eps: {err}") from None
    try:
        adam_lr = scale_by_learning_rate(learning_rate if adamw_lr is None else adamw_lr)
    except ValueError as err:
        raise ValueError(f"adamw_lr: {err}") from None
    rest = chain(adam, add_decayed_weights(weight_decay, mask), adam_lr)
    return chain(  # a chain of one: a clip in front joins it (one state layout)
        partition({"muon": hidden, "adamw": rest}, lambda n, t: "muon" if select(n, t) else "adamw")
    )


@record
class MuonConfig(OptimizerRecord):
    """Orthogonalised momentum for hidden matrices, AdamW (at the same
    lr, betas [0.9, 0.95]) for the rest (Jordan 2024); Muon's lr is in spectral-norm units (the
    reference uses 0.02)."""

    capabilities = Capabilities(elementwise=False, needs_full_tensors=True)
    factory = staticmethod(muon)
    type: Literal["muon"] = field("muon", "Muon with auxiliary AdamW (tscale.optim.muon).")
    momentum: float = field(0.95, "Momentum coefficient of the Muon group.", ge=0, lt=1)
    nesterov: bool = field(True, "Nesterov momentum for the Muon group.")
    ns_steps: int = field(5, "Newton-Schulz iterations.", ge=0)

    def transform(
        self, learning_rate: float | Schedule, mask: MaskFn | None, *, warmup_steps: int = 0
    ) -> GradientTransformation:
        return muon(
            learning_rate,
            momentum=self.momentum,
            nesterov=self.nesterov,
            ns_steps=self.ns_steps,
            weight_decay=self.weight_decay,
            mask=mask,
        )
