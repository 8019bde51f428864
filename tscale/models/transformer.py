"""One configurable decoder as pure functions over a params TensorDict named like the HF checkpoint.

``init(config, key) -> params`` and ``apply(config, params, batch) -> logits``. The parameters
are a nested ``TensorDict`` (``batch_size=[]``) whose dotted leaf names are exactly those of the
``transformers`` ``*ForCausalLM`` state dict of the configured family, so ``tree.flatten(params)``
loads into HF with ``load_state_dict`` and back.

The default is Llama (Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
2023): pre-norm RMSNorm, rotary position embeddings (Su et al., "RoFormer", 2021), grouped-query
attention (Ainslie et al., "GQA", 2023) and a SwiGLU MLP (Shazeer, "GLU Variants Improve
Transformer", 2020). ``TransformerConfig.family`` and a few switches give the other families:

- ``llama``: Llama 2/3.x, incl. llama3 RoPE scaling (``rope_scaling``) and optional biases.
- ``mistral``: sliding-window attention (Jiang et al., "Mistral 7B", 2023).
- ``qwen2``: bias on q/k/v; optional sliding window on the top layers.
- ``qwen3``: RMSNorm of each query/key head before RoPE (``q_norm``/``k_norm``).
- ``gemma``: embeddings scaled by sqrt(hidden), ``(1 + w)`` RMSNorm, GeGLU (tanh GELU).
- ``gemma2``: as gemma, plus attention and final logit soft-caps, alternating sliding/global
  layers, norms before and after attention and MLP, ``query_pre_attn_scalar`` (Gemma Team,
  "Gemma 2", 2024).
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` weights, optional partial rotary.

The differences are one table, :data:`tscale.models.families.TABLE` (one row per family), which
also holds the HF ``config.json`` mapping (``to_hf_dict``/``from_hf_dict`` delegate to it).

Packed rows: pass ``doc_ids`` ([B, S] ints) and restarting ``position_ids``; a token then attends
only to earlier tokens of its own document (and, in a sliding layer, only to the last
``sliding_window`` of them). Isolation comes from ``doc_ids`` alone: unlike HF (which guesses
document boundaries from restarting ``position_ids``), restarting positions without ``doc_ids``
change RoPE only.

Kernels: ``TransformerConfig.attention_backend`` and ``norm_backend`` are runtime switches (not
architecture; ``to_hf_dict`` leaves them out) that route the forward through
:func:`tscale.kernels.attention` (FlashAttention-2 in Triton on CUDA) and
:func:`tscale.kernels.rms_norm`. :func:`head_weight` is the LM head's weight, for a fused loss
(:func:`tscale.losses.lm.make_fused_lm_loss`) that never builds the [tokens, vocab] logits.

:class:`Transformer` implements the model protocol of :mod:`tscale.models.protocol` (every
method takes ``gather=`` and ``frozen=``), which the wrappers of :mod:`tscale.models.stack`,
:mod:`tscale.models.lora` and :mod:`tscale.parallel` implement again around it.

Incremental decoding: :func:`init_cache` preallocates a key/value cache, and
:func:`apply_with_cache` runs new tokens against it and returns it. Like a train step consumes its
state (see ``docs/design.md``), it consumes the cache it is given: it writes the new keys and values
into it in place and returns it; the caller uses only the returned cache.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.errors import ConfigError, ShapeError
from tscale.kernels import attention as kernel_attention
from tscale.kernels import rms_norm as kernel_rms_norm
from tscale.models.families import (
    DTYPE_NAMES,
    DTYPES,
    FAMILIES,
    FULL,
    SLIDING,
    TABLE,
    RopeScaling,
    config_from_hf,
    family_problems,
    to_hf_dict,
)
from tscale.models.protocol import Batch, Frozen, Gather

#: ``TransformerConfig.attention_backend``: ``"sdpa"`` is the model's own attention (PyTorch SDPA
#: with boolean masks, an explicit softmax under Gemma 2's soft-cap); the others call
#: :func:`tscale.kernels.attention` with that ``backend`` (``"auto"``: Triton on CUDA).
ATTENTION_BACKENDS = ("sdpa", "auto", "triton", "torch")
#: ``TransformerConfig.norm_backend``: ``"torch"`` is the model's own RMSNorm; ``"auto"`` and
#: ``"triton"`` call :func:`tscale.kernels.rms_norm` with that ``backend``.
NORM_BACKENDS = ("torch", "auto", "triton")

_DTYPE_NAMES, _DTYPES = DTYPE_NAMES, DTYPES  # the names older imports use

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ShapeError(f"TransformerConfig.{name} must be a positive int, got {value!r}")


def _optional_tuple(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class TransformerConfig:
    """Architecture of the decoder: the fields of the HF config that matter, family defaults Llama.

    ``num_kv_heads=None`` becomes ``num_heads``, ``head_dim=None`` becomes
    ``hidden_size // num_heads``, ``hidden_act=None`` becomes the family's activation (tanh GELU for
    Gemma, SiLU otherwise) and ``qkv_bias=None`` the family's (True for Qwen2) at construction,
    as HF does, so read them as concrete values afterwards. When you ``attrs.evolve`` the head
    counts or the family, pass those fields again.

    ``attention_backend`` and ``norm_backend`` choose implementations, not the architecture (see
    :data:`ATTENTION_BACKENDS`, :data:`NORM_BACKENDS`): every choice computes the same function,
    ``to_hf_dict`` omits them and ``from_hf_dict`` leaves them at their defaults (``"sdpa"``,
    ``"torch"``), so set them again (``attrs.evolve``) on a loaded config. Gemma's ``(1 + w)``
    norms always take the PyTorch path (the kernel scales by a weight in the activation dtype;
    Gemma computes ``1 + w`` in float32), so ``norm_backend="auto"`` leaves them as they are and
    ``"triton"`` is refused for Gemma families.

    Family traits that never vary within a family (``(1 + w)`` norms, embedding scale, norms
    around attention and MLP, q/k norms, fused projections) are properties, not fields.

    Raises:
        ShapeError: a size is not positive, ``num_heads`` does not divide ``hidden_size`` (with
            ``head_dim=None``), ``num_kv_heads`` does not divide ``num_heads``, or the rotary
            dimension is odd (RoPE rotates pairs).
        ConfigError: an unknown family or activation, or a switch the family's HF config cannot
            express (e.g. a sliding window on Llama, soft-caps outside Gemma 2), or an unknown
            ``attention_backend``/``norm_backend`` (``norm_backend="triton"`` on Gemma).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32
    family: str = "llama"
    hidden_act: str | None = None
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool | None = None
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_tuple)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    attention_backend: str = "sdpa"
    norm_backend: str = "torch"
    #: Runtime switch (not architecture): recompute each layer's activations in the backward
    #: instead of keeping them (``torch.utils.checkpoint``, non-reentrant).
    checkpoint_layers: bool = False

    def __attrs_post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
        ):
            _positive(name, getattr(self, name))
        if self.family not in FAMILIES:
            raise ConfigError(
                f"TransformerConfig.family {self.family!r} is not supported; supported: "
                f"{', '.join(FAMILIES)}"
            )
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _positive("num_kv_heads", self.num_kv_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ShapeError(
                    f"TransformerConfig: num_heads={self.num_heads} does not divide "
                    f"hidden_size={self.hidden_size}; pick a divisor or set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _positive("head_dim", self.head_dim)
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", TABLE[self.family].activation)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", TABLE[self.family].attention_bias == "qkv")
        if self.num_heads % self.num_kv_heads:
            raise ShapeError(
                f"TransformerConfig: num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads} (each key/value head serves a whole group of "
                f"query heads)"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ShapeError(
                f"TransformerConfig.partial_rotary_factor must be in (0, 1], got "
                f"{self.partial_rotary_factor}"
            )
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ShapeError(
                f"TransformerConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs "
                f"of dimensions); with partial_rotary_factor={self.partial_rotary_factor} the "
                f"rotary dimension is {self.rotary_dim}"
            )
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0 and self.init_std >= 0):
            raise ShapeError(
                f"TransformerConfig: rope_theta ({self.rope_theta}) and rms_norm_eps "
                f"({self.rms_norm_eps}) must be > 0 and init_std ({self.init_std}) >= 0"
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ShapeError(
                f"TransformerConfig.dtype must be a float torch.dtype, got {self.dtype!r}"
            )
        self._check_attention()
        self._check_family()
        self._check_backends()

    def _check_backends(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"TransformerConfig.attention_backend {self.attention_backend!r} is not one of "
                f"{', '.join(map(repr, ATTENTION_BACKENDS))}"
            )
        if self.norm_backend not in NORM_BACKENDS:
            raise ConfigError(
                f"TransformerConfig.norm_backend {self.norm_backend!r} is not one of "
                f"{', '.join(map(repr, NORM_BACKENDS))}"
            )
        if self.norm_backend == "triton" and self.norm_plus_one:
            raise ConfigError(
                f"TransformerConfig.norm_backend='triton' is not available for {self.family}: its "
                f"(1 + w) RMSNorm keeps the PyTorch path (use 'auto' or 'torch')"
            )

    def _check_attention(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"TransformerConfig.hidden_act {self.hidden_act!r} is not supported; supported: "
                f"{', '.join(_ACTIVATIONS)}"
            )
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ShapeError(
                    f"TransformerConfig.layer_types has {len(self.layer_types)} entries, "
                    f"num_layers is {self.num_layers}"
                )
            bad = sorted(set(self.layer_types) - {FULL, SLIDING})
            if bad:
                raise ConfigError(
                    f"TransformerConfig.layer_types: unknown {bad}; use {FULL!r} or {SLIDING!r}"
                )
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ConfigError(
                    "TransformerConfig.layer_types has sliding layers but sliding_window is None"
                )
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"TransformerConfig.{name} must be > 0 or None, got {value}")

    def _check_family(self) -> None:
        """Reject switches the family's HF config cannot express (so export stays faithful)."""
        problems = family_problems(self)
        if problems:
            raise ConfigError(f"TransformerConfig(family={self.family!r}): " + "; ".join(problems))

    # ------------------------------------------------------------ family traits

    @property
    def norm_plus_one(self) -> bool:
        """RMSNorm scales by ``1 + w`` (Gemma), computed in float32 before the cast back."""
        return TABLE[self.family].norm_plus_one

    @property
    def scale_embeddings(self) -> bool:
        """Embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma)."""
        return TABLE[self.family].scale_embeddings

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and before/after the MLP (Gemma 2)."""
        return TABLE[self.family].sandwich_norms

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over each query and key head before RoPE (Qwen3)."""
        return TABLE[self.family].qk_norm

    @property
    def fused_projections(self) -> bool:
        """One ``qkv_proj`` and one ``gate_up_proj`` weight (Phi-3)."""
        return TABLE[self.family].fused_projections

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head RoPE rotates."""
        assert self.head_dim is not None
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attn_scale(self) -> float | None:
        """Softmax scale ``query_pre_attn_scalar ** -0.5``; None means ``head_dim ** -0.5``."""
        if self.query_pre_attn_scalar is None:
            return None
        return float(self.query_pre_attn_scalar) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    # ------------------------------------------------------------ HF config.json

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json of this architecture (``model_type``, ``architectures`` included).

        The result also works as keyword arguments of the family's ``transformers`` config class
        (``LlamaConfig(**config.to_hf_dict())``).
        """
        return to_hf_dict(self)

    @classmethod
    def from_hf_dict(
        cls, hf: Mapping[str, Any], *, dtype: torch.dtype | None = None
    ) -> TransformerConfig:
        """The config of an HF ``config.json`` mapping (see :data:`FAMILIES` for what loads).

        Args:
            hf: the parsed config.json.
            dtype: the parameter dtype; default the file's ``dtype``/``torch_dtype`` (float32
                when absent).

        Raises:
            ConfigError: an unsupported ``model_type``/``architectures``, RoPE type or value.
        """
        return config_from_hf(cls, hf, dtype)


# ---------------------------------------------------------------- parameters


def param_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The HF-style dotted name and shape of every parameter, in checkpoint order."""
    c = config
    h, hd, im = c.hidden_size, c.head_dim, c.intermediate_size
    assert hd is not None and c.num_kv_heads is not None  # resolved in __attrs_post_init__
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        if c.fused_projections:
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, h)
                if c.qkv_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if c.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if c.fused_projections:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * im, h)
        else:
            for name in ("gate_proj", "up_proj"):
                shapes[p + f"mlp.{name}.weight"] = (im, h)
                if c.mlp_bias:
                    shapes[p + f"mlp.{name}.bias"] = (im,)
        shapes[p + "mlp.down_proj.weight"] = (h, im)
        if c.mlp_bias:
            shapes[p + "mlp.down_proj.bias"] = (h,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if c.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def init(
    config: TransformerConfig, key: torch.Tensor, *, device: torch.device | str = "cpu"
) -> TensorDict:
    """Fresh parameters: Normal(0, init_std) matrices and embeddings, zero biases, unit norms.

    Norm weights are ones, or zeros where the family scales by ``1 + w`` (Gemma), so every norm
    starts as the identity scale. Draws happen in float32 from one generator seeded by ``key`` in
    checkpoint order, then are cast to ``config.dtype``, so the same key gives the same values in
    every dtype.

    Args:
        config: the architecture.
        key: a key from :mod:`tscale.core.rng`.
        device: where the parameters live.

    Returns:
        A nested TensorDict (``batch_size=[]``) named like the family's HF state dict.
    """
    g = R.generator(key, device=device)
    flat: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            fill = 0.0 if config.norm_plus_one else 1.0
            t = torch.full(shape, fill, dtype=config.dtype, device=device)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=config.dtype, device=device)
        else:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            t.normal_(0.0, config.init_std, generator=g)
            t = t.to(config.dtype)
        flat[name] = t
    return T.unflatten(flat)


# ---------------------------------------------------------------- building blocks


def _get(batch: Batch, name: str) -> torch.Tensor | None:
    return batch.get(name, None)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF Llama: normalise in float32, cast back, then scale (the cast is a no-op in float32).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _plain_norm(config: TransformerConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm scaled by ``w`` (every family but Gemma; also Qwen3's q/k norms)."""
    if config.norm_backend == "torch":
        return _rms_norm(x, weight, config.rms_norm_eps)
    return kernel_rms_norm(x, weight, config.rms_norm_eps, backend=config.norm_backend)


def _norm(config: TransformerConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not config.norm_plus_one:
        return _plain_norm(config, x, weight)
    # Gemma keeps this path whatever norm_backend says: the kernel would need ``1 + w`` in the
    # activation dtype, which rounds a bf16 scale that HF computes in float32.
    # As HF Gemma: scale by (1 + w) in float32, then cast back.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def _inv_freq(config: TransformerConfig, device: torch.device) -> torch.Tensor:
    """RoPE inverse frequencies [rotary_dim / 2] in float32, with the configured scaling."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3 (Llama 3.1): keep high frequencies, divide low ones, interpolate in between.
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rope_tables(
    config: TransformerConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, [B|1, S, 1, rotary_dim], computed once per forward in float32."""
    freqs = position_ids[..., None].float() * _inv_freq(config, position_ids.device)
    cos, sin = freqs.cos(), freqs.sin()
    # rotate_half(x) * sin == swap_halves(x) * cat(-sin, sin): fold the sign into the table once.
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, S, heads, head_dim], HF's rotate_half convention (partial: leading dims)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((_apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def _doc_mask(doc_ids: torch.Tensor | None, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal mask [B, 1, S, S]: i attends j iff j <= i, same document, and (with ``branch_ids``)
    ``branch_ids[j]`` is 0 (a shared prompt) or ``branch_ids[i]`` (a sibling is never seen)."""
    ids = doc_ids if doc_ids is not None else branch_ids
    assert ids is not None
    s = ids.shape[-1]
    mask = torch.ones((s, s), dtype=torch.bool, device=ids.device).tril()
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if branch_ids is not None:
        kb = branch_ids[:, None, :]
        mask = mask & ((kb == 0) | (branch_ids[:, :, None] == kb))
    return mask[:, None]


def _window(q_slots: torch.Tensor, kv_slots: torch.Tensor, window: int) -> torch.Tensor:
    """[s, t] bool: key slot within the last ``window`` slots up to the query (HF's overlay)."""
    return kv_slots[None, :] > q_slots[:, None] - window


def _check_batch(
    ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    branch_ids: torch.Tensor | None = None,
) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ShapeError(
            f"batch['input_ids'] must be an integer tensor [batch, seq], got {ids.dtype} "
            f"{tuple(ids.shape)}"
        )
    b, s = ids.shape
    fields = (("position_ids", position_ids), ("doc_ids", doc_ids), ("branch_ids", branch_ids))
    for name, t in fields:
        if t is not None and (t.dim() != 2 or t.shape[0] not in (1, b) or t.shape[1] != s):
            raise ShapeError(
                f"batch[{name!r}] has shape {tuple(t.shape)}, input_ids has {(b, s)}; it must be "
                f"[{b}, {s}] (or [1, {s}] to share it across the batch)"
            )


def _linear(x: torch.Tensor, module: TensorDictBase, bias: bool) -> torch.Tensor:
    return F.linear(x, module["weight"], module["bias"] if bias else None)


def _attention(
    config: TransformerConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of q [B, nh, s, hd] over k, v [B, nkv, t, hd]; ``mask=None`` means causal.

    SDPA where it can; an explicit softmax where Gemma 2's soft-cap bends the scores
    (``tanh(scores / cap) * cap``, before masking), which SDPA has no hook for.
    """
    gqa = config.num_kv_heads != config.num_heads
    cap = config.attn_logit_softcap
    if cap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=config.attn_scale,
            enable_gqa=gqa,
        )
    if gqa:
        rep = config.num_heads // config.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = config.attn_scale or q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        s, t = q.shape[-2], k.shape[-2]
        mask = torch.ones((s, t), dtype=torch.bool, device=q.device).tril(t - s)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# attend(layer_index, q, k, v) -> o, with q [B, s, nh, hd], k/v [B, s, nkv, hd], o [B, nh, s, hd]
_Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Modes(contextlib.AbstractContextManager):
    """Re-enters a list of torch-function modes (bottom of the stack first); re-enterable."""

    def __init__(self, modes: list[Any]) -> None:
        self.modes = modes
        self.stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for mode in self.modes:
            stack.enter_context(mode)
        self.stacks.append(stack)

    def __exit__(self, *exc: Any) -> None:
        self.stacks.pop().close()


def _can_checkpoint() -> bool:
    """False inside an eager ``torch.func`` transform (``grad``, ``vmap``): it refuses the saved
    tensor hooks that checkpointing needs, so layers run plainly there (same values, no memory
    saving). ``torch.compile`` traces checkpoints as its own operator and keeps them."""
    eager_functorch = torch._C._functorch.maybe_current_level() is not None
    return torch.compiler.is_compiling() or not eager_functorch


def _replay_function_modes() -> tuple[contextlib.AbstractContextManager, _Modes]:
    """``context_fn`` of the layer checkpoint: the recomputation in the backward runs under the
    torch-function modes that were active in the forward (LoRA's interception of ``F.linear``),
    so it repeats the forward's ops. Torch itself replays only its device mode."""
    from torch.utils._device import DeviceContext  # torch restores that one itself

    stack = torch.overrides._get_current_function_mode_stack()
    return contextlib.nullcontext(), _Modes([m for m in stack if not isinstance(m, DeviceContext)])


def _decoder(
    config: TransformerConfig,
    params: TensorDictBase,
    ids: torch.Tensor,
    position_ids: torch.Tensor,
    attend: _Attend,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Embedding, the layers (attention through ``attend``) and the final norm: [B, s, H].

    ``gather`` (see :data:`Gather`) turns each layer's stored params into the ones it computes
    with, just before the layer runs (inside the recomputed region when checkpointing)."""
    model = params["model"]

    x = F.embedding(ids, model["embed_tokens", "weight"])
    if config.scale_embeddings:
        # As HF: sqrt(hidden) rounded to the parameter dtype first (55.4256 is 55.5 in bf16).
        x = x * torch.tensor(config.hidden_size**0.5, dtype=x.dtype, device=x.device)
    cos, sin = _rope_tables(config, position_ids, x.dtype)

    layers = model["layers"]
    run = _layer if gather is None else functools.partial(_gathered_layer, gather)
    checkpoint = config.checkpoint_layers and torch.is_grad_enabled() and _can_checkpoint()
    for i in range(config.num_layers):
        if checkpoint:
            # Under torch.compile the modes are traced into the graph (and compile accepts
            # only dispatch modes as context_fn), so the replay is for eager mode.
            kw = {} if torch.compiler.is_compiling() else {"context_fn": _replay_function_modes}
            args = (config, layers[str(i)], x, cos, sin, attend, i)
            x = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kw)
        else:
            x = run(config, layers[str(i)], x, cos, sin, attend, i)
    return _norm(config, x, model["norm", "weight"])


def _gathered_layer(
    gather: Gather,
    config: TransformerConfig,
    layer: TensorDictBase,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: _Attend,
    i: int,
) -> torch.Tensor:
    return _layer(config, gather(layer), x, cos, sin, attend, i)


def _gather_root(
    params: TensorDictBase, gather: Gather | None, *, head: bool = True
) -> TensorDictBase:
    """The params with everything outside ``model.layers`` (embedding, final norm, head)
    gathered once; the layers stay as stored and are gathered one at a time by ``_decoder``.
    ``head=False`` leaves an untied ``lm_head`` out (hidden states do not read it)."""
    if gather is None:
        return params
    skip: list[Any] = [("model", "layers")]
    if not head and "lm_head" in params.keys():  # noqa: SIM118 - a TensorDict's keys
        skip.append("lm_head")
    root = gather(params.exclude(*skip))
    root.set(("model", "layers"), params["model", "layers"])
    return root


def _layer(
    config: TransformerConfig,
    layer: TensorDictBase,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attend: _Attend,
    i: int,
) -> torch.Tensor:
    """One decoder layer: attention then MLP, each with its residual."""
    b, s = x.shape[:2]
    nh, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    assert nkv is not None and hd is not None
    act = _ACTIVATIONS[config.hidden_act or "silu"]
    attn, mlp = layer["self_attn"], layer["mlp"]

    h = _norm(config, x, layer["input_layernorm", "weight"])
    if config.fused_projections:
        qkv = F.linear(h, attn["qkv_proj", "weight"])
        q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    else:
        q = _linear(h, attn["q_proj"], bool(config.qkv_bias))
        k = _linear(h, attn["k_proj"], bool(config.qkv_bias))
        v = _linear(h, attn["v_proj"], bool(config.qkv_bias))
    q, k, v = q.view(b, s, nh, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
    if config.qk_norm:
        q = _plain_norm(config, q, attn["q_norm", "weight"])
        k = _plain_norm(config, k, attn["k_norm", "weight"])
    o = attend(i, _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v)
    o = _linear(o.transpose(1, 2).reshape(b, s, nh * hd), attn["o_proj"], config.o_bias)
    if config.sandwich_norms:
        o = _norm(config, o, layer["post_attention_layernorm", "weight"])
    x = x + o

    norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    h = _norm(config, x, layer[norm, "weight"])
    if config.fused_projections:
        gate, up = F.linear(h, mlp["gate_up_proj", "weight"]).chunk(2, dim=-1)
    else:
        gate = _linear(h, mlp["gate_proj"], config.mlp_bias)
        up = _linear(h, mlp["up_proj"], config.mlp_bias)
    m = _linear(act(gate) * up, mlp["down_proj"], config.mlp_bias)
    if config.sandwich_norms:
        m = _norm(config, m, layer["post_feedforward_layernorm", "weight"])
    x = x + m
    return x


def _kernel_attend(
    config: TransformerConfig,
    doc_ids: torch.Tensor | None,
    branch_ids: torch.Tensor | None = None,
) -> _Attend:
    """``attend`` through :func:`tscale.kernels.attention`: no [S, S] masks are built; documents,
    shared-prefix branches, the layer's window, the soft-cap, the scale and GQA go to the kernel
    as arguments."""
    backend = config.attention_backend

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, s, heads, hd] -> [B, heads, s, hd] views; the output keeps q's layout, so the
        # caller's transpose back to [B, s, heads, hd] is free too.
        return kernel_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=True,
            doc_ids=doc_ids,
            branch_ids=branch_ids,
            window=config.sliding_window if config.is_sliding(i) else None,
            softcap=config.attn_logit_softcap,
            scale=config.attn_scale,
            backend=backend,
        )

    return attend


# ---------------------------------------------------------------- the model without a cache


def hidden_states(
    config: TransformerConfig,
    params: TensorDictBase,
    batch: Batch,
    *,
    gather: Gather | None = None,
) -> torch.Tensor:
    """The final-normed hidden states [B, S, hidden_size] (the input of the LM head).

    Args:
        config: the architecture.
        params: the tree from :func:`init` (or an HF checkpoint with the same names).
        batch: ``input_ids`` [B, S] int64; optional ``position_ids`` [B|1, S] (default
            ``0..S-1``) and ``doc_ids`` [B|1, S] (block-diagonal causal attention: a token sees
            earlier tokens with the same doc id only; sliding layers also limit the distance)
            and ``branch_ids`` [B|1, S] (shared-prompt groups, :mod:`tscale.data.groups`: a
            token sees an earlier one of its document only if that one's branch id is 0 or its
            own; sliding windows are then measured in ``position_ids``).
        gather: how stored params become the params computed with (:data:`Gather`; FSDP
            all-gathers shards here). None: the params are used as they are.

    With ``batch["logits_index"]`` [B, M] (the positions the loss reads, from
    :func:`tscale.data.loader.with_logits_index`) the result is [B, M, hidden_size]: the hidden
    states at those positions only, so the LM head runs on the trained positions alone.

    Raises:
        ShapeError: ``input_ids`` is not [B, S] ints or the optional fields disagree in shape.
    """
    root = _gather_root(params, gather, head=False)
    return _at_logits_index(_hidden(config, root, batch, gather), batch)


def _at_logits_index(h: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``h`` [B, S, H] at ``batch["logits_index"]`` [B, M] when the batch has one."""
    index = batch.get("logits_index", None)
    if index is None:
        return h
    return h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def _hidden(
    config: TransformerConfig, params: TensorDictBase, batch: Batch, gather: Gather | None
) -> torch.Tensor:
    ids = batch["input_ids"]
    position_ids = _get(batch, "position_ids")
    doc_ids = _get(batch, "doc_ids")
    branch_ids = _get(batch, "branch_ids")
    _check_batch(ids, position_ids, doc_ids, branch_ids)
    s = ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(s, device=ids.device)[None]
    if config.attention_backend != "sdpa":
        sliding = any(config.is_sliding(i) for i in range(config.num_layers))
        short = sliding and config.sliding_window is not None and config.sliding_window < s
        if branch_ids is not None and short:  # the kernels count window slots in the row
            raise ShapeError(
                "batch['branch_ids'] with a sliding window needs attention_backend 'sdpa' (it "
                "measures the window in position_ids, as the unpacked sequence has it)"
            )
        attend = _kernel_attend(config, doc_ids, branch_ids)
        return _decoder(config, params, ids, position_ids, attend, gather)

    masked = doc_ids is not None or branch_ids is not None
    full = _doc_mask(doc_ids, branch_ids) if masked else None
    sliding = None
    if any(config.is_sliding(i) for i in range(config.num_layers)):
        assert config.sliding_window is not None
        slots = torch.arange(s, device=ids.device)
        near = _window(slots, slots, config.sliding_window)
        if branch_ids is not None:  # siblings sit between a branch and its prompt: use positions
            near = position_ids[:, None, :] > position_ids[:, :, None] - config.sliding_window
            near = near[:, None]
        base = full if full is not None else torch.ones_like(near).tril()[None, None]
        sliding = base & near

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = sliding if config.is_sliding(i) else full
        return _attention(config, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)

    return _decoder(config, params, ids, position_ids, attend, gather)


def head_weight(
    config: TransformerConfig, params: TensorDictBase, *, gather: Gather | None = None
) -> torch.Tensor:
    """The LM head's weight [vocab_size, hidden_size]: ``lm_head.weight``, or the input embedding
    ``model.embed_tokens.weight`` when ``tie_word_embeddings``.

    With ``gather`` the weight is gathered on its own (a group of one leaf): a fused loss reads
    it beside :func:`hidden_states`, which gathers the rest (FSDP: a tied embedding is then
    all-gathered twice, once for the input and once for the head).

    ``logits = hidden @ head_weight.T``, then Gemma 2's final soft-cap
    (``config.final_logit_softcap``), which is not part of the weight: a fused loss must apply it
    (``linear_cross_entropy(..., softcap=config.final_logit_softcap)``). Gemma's
    ``sqrt(hidden_size)`` scale belongs to the input embedding only and never to the head.
    """
    path = ("model", "embed_tokens") if config.tie_word_embeddings else ("lm_head",)
    w = params[(*path, "weight")]
    if gather is None:
        return w
    return gather(TensorDict({"weight": w}, batch_size=[]))["weight"]


def logits_from_hidden(
    config: TransformerConfig, params: TensorDictBase, h: torch.Tensor
) -> torch.Tensor:
    """The LM head: logits [..., vocab_size] from final hidden states (tied or not).

    Includes Gemma 2's final soft-cap ``tanh(logits / cap) * cap``; a fused loss that takes
    :func:`head_weight` directly must apply it too.
    """
    logits = F.linear(h, head_weight(config, params))
    cap = config.final_logit_softcap
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def apply(
    config: TransformerConfig,
    params: TensorDictBase,
    batch: Batch,
    *,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Logits [B, S, vocab_size] of the decoder, or [B, M, vocab_size] at
    ``batch["logits_index"]`` (see :func:`hidden_states` for ``batch`` and ``gather``)."""
    params = _gather_root(params, gather)
    h = _at_logits_index(_hidden(config, params, batch, gather), batch)
    return logits_from_hidden(config, params, h)


# ---------------------------------------------------------------- the model with a KV cache


def init_cache(
    config: TransformerConfig,
    batch_size: int,
    max_length: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> TensorDict:
    """An empty key/value cache for ``batch_size`` rows of up to ``max_length`` tokens.

    Returns:
        A TensorDict with ``k`` and ``v`` [num_layers, B, num_kv_heads, max_length, head_dim]
        (``dtype`` default ``config.dtype``) and ``doc_ids`` [B, max_length] (-1: empty slot).
    """
    _positive("batch_size", batch_size)
    _positive("max_length", max_length)
    assert config.num_kv_heads is not None and config.head_dim is not None
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
    dt = dtype or config.dtype
    return TensorDict(
        {
            "k": torch.zeros(shape, dtype=dt, device=device),
            "v": torch.zeros(shape, dtype=dt, device=device),
            "doc_ids": torch.full((batch_size, max_length), -1, dtype=torch.int64, device=device),
        },
        batch_size=[],
    )


def apply_with_cache(
    config: TransformerConfig,
    params: TensorDictBase,
    batch: Batch,
    cache: TensorDictBase,
    offset: int,
    *,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, TensorDictBase]:
    """Logits of new tokens that attend to the cached ones; returns ``(logits, cache)``.

    The new tokens take cache slots ``offset .. offset + S - 1`` (the same slots for every row;
    rows of different lengths are left-padded). Token i attends slot j iff ``j <= offset + i``,
    both carry the same doc id and, in a sliding layer, ``offset + i - j < sliding_window`` —
    the masks of :func:`apply`, so prefilling with a whole sequence gives :func:`apply`'s logits,
    and feeding the same tokens one at a time gives them too.

    The cache is consumed (its tensors are written in place) and returned; use only the
    returned one afterwards.

    Args:
        config: the architecture.
        params: the parameters.
        batch: ``input_ids`` [B, S]; optional ``position_ids`` [B|1, S] (RoPE positions,
            default ``offset + 0..S-1``) and ``doc_ids`` [B|1, S] (default 0).
        cache: from :func:`init_cache` or the previous call.
        offset: how many slots earlier calls filled.
        gather: as for :func:`hidden_states`.

    Raises:
        ShapeError: the batch is malformed or does not fit the cache.
    """
    params = _gather_root(params, gather)
    ids = batch["input_ids"]
    position_ids = _get(batch, "position_ids")
    doc_ids = _get(batch, "doc_ids")
    _check_batch(ids, position_ids, doc_ids)
    b, s = ids.shape
    ck, cv, cdoc = cache["k"], cache["v"], cache["doc_ids"]
    end = offset + s
    if offset < 0 or end > ck.shape[3] or ck.shape[1] != b:
        raise ShapeError(
            f"apply_with_cache: {b} rows x {s} new tokens at offset {offset} do not fit a cache "
            f"of {ck.shape[1]} rows x {ck.shape[3]} slots"
        )
    dev = ids.device
    if position_ids is None:
        position_ids = (offset + torch.arange(s, device=dev))[None]
    docs = torch.zeros_like(ids) if doc_ids is None else doc_ids.expand(b, s)
    cdoc[:, offset:end] = docs

    # The cache path keeps the model's SDPA attention whatever ``attention_backend`` says: the
    # kernel is a training kernel (queries and keys of the same length, no cache slots, no
    # decoding step of one query against many keys), and decoding is dominated by reading the
    # cache, not by the attention arithmetic the kernel saves.
    q_slots = offset + torch.arange(s, device=dev)
    kv_slots = torch.arange(end, device=dev)
    causal = kv_slots[None, :] <= q_slots[:, None]
    full = (causal & (docs[:, :, None] == cdoc[:, None, :end]))[:, None]  # [B, 1, s, end]
    sliding = None
    if config.sliding_window is not None:
        sliding = full & _window(q_slots, kv_slots, config.sliding_window)

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck[i, :, :, offset:end] = k.transpose(1, 2)
        cv[i, :, :, offset:end] = v.transpose(1, 2)
        mask = sliding if config.is_sliding(i) else full
        # .to: a no-op unless the cache was made in another dtype than the params compute in.
        keys, values = ck[i, :, :, :end].to(q.dtype), cv[i, :, :, :end].to(q.dtype)
        return _attention(config, q.transpose(1, 2), keys, values, mask)

    h = _decoder(config, params, ids, position_ids, attend, gather)
    return logits_from_hidden(config, params, h), cache


@attrs.frozen
class Transformer:
    """A decoder: a config and the pure functions bound to it, held as one object.

    Implements :class:`~tscale.models.protocol.LanguageModel`; ``frozen`` is accepted
    everywhere and ignored (a plain decoder has no frozen trees).
    """

    config: TransformerConfig

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's final logit soft-cap (None for other families)."""
        return self.config.final_logit_softcap

    def init(
        self,
        key: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        frozen: Frozen | None = None,
    ) -> TensorDict:
        """Fresh parameters from a key (see :func:`init`)."""
        return init(self.config, key, device=device)

    def apply(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] (see :func:`apply`)."""
        return apply(self.config, params, batch, gather=gather)

    def hidden_states(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, S, H] (see :func:`hidden_states`)."""
        return hidden_states(self.config, params, batch, gather=gather)

    def logits_from_hidden(
        self,
        params: TensorDictBase,
        h: torch.Tensor,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The LM head applied to hidden states (see :func:`logits_from_hidden`)."""
        if gather is None:
            return logits_from_hidden(self.config, params, h)
        logits = F.linear(h, head_weight(self.config, params, gather=gather))
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def head_weight(
        self,
        params: TensorDictBase,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """The LM head's weight [V, H], tied or not (see :func:`head_weight`)."""
        return head_weight(self.config, params, gather=gather)

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        frozen: Frozen | None = None,
    ) -> TensorDict:
        """An empty KV cache (see :func:`init_cache`)."""
        return init_cache(self.config, batch_size, max_length, dtype=dtype, device=device)

    def apply_with_cache(
        self,
        params: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        offset: int,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> tuple[torch.Tensor, TensorDictBase]:
        """Logits of new tokens against the cache, and the cache (see :func:`apply_with_cache`)."""
        return apply_with_cache(self.config, params, batch, cache, offset, gather=gather)

    def num_params(self, params: TensorDictBase | None = None) -> int:
        """Number of scalar parameters (of ``params``, or of the config's shapes when None)."""
        if params is not None:
            return T.num_elements(params)
        total = 0
        for shape in param_shapes(self.config).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total
