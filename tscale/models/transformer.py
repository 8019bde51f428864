"""A Llama-style decoder as pure functions over a params TensorDict named like the HF checkpoint.

``init(config, key) -> params`` and ``apply(config, params, batch) -> logits``. The parameters
are a nested ``TensorDict`` (``batch_size=[]``) whose dotted leaf names are exactly those of a
``transformers`` ``LlamaForCausalLM`` state dict, so ``tree.flatten(params)`` loads into HF with
``load_state_dict`` and back. Architecture as in Touvron et al., "LLaMA: Open and Efficient
Foundation Language Models" (2023): pre-norm RMSNorm, rotary position embeddings (Su et al.,
"RoFormer", 2021), grouped-query attention (Ainslie et al., "GQA", 2023) and a SwiGLU MLP
(Shazeer, "GLU Variants Improve Transformer", 2020).

Packed rows: pass ``doc_ids`` ([B, S] ints) and restarting ``position_ids``; a token then attends
only to earlier tokens of its own document, on every attention backend. Isolation comes from
``doc_ids`` alone: unlike HF (which guesses document boundaries from restarting ``position_ids``,
and only when no KV cache is in use), restarting positions without ``doc_ids`` change RoPE only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.errors import ShapeError

Batch = TensorDictBase | Mapping[str, torch.Tensor]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ShapeError(f"TransformerConfig.{name} must be a positive int, got {value!r}")


@attrs.frozen(kw_only=True)
class TransformerConfig:
    """Architecture of a Llama-style decoder (the fields of HF ``LlamaConfig`` that matter).

    ``num_kv_heads=None`` becomes ``num_heads`` and ``head_dim=None`` becomes
    ``hidden_size // num_heads`` at construction (as HF does), so read them as ints afterwards.
    When you ``attrs.evolve`` the head counts, pass ``num_kv_heads``/``head_dim`` again.

    Raises:
        ShapeError: a size is not positive, ``num_heads`` does not divide ``hidden_size`` (with
            ``head_dim=None``), ``num_kv_heads`` does not divide ``num_heads``, or ``head_dim``
            is odd (RoPE rotates pairs).
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

    def __attrs_post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings"):
            _positive(name, getattr(self, name))
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
        if self.num_heads % self.num_kv_heads:
            raise ShapeError(
                f"TransformerConfig: num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads} (each key/value head serves a whole group of "
                f"query heads)"
            )
        if self.head_dim % 2:
            raise ShapeError(
                f"TransformerConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs "
                f"of dimensions)"
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

    def to_hf_dict(self) -> dict[str, Any]:
        """The keyword arguments of ``transformers.LlamaConfig`` for the same architecture."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.init_std,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": _DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch.")),
        }


def param_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The HF-style dotted name and shape of every parameter, in checkpoint order."""
    c = config
    h, hd = c.hidden_size, c.head_dim
    assert hd is not None and c.num_kv_heads is not None  # resolved in __attrs_post_init__
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (c.num_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (c.num_kv_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (c.num_kv_heads * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.num_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def init(
    config: TransformerConfig, key: torch.Tensor, *, device: torch.device | str = "cpu"
) -> TensorDict:
    """Fresh parameters: Normal(0, init_std) matrices and embeddings, ones for the norms.

    Draws happen in float32 from one generator seeded by ``key`` in checkpoint order, then are
    cast to ``config.dtype``, so the same key gives the same values in every dtype.

    Args:
        config: the architecture.
        key: a key from :mod:`tscale.core.rng`.
        device: where the parameters live.

    Returns:
        A nested TensorDict (``batch_size=[]``) named like the HF ``LlamaForCausalLM`` state dict.
    """
    g = R.generator(key, device=device)
    flat: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=config.dtype, device=device)
        else:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            t.normal_(0.0, config.init_std, generator=g)
            t = t.to(config.dtype)
        flat[name] = t
    return T.unflatten(flat)


def _get(batch: Batch, name: str) -> torch.Tensor | None:
    return batch.get(name, None)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF: normalise in float32, cast back, then scale (the cast is a no-op in float32).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope_tables(
    config: TransformerConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, [B|1, S, 1, head_dim], computed once per forward in float32."""
    hd = config.head_dim
    assert hd is not None
    dev = position_ids.device
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=dev) / hd)
    )
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, hd/2]
    cos, sin = freqs.cos(), freqs.sin()
    # rotate_half(x) * sin == swap_halves(x) * cat(-sin, sin): fold the sign into the table once.
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, S, heads, head_dim], HF's rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def _doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, S, S]: i attends j iff j <= i and same document."""
    s = doc_ids.shape[-1]
    causal = torch.ones((s, s), dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def _check_batch(ids: torch.Tensor, position_ids: torch.Tensor | None,
                 doc_ids: torch.Tensor | None) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ShapeError(
            f"batch['input_ids'] must be an integer tensor [batch, seq], got {ids.dtype} "
            f"{tuple(ids.shape)}"
        )
    b, s = ids.shape
    for name, t in (("position_ids", position_ids), ("doc_ids", doc_ids)):
        if t is not None and (t.dim() != 2 or t.shape[0] not in (1, b) or t.shape[1] != s):
            raise ShapeError(
                f"batch[{name!r}] has shape {tuple(t.shape)}, input_ids has {(b, s)}; it must be "
                f"[{b}, {s}] (or [1, {s}] to share it across the batch)"
            )


def hidden_states(config: TransformerConfig, params: TensorDictBase, batch: Batch) -> torch.Tensor:
    """The final-normed hidden states [B, S, hidden_size] (the input of the LM head).

    Args:
        config: the architecture.
        params: the tree from :func:`init` (or an HF checkpoint with the same names).
        batch: ``input_ids`` [B, S] int64; optional ``position_ids`` [B|1, S] (default
            ``0..S-1``) and ``doc_ids`` [B|1, S] (block-diagonal causal attention: a token sees
            earlier tokens with the same doc id only).

    Raises:
        ShapeError: ``input_ids`` is not [B, S] ints or the optional fields disagree in shape.
    """
    ids = batch["input_ids"]
    position_ids = _get(batch, "position_ids")
    doc_ids = _get(batch, "doc_ids")
    _check_batch(ids, position_ids, doc_ids)
    b, s = ids.shape
    nh, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    model = params["model"]

    x = F.embedding(ids, model["embed_tokens", "weight"])
    if position_ids is None:
        position_ids = torch.arange(s, device=ids.device)[None]
    cos, sin = _rope_tables(config, position_ids, x.dtype)
    mask = None if doc_ids is None else _doc_mask(doc_ids)
    gqa = nkv != nh

    layers = model["layers"]
    for i in range(config.num_layers):
        layer = layers[str(i)]
        attn, mlp = layer["self_attn"], layer["mlp"]

        h = _rms_norm(x, layer["input_layernorm", "weight"], eps)
        q = _apply_rope(F.linear(h, attn["q_proj", "weight"]).view(b, s, nh, hd), cos, sin)
        k = _apply_rope(F.linear(h, attn["k_proj", "weight"]).view(b, s, nkv, hd), cos, sin)
        v = F.linear(h, attn["v_proj", "weight"]).view(b, s, nkv, hd)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
        )
        x = x + F.linear(o.transpose(1, 2).reshape(b, s, nh * hd), attn["o_proj", "weight"])

        h = _rms_norm(x, layer["post_attention_layernorm", "weight"], eps)
        gate = F.linear(h, mlp["gate_proj", "weight"])
        up = F.linear(h, mlp["up_proj", "weight"])
        x = x + F.linear(F.silu(gate) * up, mlp["down_proj", "weight"])

    return _rms_norm(x, model["norm", "weight"], eps)


def logits_from_hidden(
    config: TransformerConfig, params: TensorDictBase, h: torch.Tensor
) -> torch.Tensor:
    """The LM head: logits [..., vocab_size] from final hidden states (tied or not)."""
    if config.tie_word_embeddings:
        w = params["model", "embed_tokens", "weight"]
    else:
        w = params["lm_head", "weight"]
    return F.linear(h, w)


def apply(config: TransformerConfig, params: TensorDictBase, batch: Batch) -> torch.Tensor:
    """Logits [B, S, vocab_size] of the decoder (see :func:`hidden_states` for ``batch``)."""
    return logits_from_hidden(config, params, hidden_states(config, params, batch))


@attrs.frozen
class Transformer:
    """A Llama-style model: a config and the pure functions bound to it, held as one object."""

    config: TransformerConfig

    def init(self, key: torch.Tensor, *, device: torch.device | str = "cpu") -> TensorDict:
        """Fresh parameters from a key (see :func:`init`)."""
        return init(self.config, key, device=device)

    def apply(self, params: TensorDictBase, batch: Batch) -> torch.Tensor:
        """Logits [B, S, V] (see :func:`apply`)."""
        return apply(self.config, params, batch)

    def hidden_states(self, params: TensorDictBase, batch: Batch) -> torch.Tensor:
        """Final-normed hidden states [B, S, H] (see :func:`hidden_states`)."""
        return hidden_states(self.config, params, batch)

    def logits_from_hidden(self, params: TensorDictBase, h: torch.Tensor) -> torch.Tensor:
        """The LM head applied to hidden states (see :func:`logits_from_hidden`)."""
        return logits_from_hidden(self.config, params, h)

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
