"""QLoRA: a frozen base stored as 4-bit NormalFloat, LoRA adapters trained on top.

QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023) keeps the
frozen base linear weights in NF4 — 4-bit codes whose 16 levels are the quantiles of a normal
distribution, one absmax scale per block of 64 — with *double quantisation*: the fp32 block
scales are themselves quantised to 8 bits in blocks of 256 (about 4.13 bits per weight in all,
vs 16 for bf16). The forward dequantises each weight on the fly; the backward dequantises it
again instead of keeping it, so at most one dense weight is alive at a time. Gradients flow only
into the LoRA adapters (see :mod:`tscale.models.lora`), which stay in bf16/fp32.

The codes and scales come from ``bitsandbytes`` (``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)``, ``dequantize_4bit``), which has CPU and CUDA backends; it is the
optional ``bnb`` extra and is imported only when quantising.

Usage::

    qlm = make_qlora_model(model.apply, params, LoraConfig(rank=8, alpha=16))
    adapters = qlm.init(rng.key(0), dtype=torch.float32)
    step = make_train_step(make_lm_loss(qlm.apply), adamw(1e-3))     # params = adapters
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from tscale.core import tree as T
from tscale.errors import ShapeError
from tscale.models.lora import DEFAULT_TARGETS, ApplyFn, LoraConfig, LoraModel, match_targets
from tscale.models.protocol import Frozen, LanguageModel

#: Block sizes bitsandbytes accepts for 4-bit quantisation.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QS_KEY = "quant_state.bitsandbytes__nf4"


def _bnb() -> Any:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "QLoRA needs bitsandbytes: pip install 'tscale[bnb]' (or bitsandbytes>=0.45)"
        ) from e
    return bnbf


@attrs.frozen(kw_only=True, eq=False)
class NF4Weight:
    """One frozen weight in NF4 with double quantisation (Dettmers et al. 2023), as tensors.

    The tensors are those bitsandbytes' ``QuantState`` holds (and HF writes to a 4-bit
    checkpoint); the rest is static metadata.

    Attributes:
        data: uint8 ``[numel / 2, 1]``, two 4-bit codes per byte.
        absmax: uint8 ``[numel / block_size]``, the block scales quantised to 8 bits.
        quant_map: float32 ``[16]``, the NF4 levels.
        nested_absmax: float32 ``[⌈blocks / 256⌉]``, scales of the quantised block scales.
        nested_quant_map: float32 ``[256]``, the 8-bit dynamic code of the block scales.
        offset: float32 0-d, the mean subtracted from the block scales before quantising them.
        shape, dtype: of the original weight (``dense()`` returns this shape and dtype).
        block_size, nested_block_size: elements per block at each level.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor
    nested_quant_map: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    nested_block_size: int

    @classmethod
    def quantize(cls, weight: torch.Tensor, *, block_size: int = 64) -> NF4Weight:
        """Quantise ``weight`` (fp32/bf16/fp16, on CPU or CUDA) with bitsandbytes.

        Raises:
            ShapeError: unsupported dtype, block size, or a size not divisible by the block.
        """
        if block_size not in BLOCK_SIZES:
            raise ShapeError(f"NF4 block_size must be one of {BLOCK_SIZES}, got {block_size}")
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ShapeError(
                f"NF4 quantises float32/bfloat16/float16 weights, got {weight.dtype}; cast first"
            )
        if weight.numel() % block_size:
            raise ShapeError(
                f"a weight of shape {tuple(weight.shape)} ({weight.numel()} elements) is not a "
                f"whole number of NF4 blocks of {block_size}; pick a block size that divides it"
            )
        q, st = _bnb().quantize_4bit(
            weight.detach().contiguous(),
            blocksize=block_size,
            quant_type="nf4",
            compress_statistics=True,
        )
        return cls._from_state(q, st)

    @classmethod
    def _from_state(cls, data: torch.Tensor, st: Any) -> NF4Weight:
        offset = torch.as_tensor(st.offset, dtype=torch.float32, device=data.device).reshape(())
        return cls(
            data=data,
            absmax=st.absmax,
            quant_map=st.code,
            nested_absmax=st.state2.absmax,
            nested_quant_map=st.state2.code,
            offset=offset,
            shape=tuple(st.shape),
            dtype=st.dtype,
            block_size=int(st.blocksize),
            nested_block_size=int(st.state2.blocksize),
        )

    @property
    def device(self) -> torch.device:
        """Where the codes live."""
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name."""
        return {
            f: getattr(self, f)
            for f in ("data", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
        }

    @property
    def nbytes(self) -> int:
        """Bytes of all the tensors (codes, scales and both lookup tables)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def quant_state(self) -> Any:
        """The bitsandbytes ``QuantState`` over these tensors (no copies)."""
        qs = _bnb().QuantState
        state2 = qs(
            absmax=self.nested_absmax,
            code=self.nested_quant_map,
            blocksize=self.nested_block_size,
            dtype=torch.float32,
        )
        return qs(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.quant_map,
            blocksize=self.block_size,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )

    def dense(self) -> torch.Tensor:
        """The dequantised weight (``bitsandbytes.functional.dequantize_4bit``), a new tensor."""
        return _bnb().dequantize_4bit(self.data, self.quant_state())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``; the backward dequantises ``W`` again instead of saving it."""
        return _NF4Linear.apply(x, bias, self)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device``."""
        return attrs.evolve(self, **{k: v.to(device) for k, v in self.tensors().items()})


class _NF4Linear(torch.autograd.Function):
    """``F.linear`` on a dequantised NF4 weight that keeps only the codes for the backward."""

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, w: NF4Weight) -> torch.Tensor:
        return F.linear(x, w.dense(), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, bias, w = inputs
        ctx.w = w  # frozen codes: held by reference, no dense copy
        ctx.bias_dims = None if bias is None else bias.dim()

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        gx = gy @ ctx.w.dense() if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.bias_dims is not None and ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gb, None


def _placeholder(w: NF4Weight) -> torch.Tensor:
    # A meta tensor: right shape and dtype, no storage; any use that escapes the LoRA mode
    # fails loudly instead of computing with garbage.
    return torch.empty(w.shape, dtype=w.dtype, device="meta")


@attrs.frozen(kw_only=True, eq=False)
class QuantizedParams:
    """A params tree whose target weights are held as :class:`NF4Weight` (frozen).

    Attributes:
        dense: the leaves left as they were (embeddings, norms, the LM head …).
        weights: the quantised weights by dotted name.
        names: every leaf name in the original tree order.
    """

    dense: TensorDictBase
    weights: Mapping[str, NF4Weight]
    names: tuple[str, ...]
    _tree: TensorDict = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        flat = T.flatten(self.dense)
        missing = [n for n in self.names if n not in flat and n not in self.weights]
        if missing or len(self.names) != len(flat) + len(self.weights):
            raise ShapeError(
                f"QuantizedParams: names and leaves disagree (missing {missing[:3]}, "
                f"{len(flat)} dense + {len(self.weights)} quantised vs {len(self.names)} names)"
            )
        tree = T.unflatten(
            {
                n: (_placeholder(self.weights[n]) if n in self.weights else flat[n])
                for n in self.names
            }
        )
        object.__setattr__(self, "_tree", tree.lock_())

    def lora_view(self) -> tuple[TensorDictBase, Mapping[str, NF4Weight]]:
        """The tree ``apply_fn`` sees (meta placeholders for quantised leaves) and the weights."""
        return self._tree, self.weights

    def dequantize(self) -> TensorDict:
        """A dense params tree with every quantised weight dequantised (a full-size copy)."""
        flat = T.flatten(self.dense)
        return T.unflatten(
            {n: (self.weights[n].dense() if n in self.weights else flat[n]) for n in self.names}
        )

    def to(self, device: torch.device | str) -> QuantizedParams:
        """A copy on ``device``."""
        return QuantizedParams(
            dense=self.dense.to(device),
            weights={k: w.to(device) for k, w in self.weights.items()},
            names=self.names,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat ``{name: tensor}`` dict in the layout HF writes for bitsandbytes 4-bit
        checkpoints: ``<w>`` (codes), ``<w>.absmax``, ``<w>.quant_map``, ``<w>.nested_absmax``,
        ``<w>.nested_quant_map`` and ``<w>.quant_state.bitsandbytes__nf4`` (packed metadata).
        Reads the 0-d offset on the host."""
        flat = T.flatten(self.dense)
        out: dict[str, torch.Tensor] = {}
        for n in self.names:
            if n not in self.weights:
                out[n] = flat[n]
                continue
            w = self.weights[n]
            out[n] = w.data
            for k, v in w.quant_state().as_dict(packed=True).items():
                # the lookup tables are shared between weights: copy them (safetensors refuses
                # shared storage)
                out[f"{n}.{k}"] = v.clone() if k == "quant_map" else v
        return out

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None
    ) -> QuantizedParams:
        """The inverse of :meth:`state_dict` (also reads HF bitsandbytes 4-bit NF4 weights)."""
        qs_cls = _bnb().QuantState
        quant = [k[: -len(_QS_KEY) - 1] for k in state if k.endswith("." + _QS_KEY)]
        owned = {k for q in quant for k in state if k.startswith(q + ".")}
        names = tuple(k for k in state if k not in owned)
        weights: dict[str, NF4Weight] = {}
        for q in quant:
            data = state[q]
            dev = data.device if device is None else torch.device(device)
            parts = {k[len(q) + 1 :]: v for k, v in state.items() if k.startswith(q + ".")}
            st = qs_cls.from_dict(parts, device=dev)
            if st.quant_type != "nf4" or st.state2 is None:
                raise ShapeError(f"{q!r} is not NF4 with double quantisation; cannot load it")
            weights[q] = NF4Weight._from_state(data.to(dev), st)
        dense = {n: state[n] for n in names if n not in weights}
        dense_td = T.unflatten(dense)
        if device is not None:
            dense_td = dense_td.to(device)
        return cls(dense=dense_td, weights=weights, names=names)


def _share_tables(weights: dict[str, NF4Weight]) -> dict[str, NF4Weight]:
    """Point every weight at one copy of the (constant) NF4 and 8-bit lookup tables."""
    shared: dict[tuple[str, torch.device], torch.Tensor] = {}
    out = {}
    for name, w in weights.items():
        tables = {}
        for field in ("quant_map", "nested_quant_map"):
            t = getattr(w, field)
            first = shared.setdefault((field, t.device), t)
            tables[field] = first if torch.equal(first, t) else t
        out[name] = attrs.evolve(w, **tables)
    return out


def quantize_params(
    params: TensorDictBase, targets: Iterable[str] = DEFAULT_TARGETS, *, block_size: int = 64
) -> QuantizedParams:
    """Quantise the ``targets`` of ``params`` to NF4 with double quantisation (Dettmers et al.).

    Args:
        params: a dense params tree (left unchanged).
        targets: patterns over the dotted names, as :class:`~tscale.models.lora.LoraConfig`'s
            ``targets`` (default: the attention and MLP projections).
        block_size: elements per absmax block (64 as in the QLoRA paper).

    Raises:
        ShapeError: a pattern matches nothing or a non-matrix, or a weight is not a whole
            number of blocks.
    """
    flat = T.flatten(params)
    chosen = match_targets(
        {k: tuple(v.shape) for k, v in flat.items()}, targets, what="quantisation"
    )
    weights = {n: NF4Weight.quantize(flat[n], block_size=block_size) for n in chosen}
    weights = _share_tables(weights)
    dense = T.unflatten({k: v for k, v in flat.items() if k not in weights})
    return QuantizedParams(dense=dense, weights=weights, names=tuple(flat))


def quantized_bytes(q: QuantizedParams) -> dict[str, float]:
    """Memory of the quantised base vs the same params stored dense.

    Returns:
        ``quantized`` (bytes of the NF4 weights with all their state, shared lookup tables
        counted once), ``unquantized`` (the dense
        leaves), ``total``; the same params as ``fp32_total`` / ``bf16_total`` (every leaf in
        that dtype) and ``targets_fp32`` / ``targets_bf16``; ``bits_per_weight`` of the quantised
        weights; ``ratio_bf16`` = ``total / bf16_total``, ``ratio_fp32`` = ``total / fp32_total``.
    """
    seen: set[tuple[torch.device, int]] = set()
    q_bytes = 0
    for w in q.weights.values():  # count shared lookup tables once
        for t in w.tensors().values():
            ident = (t.device, t.untyped_storage().data_ptr())
            if ident not in seen:
                seen.add(ident)
                q_bytes += t.untyped_storage().nbytes()
    q_numel = sum(int(torch.Size(w.shape).numel()) for w in q.weights.values())
    dense_bytes = T.num_bytes(q.dense)
    dense_numel = T.num_elements(q.dense)
    total = q_bytes + dense_bytes
    numel = q_numel + dense_numel
    return {
        "quantized": q_bytes,
        "unquantized": dense_bytes,
        "total": total,
        "fp32_total": 4 * numel,
        "bf16_total": 2 * numel,
        "targets_fp32": 4 * q_numel,
        "targets_bf16": 2 * q_numel,
        "bits_per_weight": 8 * q_bytes / max(q_numel, 1),
        "ratio_fp32": total / max(4 * numel, 1),
        "ratio_bf16": total / max(2 * numel, 1),
    }


@attrs.frozen(kw_only=True, eq=False)
class QLoraModel(LoraModel):
    """A :class:`~tscale.models.lora.LoraModel` whose frozen base is :class:`QuantizedParams`.

    ``apply(adapters, batch)`` runs the base model with each quantised weight dequantised on the
    fly (and again in the backward) plus the LoRA update (Dettmers et al. 2023).
    """

    def __attrs_post_init__(self) -> None:
        if self.base is not None and not isinstance(self.base, QuantizedParams):
            raise TypeError(
                f"QLoraModel.base must be QuantizedParams (see quantize_params), got "
                f"{type(self.base).__name__}"
            )
        super().__attrs_post_init__()

    def memory(self, *, frozen: Frozen | None = None) -> dict[str, float]:
        """:func:`quantized_bytes` of the base."""
        base = self.base_of(frozen)
        if not isinstance(base, QuantizedParams):
            raise TypeError(f"QLoraModel base must be QuantizedParams, got {type(base).__name__}")
        return quantized_bytes(base)


def make_qlora_model(
    apply_fn: ApplyFn | LanguageModel,
    params: TensorDictBase,
    config: LoraConfig,
    *,
    quantize: Iterable[str] = DEFAULT_TARGETS,
    block_size: int = 64,
) -> QLoraModel:
    """Quantise ``params`` (the ``quantize`` patterns) and wrap them with LoRA ``config``.

    ``apply_fn``: the base model (a :class:`~tscale.models.protocol.LanguageModel`, which gives
    the whole protocol) or a bare ``apply(params, batch)`` (then ``apply`` only)."""
    base = quantize_params(params, quantize, block_size=block_size)
    if callable(getattr(apply_fn, "hidden_states", None)):
        return QLoraModel(model=apply_fn, base=base, config=config)
    return QLoraModel(apply_fn=apply_fn, base=base, config=config)


__all__ = [
    "BLOCK_SIZES",
    "NF4Weight",
    "QLoraModel",
    "QuantizedParams",
    "make_qlora_model",
    "quantize_params",
    "quantized_bytes",
]
