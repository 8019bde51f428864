"""LoRA as a pure transform over a params tree: frozen base, trainable adapters, any ``apply``.

Low-rank adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021)
freezes a weight ``W`` [out, in] and learns ``ΔW = (alpha / r) · B @ A`` with ``A`` [r, in] and
``B`` [out, r] (``B = 0`` at init, so training starts at the base model). DoRA (Liu et al.,
"DoRA: Weight-Decomposed Low-Rank Adaptation", 2024) additionally learns a per-row magnitude
``m`` and uses ``m · (W + ΔW) / ‖W + ΔW‖_row`` (the norm detached, as in the paper's §4.3);
rsLoRA (Kalajdzievski, 2023) scales by ``alpha / √r`` instead of ``alpha / r``.

The calling convention keeps the adapters the *only* thing a step differentiates::

    lm = LoraModel(apply_fn=model.apply, base=params, config=LoraConfig(rank=8, alpha=16))
    adapters = lm.init(rng.key(0))                       # {...q_proj.lora_A.weight, ...}
    step = make_train_step(make_lm_loss(lm.apply), adamw(1e-3))
    state = TrainState.create(adapters, tx.init(adapters), key)   # params = adapters

``lm.apply(adapters, batch)`` closes over the frozen base params, so gradients, optimizer moments
and updates exist for the adapter leaves only; the base tree is never written.

How the adapters reach the model without the model knowing: ``apply_fn`` runs unchanged on the
base tree under a ``TorchFunctionMode`` that recognises the target weights *by identity*. A call
``F.linear(x, W)`` on a target becomes ``F.linear(x, W) + s · B(A(dropout(x)))`` (PEFT's
formula), so no ``[out, in]`` matrix is built and the extra activation memory per target is the
saved LoRA input ``[tokens, in]`` (shared between q/k/v when dropout is off) plus ``A x``
``[tokens, r]``. Any *other* use of a target weight (``x @ W.T``, ``F.embedding``) gets the
effective weight ``W + s · B @ A`` built on the fly (one extra ``[out, in]`` per target, kept for
the backward like any weight): correct for any model, just not memory-lean. The mode costs a few
microseconds of Python per torch call, noticeable only on tiny models. Tested in eager mode,
under ``torch.func`` transforms and under ``torch.compile`` (Dynamo traces the mode into the
graph; ``tscale.step.compile_step``).

LoRA dropout needs randomness: it is active iff the batch carries ``batch["dropout_key"]``, a
``[B, 2]`` int64 tensor of per-row keys from :mod:`tscale.core.rng` (or one ``[2]`` key), so it
splits with the batch into microbatches and accumulation stays equal to the big batch.
:func:`with_dropout_keys` wraps a step to add them from ``fold_in(state.rng, state.step)``;
evaluation passes no key and so runs without dropout. Masks come from counter-based hashing in
tensor arithmetic: no host sync, the same mask on every device for the same key.
"""

from __future__ import annotations

import fnmatch
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch.overrides import TorchFunctionMode

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import ShapeError
from tscale.models.protocol import BASE, Batch, Frozen, Gather, frozen_kw, gather_kw

ApplyFn = Callable[[TensorDictBase, Any], torch.Tensor]

#: The projections of a Llama-style block (attention and MLP), as glob patterns over param names.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    f"*.{m}.weight"
    for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
#: The batch field holding dropout keys ([B, 2] int64, or one [2] key).
DROPOUT_KEY = "dropout_key"

_A, _B, _M = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
_LINEAR = F.linear
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Metadata reads of a target weight are answered by the base leaf (or its placeholder) itself.
_META_ATTRS = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "layout",
        "requires_grad",
        "is_leaf",
        "grad_fn",
        "is_cuda",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "names",
        "grad",
        "itemsize",
        "nbytes",
    }
)
_META_FUNCS = frozenset(
    {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.stride,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.element_size,
        torch.Tensor.get_device,
        torch.Tensor.__len__,
        torch.Tensor.nelement,
        torch.Tensor.is_contiguous,
    }
)


def _check_targets(value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("LoraConfig.targets is empty; name at least one weight pattern")
    for p in value:
        if not isinstance(p, str) or not p:
            raise ValueError(f"LoraConfig.targets must be non-empty strings, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"LoraConfig.targets: bad regular expression {p!r}: {e}") from e


@attrs.frozen(kw_only=True)
class LoraConfig:
    """Hyper-parameters of LoRA (Hu et al. 2021), optionally DoRA (Liu et al. 2024).

    Attributes:
        rank: ``r``, the inner dimension of ``B @ A``.
        alpha: scale numerator: the update is ``(alpha / r) · B @ A`` (``alpha / √r`` with
            ``use_rslora``).
        dropout: probability of zeroing an element of the LoRA input (the base path is not
            dropped), active only when the batch carries ``dropout_key``.
        targets: which weights get adapters, matched against dotted param names. A bare name
            (``"q_proj"``) means that module's ``.weight`` (PEFT's ``target_modules``); a
            pattern with ``*``, ``?`` or ``[`` or a dotted name is a glob over the full name
            (``"model.layers.0.*.weight"``); ``"re:<regex>"`` is a regular expression that must
            match the full name. Default: the q/k/v/o and gate/up/down projections.
        init: distribution of ``A``: ``"kaiming_uniform"`` (PEFT's default, ``U(±1/√in)``) or
            ``"gaussian"`` (``N(0, 1/r)``); ``B`` is always zero.
        use_dora: learn a magnitude vector per target (DoRA).
        use_rslora: scale by ``alpha / √rank`` (rank-stabilised LoRA).

    Raises:
        ValueError: a hyper-parameter is out of range (the message names it).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = attrs.field(default=DEFAULT_TARGETS, converter=tuple)
    init: Literal["kaiming_uniform", "gaussian"] = "kaiming_uniform"
    use_dora: bool = False
    use_rslora: bool = False

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise ValueError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(
                f"LoraConfig.init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}"
            )
        _check_targets(self.targets)

    @property
    def scale(self) -> float:
        """The factor ``s`` of ``s · B @ A``: ``alpha / r`` (``alpha / √r`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ---------------------------------------------------------------------------------------------
# Frozen bases: a dense tree, or anything that offers a ``lora_view`` (quantised params).


@runtime_checkable
class BaseWeight(Protocol):
    """A frozen weight stored in some other form than a dense tensor (e.g. NF4, see ``quant``).

    ``linear`` computes ``x @ W.T (+ bias)`` with gradients for ``x`` only and without keeping a
    dense ``W`` alive for the backward; ``dense`` returns ``W`` (a transient tensor).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def dense(self) -> torch.Tensor: ...


@runtime_checkable
class FrozenBase(Protocol):
    """A base that is not a plain tree: ``lora_view()`` returns the tree to hand to ``apply_fn``
    (placeholder leaves where weights are stored otherwise) and those weights by name."""

    def lora_view(self) -> tuple[TensorDictBase, Mapping[str, BaseWeight]]: ...


Base = TensorDictBase | FrozenBase


def _view(base: Base) -> tuple[TensorDictBase, Mapping[str, BaseWeight]]:
    if isinstance(base, TensorDictBase):
        return base, {}
    if isinstance(base, FrozenBase):
        return base.lora_view()
    raise TypeError(
        f"base params must be a TensorDict or offer lora_view() (e.g. QuantizedParams), "
        f"got {type(base).__name__}"
    )


def _base_linear(w: torch.Tensor | BaseWeight, x: torch.Tensor, bias: torch.Tensor | None):
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w.linear(x, bias)


def _dense(w: torch.Tensor | BaseWeight) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dense()


# ---------------------------------------------------------------------------------------------
# Targets and adapter names.


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _IDENT.match(pattern):  # a module name, as PEFT's target_modules
        return name == f"{pattern}.weight" or name.endswith(f".{pattern}.weight")
    return fnmatch.fnmatchcase(name, pattern)


def match_targets(
    shapes: Mapping[str, tuple[int, ...]], patterns: Iterable[str], *, what: str = "LoRA"
) -> tuple[str, ...]:
    """The names in ``shapes`` matched by any of ``patterns`` (see :class:`LoraConfig`), in order.

    Raises:
        ShapeError: a pattern matches no leaf, or a matched leaf is not a 2-D ``*.weight``.
    """
    patterns = tuple(patterns)
    hits = [n for n in shapes if any(_matches(p, n) for p in patterns)]
    for p in patterns:
        if not any(_matches(p, n) for n in shapes):
            sample = ", ".join(list(shapes)[:4])
            raise ShapeError(
                f"{what} target pattern {p!r} matches no parameter (names look like: {sample}, …); "
                f"fix the pattern or drop it"
            )
    for n in hits:
        if len(shapes[n]) != 2 or not n.endswith(".weight"):
            raise ShapeError(
                f"{what} target {n!r} has shape {tuple(shapes[n])}; only 2-D '<module>.weight' "
                f"matrices (linear layers) can be targets — narrow the pattern"
            )
    return tuple(hits)


def _shapes(base: Base) -> dict[str, tuple[int, ...]]:
    tree, weights = _view(base)
    out = {k: tuple(v.shape) for k, v in T.flatten(tree).items()}
    out.update({k: tuple(w.shape) for k, w in weights.items()})
    return out


def lora_targets(base: Base, config: LoraConfig) -> tuple[str, ...]:
    """The dotted names of the weights ``config.targets`` selects in ``base``, in tree order."""
    return match_targets(_shapes(base), config.targets)


def adapter_names(target: str, *, use_dora: bool = False) -> tuple[str, ...]:
    """PEFT's leaf names for one target: ``x.q_proj.weight`` → ``x.q_proj.lora_A.weight``, …"""
    module = target.removesuffix(".weight")
    names = (f"{module}.{_A}", f"{module}.{_B}")
    return (*names, f"{module}.{_M}") if use_dora else names


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    # PEFT's DoraLinearLayer.get_weight_norm: the L2 norm of each output row.
    return torch.linalg.norm(w, dim=1).to(w.dtype)


def init_lora(
    base: Base, config: LoraConfig, key: torch.Tensor, *, dtype: torch.dtype | None = None
) -> TensorDict:
    """Fresh adapters for the targets of ``config`` in ``base`` (Hu et al. 2021, §4.1).

    ``A`` is drawn as PEFT does (``kaiming_uniform_(a=√5)``, i.e. ``U(±1/√in)``, or
    ``N(0, 1/r)`` for ``init="gaussian"``) in target order from one generator seeded by ``key``;
    ``B`` is zero, so the adapted model starts equal to the base. With DoRA the magnitude starts
    at the row norms of the (dequantised) base weight.

    Args:
        base: the frozen params (a tree, or quantised params).
        config: the LoRA hyper-parameters.
        key: a key from :mod:`tscale.core.rng` (read on the host: call outside the step).
        dtype: adapter dtype; default the dtype of each base weight.

    Returns:
        A nested TensorDict named like a PEFT adapter: ``<module>.lora_A.weight`` [r, in],
        ``<module>.lora_B.weight`` [out, r] (and ``<module>.lora_magnitude_vector`` [out]).

    Raises:
        ShapeError: a target pattern matches nothing or a non-matrix.
    """
    tree, weights = _view(base)
    flat = T.flatten(tree)
    gen = R.generator(key)  # draws on the CPU: the same adapters on every device
    out: dict[str, torch.Tensor] = {}
    for name in lora_targets(base, config):
        w = weights.get(name, flat[name])
        d = dtype or w.dtype
        fan_out, fan_in = w.shape
        a = torch.empty((config.rank, fan_in), dtype=torch.float32)
        if config.init == "gaussian":
            a.normal_(0.0, 1.0 / config.rank, generator=gen)
        else:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        names = adapter_names(name, use_dora=config.use_dora)
        out[names[0]] = a.to(device=w.device, dtype=d)
        out[names[1]] = torch.zeros((fan_out, config.rank), dtype=d, device=w.device)
        if config.use_dora:
            out[names[2]] = _row_norm(_dense(w).to(d))
    return T.unflatten(out)


def _group(adapters: TensorDictBase) -> dict[str, dict[str, torch.Tensor]]:
    """``{target weight name: {"A", "B", "M"?}}`` from the flat adapter leaves."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in T.flatten(adapters).items():
        for suffix, role in ((_A, "A"), (_B, "B"), (_M, "M")):
            if k.endswith("." + suffix):
                groups.setdefault(k[: -len(suffix) - 1] + ".weight", {})[role] = v
                break
        else:
            raise ShapeError(
                f"adapter leaf {k!r} is not a LoRA leaf (expected names ending in "
                f"'.{_A}', '.{_B}' or '.{_M}')"
            )
    for name, g in groups.items():
        if "A" not in g or "B" not in g:
            raise ShapeError(f"adapters for {name!r} lack lora_A or lora_B (have {sorted(g)})")
    return groups


def _check_site(
    name: str, g: Mapping[str, torch.Tensor], shape: tuple[int, ...], use_dora: bool
) -> None:
    a, b = g["A"], g["B"]
    out, inp = shape
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != inp
        or b.shape[0] != out
        or (a.shape[0] != b.shape[1])
    ):
        raise ShapeError(
            f"adapters for {name!r} have lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
            f"for a weight [{out}, {inp}] they must be [r, {inp}] and [{out}, r]"
        )
    if use_dora != ("M" in g):
        raise ShapeError(
            f"adapters for {name!r} {'lack' if use_dora else 'have'} lora_magnitude_vector but "
            f"config.use_dora={use_dora}"
        )
    if use_dora and tuple(g["M"].shape) != (out,):
        raise ShapeError(
            f"lora_magnitude_vector of {name!r} must be [{out}], got {tuple(g['M'].shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Dropout from keys.


def _uniform(keys: torch.Tensor, salt: int, x: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats shaped like ``x`` from per-row keys (splitmix64 counters)."""
    keys = keys.to(x.device)
    if keys.dim() == 1:
        bits = R.split(R.fold_in(keys, salt), x.numel())[:, 0]
    else:
        if keys.shape[0] != x.shape[0]:
            raise ShapeError(
                f"batch[{DROPOUT_KEY!r}] has {keys.shape[0]} rows but a LoRA input has leading "
                f"dim {x.shape[0]}; pass one key per batch row ([B, 2]) or a single key ([2])"
            )
        n = x[0].numel()
        bits = torch.vmap(lambda k: R.split(R.fold_in(k, salt), n)[:, 0])(keys)
    u = ((bits >> 40) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
    return u.view(x.shape)


def _dropout(x: torch.Tensor, keys: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    keep = _uniform(keys, salt, x) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def add_dropout_keys(batch: Batch, key: torch.Tensor) -> Batch:
    """A shallow copy of ``batch`` with ``dropout_key``: one key per row, split from ``key``."""
    if isinstance(batch, TensorDictBase) and batch.batch_dims:
        rows = batch.batch_size[0]
    else:
        rows = batch["input_ids"].shape[0]
    keys = R.split(key, rows)
    if isinstance(batch, TensorDictBase):
        out = batch.clone(False)
        if out.is_locked:
            out.unlock_()
        out.set(DROPOUT_KEY, keys)
        return out
    return {**batch, DROPOUT_KEY: keys}


def with_dropout_keys(step: Callable[[TrainState, Any], Any]) -> Callable[[TrainState, Any], Any]:
    """Wrap ``step(state, batch)`` to add LoRA dropout keys from ``fold_in(state.rng, step)``.

    The keys depend only on the run's key and the step counter, so a resumed run draws the same
    masks; they split with the batch, so gradient accumulation equals the big batch.
    """

    def wrapped(state: TrainState, batch: Any):
        return step(state, add_dropout_keys(batch, R.fold_in(state.rng, state.step)))

    return wrapped


# ---------------------------------------------------------------------------------------------
# The forward.


@attrs.define(eq=False)
class _Site:
    """One targeted weight during one forward (call-scoped, not part of any state)."""

    name: str
    leaf: torch.Tensor  # the object apply_fn sees in the tree (the weight or a placeholder)
    weight: torch.Tensor | BaseWeight
    lora: Mapping[str, torch.Tensor] | None
    salt: int
    used: bool = False
    #: For a weight gathered during the forward (FSDP): the site of the stored shard it came from.
    origin: _Site | None = None

    def mark_used(self) -> None:
        self.used = True
        if self.origin is not None:
            self.origin.used = True

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, ctx: _Ctx) -> torch.Tensor:
        y = _base_linear(self.weight, x, bias)
        if self.lora is None:
            return y
        a, b = self.lora["A"], self.lora["B"]
        s = ctx.config.scale
        xa = x.to(a.dtype)
        dropped = ctx.keys is not None and ctx.config.dropout > 0
        xd = _dropout(xa, ctx.keys, ctx.config.dropout, self.salt) if dropped else xa
        lora = F.linear(F.linear(xd, a), b)
        if "M" not in self.lora:
            return (y + lora * s).to(y.dtype)
        # DoRA, as PEFT's DoraLinearLayer.forward: the row norm is detached (Liu et al. §4.3).
        w = _dense(self.weight).detach().to(a.dtype)
        norm = _row_norm(w + s * (b.detach() @ a.detach())).detach()
        mag = self.lora["M"] / norm
        if dropped:
            base = _base_linear(self.weight, xd.to(x.dtype), None)
        else:
            base = y if bias is None else y - bias
        return (y + (mag - 1) * base + mag * lora * s).to(y.dtype)

    def effective(self, ctx: _Ctx) -> torch.Tensor:
        """The dense effective weight (for uses other than ``F.linear``)."""
        w = _dense(self.weight)
        if self.lora is None:
            return w
        return _merge_one(w, self.lora, ctx.config.scale)


@attrs.define(eq=False)
class _Ctx:
    config: LoraConfig
    keys: torch.Tensor | None


def _merge_one(w: torch.Tensor, g: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    a, b = g["A"], g["B"]
    v = w.to(a.dtype) + scale * (b @ a)
    if "M" in g:
        v = (g["M"] / _row_norm(v).detach())[:, None] * v
    return v.to(w.dtype)


class _Adapted(TorchFunctionMode):
    """Routes torch calls that touch a target weight (matched by identity) through its site."""

    def __init__(self, sites: dict[int, _Site], ctx: _Ctx) -> None:
        super().__init__()
        self.sites = sites
        self.ctx = ctx
        # True while an outer gather hook runs: its collectives read the stored (sharded)
        # target leaves as plain tensors, not as adapted weights.
        self.paused = False
        # id(gathered weight) -> (a weak reference to it, the site of the stored leaf)
        self.aliases: dict[int, tuple[weakref.ref[torch.Tensor], _Site]] = {}
        # While Dynamo traces, id() of a graph input (a batch tensor) installs a guard on that
        # object's identity (a recompile every step), and comparing shapes would specialise
        # dynamic dims; identity tests ("is") against the few target leaves need neither.
        self.tracing = torch.compiler.is_compiling()

    def _site(self, obj: Any) -> _Site | None:
        if self.tracing:
            if not (isinstance(obj, torch.Tensor) and obj.dim() == 2):
                return None
            hit = next((s for s in self.sites.values() if s.leaf is obj), None)
            if hit is not None or not self.aliases:
                return hit
            return next((self._alias(o, obj) for r, o in self.aliases.values() if r() is obj), None)
        site = self.sites.get(id(obj))
        if site is not None and site.leaf is obj:
            return site
        alias = self.aliases.get(id(obj))
        if alias is not None and alias[0]() is obj:
            return self._alias(alias[1], obj)
        return None

    @staticmethod
    def _alias(origin: _Site, full: torch.Tensor) -> _Site:
        """The site of a gathered weight: ``origin``'s adapters over the full tensor."""
        return attrs.evolve(origin, leaf=full, weight=full, used=False, origin=origin)

    def _swap(self, obj: Any) -> Any:
        site = self._site(obj)
        if site is not None:
            site.mark_used()
            return site.effective(self.ctx)
        if isinstance(obj, list | tuple) and any(self._site(o) is not None for o in obj):
            return type(obj)(self._swap(o) for o in obj)
        return obj

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is _LINEAR:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            site = self._site(w)
            if site is not None:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                site.mark_used()
                return site.linear(x, bias, self.ctx)
        elif func in _META_FUNCS or (
            getattr(func, "__name__", "") == "__get__"
            and getattr(func.__self__, "__name__", "") in _META_ATTRS
        ):
            return func(*args, **kwargs)
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def gathered(self, gather: Gather) -> Gather:
        """``gather`` run outside the adaptation, its outputs adopted as the targets they come
        from: a gathered target weight is adapted like the stored one (FSDP under LoRA)."""

        def run(group: TensorDictBase) -> TensorDictBase:
            self.paused = True
            try:
                out = gather(group)
            finally:
                self.paused = False
            stored, used = T.flatten(group), T.flatten(out)
            for name, leaf in stored.items():
                site = self._site(leaf)
                full = used.get(name)
                if site is None or full is None or full is leaf:
                    continue
                if not isinstance(site.weight, torch.Tensor):
                    raise ShapeError(
                        f"LoRA target {site.name!r} is stored quantised; a gather hook (FSDP) "
                        f"over a quantised base is not supported"
                    )
                if site.lora is not None:
                    _check_site(site.name, site.lora, tuple(full.shape), self.ctx.config.use_dora)
                # Weakly held: a gathered weight dies after its layer (FSDP's reshard after
                # forward), and the adaptation must not keep it alive.
                self.aliases[id(full)] = (weakref.ref(full), site)
                weakref.finalize(full, self.aliases.pop, id(full), None)
            return out

        return run


def _sites(
    base: Base,
    adapters: TensorDictBase,
    config: LoraConfig,
    extra: Iterable[str] = (),
    *,
    check: bool = True,
) -> tuple[TensorDictBase, dict[int, _Site]]:
    """The sites of ``base``'s targets by ``id`` of the leaf; ``check=False`` leaves the shape
    checks to the gather hook (stored leaves are shards, the gathered ones are checked)."""
    tree, weights = _view(base)
    flat = T.flatten(tree)
    groups = _group(adapters)
    order = {n: i for i, n in enumerate(flat)}
    sites: dict[int, _Site] = {}
    for name in sorted({*groups, *weights, *extra}, key=lambda n: order.get(n, -1)):
        if name not in flat:
            raise ShapeError(
                f"adapters target {name!r}, which the base params do not have "
                f"(base names look like {', '.join(list(flat)[:3])}, …)"
            )
        leaf = flat[name]
        w = weights.get(name, leaf)
        g = groups.get(name)
        if g is not None and check:
            _check_site(name, g, tuple(w.shape), config.use_dora)
        sites[id(leaf)] = _Site(name=name, leaf=leaf, weight=w, lora=g, salt=order[name])
    return tree, sites


def _run(
    fn: Callable[[TensorDictBase, Gather | None], Any],
    base: Base,
    adapters: TensorDictBase,
    batch: Batch | None,
    config: LoraConfig,
    *,
    gather: Gather | None = None,
    optional: Callable[[TensorDictBase], Iterable[torch.Tensor]] | None = None,
) -> Any:
    """``fn(tree, gather)`` under the adaptation: ``tree`` is the base's tree, whose target
    weights (and the weights ``gather`` makes of them) are adapted wherever ``fn`` uses them.

    Every target must be used, except the leaves ``optional(tree)`` names (the LM head, which
    :meth:`LoraModel.hidden_states` does not read)."""
    keys = None
    if batch is not None and config.dropout > 0:
        keys = batch.get(DROPOUT_KEY, None)
    tree, sites = _sites(base, adapters, config, check=gather is None)
    mode = _Adapted(sites, _Ctx(config=config, keys=keys))
    stored = list(sites.values())
    with mode:
        out = fn(tree, None if gather is None else mode.gathered(gather))
    skip = {id(t) for t in optional(tree)} if optional is not None else set()
    unused = [s.name for s in stored if not s.used and id(s.leaf) not in skip]
    if unused:
        raise ShapeError(
            f"apply_fn never used the target weight(s) {unused[:3]} through torch calls on the "
            f"tree it was given (it may copy or re-read the weights); LoRA cannot reach them — "
            f"use merge() for such models"
        )
    return out


def lora_apply(
    apply_fn: ApplyFn, config: LoraConfig
) -> Callable[[TensorDictBase, Batch, Base], torch.Tensor]:
    """``apply'(adapters, batch, base) -> apply_fn``'s output with the adapters applied.

    ``base`` is the frozen tree (or quantised params); only ``adapters`` should be
    differentiated. :class:`LoraModel` closes over ``base`` to give ``apply(adapters, batch)``.
    """

    def adapted(adapters: TensorDictBase, batch: Batch, base: Base) -> torch.Tensor:
        return _run(lambda tree, _: apply_fn(tree, batch), base, adapters, batch, config)

    return adapted


def _frozen_base(base: Base | None) -> Base | None:
    if base is None:
        return None
    if isinstance(base, TensorDictBase):
        view = base.clone(False)  # a new container over the same tensors, locked
        return view if view.is_locked else view.lock_()
    _view(base)  # raises a clear TypeError for anything else
    return base


_PROTOCOL_METHODS = ("hidden_states", "head_weight", "init_cache", "apply_with_cache")


def _owner_model(apply_fn: ApplyFn | None) -> Any:
    """The model whose bound ``.apply`` ``apply_fn`` is, if it offers the whole protocol."""
    owner = getattr(apply_fn, "__self__", None)
    if getattr(apply_fn, "__name__", None) != "apply" or owner is None:
        return None
    return owner if all(callable(getattr(owner, m, None)) for m in _PROTOCOL_METHODS) else None


@attrs.frozen(kw_only=True, eq=False)
class LoraModel:
    """A model with frozen base params and LoRA adapters: ``apply(adapters, batch)``.

    Implements :class:`~tscale.models.protocol.LanguageModel` over the adapters: ``apply``,
    ``hidden_states``, ``head_weight`` (the adapted head when ``lm_head`` is a target),
    ``logits_from_hidden``, ``init_cache`` and ``apply_with_cache`` (decoding with the adapters
    applied, without merging them) all run the wrapped model on the base tree with the adapters
    applied to its target weights.

    The frozen base comes from ``frozen["base"]`` when the call passes one (the train state's
    frozen trees), else from ``base``. A ``gather`` hook (FSDP over the base) is run on the base
    tree and the weights it gathers are adapted like the stored ones.

    Attributes:
        model: the wrapped model (any :class:`~tscale.models.protocol.LanguageModel`).
        apply_fn: instead of ``model``, a bare ``apply(params, batch)`` (any model with HF-style
            names): then only ``apply`` works. A bound ``model.apply`` of a model that offers the
            protocol counts as ``model``.
        base: the frozen params — a tree (held as a locked view, never written) or
            :class:`~tscale.models.quant.QuantizedParams`; None when every call passes
            ``frozen["base"]``.
        config: the LoRA hyper-parameters.
        targets: the resolved target names of ``base`` (derived; () without a base).

    Raises:
        ShapeError: a target pattern matches nothing or a non-matrix.
        TypeError: neither ``model`` nor ``apply_fn``.
    """

    apply_fn: ApplyFn | None = None
    base: Base | None = attrs.field(default=None, converter=_frozen_base)
    config: LoraConfig = attrs.field(factory=LoraConfig)
    model: Any = None
    targets: tuple[str, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.model is None and self.apply_fn is None:
            raise TypeError("LoraModel needs model= (a LanguageModel) or apply_fn=")
        if self.model is None:
            object.__setattr__(self, "model", _owner_model(self.apply_fn))
        elif self.apply_fn is None:
            object.__setattr__(self, "apply_fn", self.model.apply)
        targets = () if self.base is None else lora_targets(self.base, self.config)
        object.__setattr__(self, "targets", targets)

    @property
    def inner(self) -> Any:
        """The wrapped model (None when built from a bare ``apply_fn``)."""
        return self.model

    @property
    def offers_cache(self) -> bool:
        """Whether :meth:`apply_with_cache` works (the wrapped model has a KV cache)."""
        return callable(getattr(self.model, "apply_with_cache", None))

    @property
    def final_logit_softcap(self) -> float | None:
        """The wrapped model's (LoRA does not change the head's soft-cap)."""
        return getattr(self._model("final_logit_softcap"), "final_logit_softcap", None)

    def base_of(self, frozen: Frozen | None = None) -> Base:
        """The frozen base of a call: ``frozen["base"]``, else ``self.base``.

        Raises:
            ValueError: neither is there.
        """
        if frozen is not None and BASE in frozen:
            return frozen[BASE]
        if self.base is None:
            raise ValueError(
                f"LoraModel has no base: pass frozen={{{BASE!r}: params}} or build it with base="
            )
        return self.base

    def _model(self, what: str) -> Any:
        if self.model is None:
            raise TypeError(
                f"LoraModel.{what} needs the wrapped model: build it with model=<a "
                f"LanguageModel> (it was built from a bare apply_fn, which offers apply only)"
            )
        return self.model

    def init(
        self,
        key: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
        frozen: Frozen | None = None,
    ) -> TensorDict:
        """Fresh adapters (``B = 0``), see :func:`init_lora`."""
        return init_lora(self.base_of(frozen), self.config, key, dtype=dtype)

    def apply(
        self,
        adapters: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """``apply_fn(base ⊕ adapters, batch)``; dropout iff ``batch`` has ``dropout_key``."""
        apply_fn = self.apply_fn
        assert apply_fn is not None  # set at construction
        extra = frozen_kw(frozen) if self.model is not None else {}

        def fn(tree: TensorDictBase, g: Gather | None) -> torch.Tensor:
            return apply_fn(tree, batch, **gather_kw(g), **extra)

        return _run(fn, self.base_of(frozen), adapters, batch, self.config, gather=gather)

    def hidden_states(
        self,
        adapters: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The wrapped model's final hidden states with the adapters applied."""
        m = self._model("hidden_states")

        def fn(tree: TensorDictBase, g: Gather | None) -> torch.Tensor:
            return m.hidden_states(tree, batch, **gather_kw(g), **frozen_kw(frozen))

        def head(tree: TensorDictBase) -> list[torch.Tensor]:
            try:  # an adapted head is read by head_weight, not here
                return [m.head_weight(tree)]
            except KeyError:  # a decoder without LM head (a reward model's): nothing to skip
                return []

        base = self.base_of(frozen)
        return _run(fn, base, adapters, batch, self.config, gather=gather, optional=head)

    def head_weight(
        self,
        adapters: TensorDictBase,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The LM head's weight as the adapted model computes with it: ``W + s · B @ A`` (DoRA:
        rescaled) when the head (or, tied, the embedding) is a target, else the base's.

        Raises:
            ValueError: the head is a target and ``config.dropout > 0``: dropout acts on the
                adapter's input, which a weight (for a fused loss) cannot express.
        """
        m = self._model("head_weight")
        base = self.base_of(frozen)
        if self.config.dropout > 0:
            tree, _ = _view(base)
            head = m.head_weight(tree)
            name = next((k for k, v in T.flatten(tree).items() if v is head), None)
            if name in _group(adapters):
                raise ValueError(
                    f"LoRA dropout ({self.config.dropout}) on the LM head ({name}) does not "
                    f"combine with a loss that takes the head's weight (the fused loss): dropout "
                    f"acts on the adapter's input; drop the head from the targets, set the "
                    f"dropout to 0, or use the unfused loss"
                )

        def fn(tree: TensorDictBase, g: Gather | None) -> torch.Tensor:
            w = m.head_weight(tree, **gather_kw(g), **frozen_kw(frozen))
            # A torch call on a target weight under the adaptation yields its effective
            # weight (a view of the weight itself when it is no target).
            return w.view(w.shape)

        return _run(fn, base, adapters, None, self.config, gather=gather, optional=T.leaves)

    def logits_from_hidden(
        self,
        adapters: TensorDictBase,
        h: torch.Tensor,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The (adapted) LM head on hidden states."""
        m = self._model("logits_from_hidden")

        def fn(tree: TensorDictBase, g: Gather | None) -> torch.Tensor:
            return m.logits_from_hidden(tree, h, **gather_kw(g), **frozen_kw(frozen))

        base = self.base_of(frozen)
        return _run(fn, base, adapters, None, self.config, gather=gather, optional=T.leaves)

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        frozen: Frozen | None = None,
    ) -> TensorDict:
        """The wrapped model's empty KV cache (adapters change no cache shape)."""
        m = self._model("init_cache")
        return m.init_cache(batch_size, max_length, dtype=dtype, device=device, **frozen_kw(frozen))

    def apply_with_cache(
        self,
        adapters: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        offset: int,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> tuple[torch.Tensor, TensorDictBase]:
        """Incremental decoding with the adapters applied (no merge): the wrapped model's
        ``apply_with_cache`` on the base tree under the adaptation."""
        m = self._model("apply_with_cache")

        def fn(tree: TensorDictBase, g: Gather | None) -> tuple[torch.Tensor, TensorDictBase]:
            return m.apply_with_cache(
                tree, batch, cache, offset, **gather_kw(g), **frozen_kw(frozen)
            )

        return _run(fn, self.base_of(frozen), adapters, batch, self.config, gather=gather)

    def merged(self, adapters: TensorDictBase, *, frozen: Frozen | None = None) -> TensorDict:
        """Dense params with the adapters folded in (dequantised first for a quantised base)."""
        tree, weights = _view(self.base_of(frozen))
        flat = T.flatten(tree)
        dense = {k: (weights[k].dense() if k in weights else v) for k, v in flat.items()}
        return merge(T.unflatten(dense), adapters, self.config)


# ---------------------------------------------------------------------------------------------
# Merge and unmerge.


def merge(base: TensorDictBase, adapters: TensorDictBase, config: LoraConfig) -> TensorDict:
    """Params with each target replaced by ``W + s · B @ A`` (DoRA: ``m · V / ‖V‖_row``).

    The sum is formed in the adapters' dtype and cast back to ``W``'s. Non-target leaves are
    shared with ``base`` (not copied); ``base`` is not modified.

    Raises:
        ShapeError: adapters name a weight ``base`` lacks, or shapes disagree.
    """
    flat = dict(T.flatten(base))
    for name, g in _group(adapters).items():
        if name not in flat:
            raise ShapeError(f"adapters target {name!r}, which the base params do not have")
        _check_site(name, g, tuple(flat[name].shape), config.use_dora)
        flat[name] = _merge_one(flat[name], g, config.scale)
    return T.unflatten(flat)


def unmerge(merged: TensorDictBase, adapters: TensorDictBase, config: LoraConfig) -> TensorDict:
    """The inverse of :func:`merge` for plain LoRA: ``W = W' - s · B @ A`` (up to rounding).

    Raises:
        ValueError: ``config.use_dora`` — a DoRA merge rescales each row by ``m / ‖W + ΔW‖``
            and that norm cannot be recovered from the merged weight (PEFT caches it; keep the
            base instead).
        ShapeError: adapters name a weight ``merged`` lacks, or shapes disagree.
    """
    if config.use_dora:
        raise ValueError(
            "unmerge() cannot undo a DoRA merge: the row norm ‖W + ΔW‖ is lost in the merged "
            "weight; keep the base params and re-merge instead"
        )
    flat = dict(T.flatten(merged))
    for name, g in _group(adapters).items():
        if name not in flat:
            raise ShapeError(f"adapters target {name!r}, which the merged params do not have")
        _check_site(name, g, tuple(flat[name].shape), False)
        w = flat[name]
        a, b = g["A"], g["B"]
        flat[name] = (w.to(a.dtype) - config.scale * (b @ a)).to(w.dtype)
    return T.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# PEFT's adapter_config.json, as pure data (the file I/O is in tscale.checkpoint.peft).


def _module_names(targets: Iterable[str]) -> list[str]:
    return sorted({t.removesuffix(".weight") for t in targets})


def to_peft_config(
    config: LoraConfig,
    adapters: TensorDictBase,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> dict[str, Any]:
    """The ``adapter_config.json`` mapping that ``peft.PeftModel.from_pretrained`` reads.

    ``target_modules`` lists PEFT module names: the bare names (``["q_proj", …]``) when every
    pattern of ``config.targets`` selects a module everywhere (``"q_proj"``, ``"*.q_proj.weight"``),
    else the exact module paths of ``adapters`` (always correct, longer).
    """
    present = list(_group(adapters))
    leaf_modules = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in present})
    suffix_style = all(
        _IDENT.match(p) or re.fullmatch(r"\*\.([A-Za-z_][A-Za-z0-9_]*)\.weight", p)
        for p in config.targets
    )
    target_modules = leaf_modules if suffix_style else _module_names(present)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if config.init == "kaiming_uniform" else "gaussian",
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


_UNSUPPORTED = {
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "lora_bias": (False, None),
}


def from_peft_config(d: Mapping[str, Any]) -> LoraConfig:
    """A :class:`LoraConfig` from a PEFT ``adapter_config.json`` mapping.

    Raises:
        ValueError: not a LoRA adapter, or it uses a PEFT feature tscale does not implement
            (biases, per-module ranks, ``modules_to_save`` …; the message names the key).
    """
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter is of PEFT type {d.get('peft_type')!r}; only LORA loads")
    for key, ok in _UNSUPPORTED.items():
        if key in d and d[key] not in ok:
            raise ValueError(
                f"adapter_config.json sets {key}={d[key]!r}, which tscale's LoRA does not "
                f"support (allowed: {ok!r})"
            )
    tm = d.get("target_modules")
    if isinstance(tm, str):
        targets: tuple[str, ...] = (f"re:(?:{tm})\\.weight",)
    elif tm:
        targets = tuple(
            t if _IDENT.match(t) else f"re:(?:.*\\.)?{re.escape(t)}\\.weight" for t in tm
        )
    else:
        targets = DEFAULT_TARGETS
    init = d.get("init_lora_weights", True)
    return LoraConfig(
        rank=int(d["r"]),
        alpha=float(d.get("lora_alpha", 8)),
        dropout=float(d.get("lora_dropout", 0.0)),
        targets=targets,
        init="gaussian" if init == "gaussian" else "kaiming_uniform",
        use_dora=bool(d.get("use_dora", False)),
        use_rslora=bool(d.get("use_rslora", False)),
    )


__all__ = [
    "DEFAULT_TARGETS",
    "DROPOUT_KEY",
    "BaseWeight",
    "FrozenBase",
    "LoraConfig",
    "LoraModel",
    "adapter_names",
    "add_dropout_keys",
    "from_peft_config",
    "init_lora",
    "lora_apply",
    "lora_targets",
    "match_targets",
    "merge",
    "to_peft_config",
    "unmerge",
    "with_dropout_keys",
]
