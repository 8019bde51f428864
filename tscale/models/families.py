"""The supported HF families as a table, and the mapping between HF ``config.json`` and
:class:`~tscale.models.transformer.TransformerConfig`.

Every difference between the families that tscale's one decoder implements is a column of
:data:`TABLE` (one :class:`Family` row per HF ``model_type``): the decoder reads the traits
(``(1 + w)`` norms, embedding scale, sandwich norms, q/k norms, fused projections) from it, the
config checks read which switches a family's HF config can express (biases, sliding windows,
soft-caps, partial rotary) from it, and :func:`to_hf_dict` / :func:`config_from_hf` read the
keys each family writes. Adding a family that differs only in these columns is one row.

Pure: no I/O (the files are read in ``tscale.checkpoint.hf``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs
import torch

from tscale.errors import ConfigError

if TYPE_CHECKING:
    from tscale.models.transformer import TransformerConfig

FULL, SLIDING = "full_attention", "sliding_attention"

#: ``Family.attention_bias``: ``"switch"`` one ``attention_bias`` key for q/k/v and o;
#: ``"qkv"`` q/k/v always biased, o never (Qwen2); ``"none"`` no attention biases at all.
AttentionBias = Literal["switch", "qkv", "none"]
#: ``Family.sliding``: ``"none"`` no sliding windows; ``"all"`` a window on every layer or on
#: none (Mistral, Phi-3: one ``sliding_window`` key); ``"upper"`` the layers from
#: ``max_window_layers`` on, when ``use_sliding_window`` (Qwen2/3, or explicit ``layer_types``);
#: ``"alternate"`` every other layer starting with the first, a window always set (Gemma 2).
Sliding = Literal["none", "all", "upper", "alternate"]


@attrs.frozen(kw_only=True)
class Family:
    """One row of :data:`TABLE`: how a family differs from Llama.

    Attributes:
        architecture: the ``architectures`` entry of its config.json (the causal-LM class).
        activation: the default MLP activation (``hidden_act`` when the config has none).
        activation_key: the config.json key of the activation.
        tanh_gelu_alias: config.json's ``"gelu"`` means tanh GELU (Gemma's legacy value).
        norm_plus_one: RMSNorm scales by ``1 + w`` in float32 (Gemma).
        scale_embeddings: embeddings times ``sqrt(hidden_size)`` (Gemma).
        tied_by_default: ``tie_word_embeddings`` when config.json does not say.
        sandwich_norms: norms after attention and before/after the MLP (Gemma 2).
        qk_norm: RMSNorm over each query/key head before RoPE (Qwen3).
        fused_projections: one ``qkv_proj`` and one ``gate_up_proj`` weight (Phi-3).
        attention_bias: which attention biases exist (:data:`AttentionBias`).
        mlp_bias: an ``mlp_bias`` switch exists (Llama).
        sliding: how sliding windows are laid out (:data:`Sliding`).
        softcaps: attention/final logit soft-caps and ``query_pre_attn_scalar`` (Gemma 2).
        partial_rotary: ``partial_rotary_factor`` exists (Phi-3).
        rope_original_at_top: llama3 RoPE's original length is read from config.json's top
            level first (Phi-3).
    """

    architecture: str
    activation: str = "silu"
    activation_key: str = "hidden_act"
    tanh_gelu_alias: bool = False
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    tied_by_default: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    fused_projections: bool = False
    attention_bias: AttentionBias = "switch"
    mlp_bias: bool = False
    sliding: Sliding = "none"
    softcaps: bool = False
    partial_rotary: bool = False
    rope_original_at_top: bool = False


_GEMMA = {
    "activation": "gelu_pytorch_tanh",
    "norm_plus_one": True,
    "scale_embeddings": True,
    "tied_by_default": True,
}

#: The supported families by HF ``model_type``, one row each.
TABLE: dict[str, Family] = {
    "llama": Family(architecture="LlamaForCausalLM", mlp_bias=True),
    "mistral": Family(architecture="MistralForCausalLM", attention_bias="none", sliding="all"),
    "qwen2": Family(architecture="Qwen2ForCausalLM", attention_bias="qkv", sliding="upper"),
    "qwen3": Family(architecture="Qwen3ForCausalLM", qk_norm=True, sliding="upper"),
    "gemma": Family(architecture="GemmaForCausalLM", tanh_gelu_alias=True, **_GEMMA),
    "gemma2": Family(
        architecture="Gemma2ForCausalLM",
        activation_key="hidden_activation",
        sandwich_norms=True,
        sliding="alternate",
        softcaps=True,
        **_GEMMA,
    ),
    "phi3": Family(
        architecture="Phi3ForCausalLM",
        fused_projections=True,
        attention_bias="none",
        sliding="all",
        partial_rotary=True,
        rope_original_at_top=True,
    ),
}

#: The supported families: HF ``model_type`` -> the ``architectures`` entry of its config.json.
FAMILIES: dict[str, str] = {name: row.architecture for name, row in TABLE.items()}

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@attrs.frozen(kw_only=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` (all divided by ``factor``) or Llama 3.1's ``llama3``.

    ``llama3`` divides low frequencies (wavelength above
    ``original_max_position_embeddings / low_freq_factor``) by ``factor``, keeps high ones
    (below ``.../high_freq_factor``) and interpolates smoothly in between, as HF does.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __attrs_post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(
                f"RoPE scaling type {self.rope_type!r} is not supported; supported: 'linear', "
                f"'llama3' (or none)"
            )
        if not self.factor > 0 or (
            self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0
        ):
            raise ConfigError(
                f"RoPE scaling: factor ({self.factor}) must be > 0 and high_freq_factor "
                f"({self.high_freq_factor}) > low_freq_factor ({self.low_freq_factor}) > 0"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The entries of HF ``rope_parameters`` for this scaling."""
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": float(self.factor)}
        return {
            "rope_type": "llama3",
            "factor": float(self.factor),
            "low_freq_factor": float(self.low_freq_factor),
            "high_freq_factor": float(self.high_freq_factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
        }


# ---------------------------------------------------------------- checks


def family_problems(c: TransformerConfig) -> list[str]:
    """The switches of ``c`` that its family's HF config cannot express (empty: none)."""
    f, row = c.family, TABLE[c.family]
    problems = []
    if row.attention_bias == "qkv" and (not c.qkv_bias or c.o_bias):
        problems.append(f"{f} has a bias on q/k/v only (qkv_bias=True, o_bias=False)")
    elif row.attention_bias == "none" and (c.qkv_bias or c.o_bias):
        problems.append(f"{f} has no attention biases")
    elif row.attention_bias == "switch" and c.qkv_bias != c.o_bias:
        problems.append(f"{f} has one attention_bias switch: qkv_bias must equal o_bias")
    if c.mlp_bias and not row.mlp_bias:
        problems.append(f"mlp_bias exists on {_having('mlp_bias')} only")
    if c.sliding_window is not None and row.sliding == "none":
        problems.append(f"{f} has no sliding-window attention")
    if row.sliding == "all" and c.layer_types not in (None, (SLIDING,) * c.num_layers):
        problems.append(f"{f} slides on all layers or none (leave layer_types None)")
    if row.sliding == "alternate" and c.sliding_window is None:
        problems.append(f"{f} needs sliding_window")
    if not row.softcaps:
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(c, name) is not None:
                problems.append(f"{name} exists on {_having('softcaps')} only")
    if c.partial_rotary_factor != 1.0 and not row.partial_rotary:
        problems.append(f"partial_rotary_factor exists on {_having('partial_rotary')} only")
    return problems


def _having(trait: str) -> str:
    return ", ".join(name for name, row in TABLE.items() if getattr(row, trait))


# ---------------------------------------------------------------- config.json out


def _layer_types(c: TransformerConfig) -> list[str]:
    return [SLIDING if c.is_sliding(i) else FULL for i in range(c.num_layers)]


def to_hf_dict(c: TransformerConfig) -> dict[str, Any]:
    """The HF config.json of ``c`` (see ``TransformerConfig.to_hf_dict``)."""
    f, row = c.family, TABLE[c.family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(c.rope_theta)}
    if c.rope_scaling is not None:
        rope.update(c.rope_scaling.to_hf_dict())
    if row.partial_rotary:
        rope["partial_rotary_factor"] = float(c.partial_rotary_factor)
    out: dict[str, Any] = {
        "model_type": f,
        "architectures": [row.architecture],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": rope,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.init_std,
        "dtype": DTYPE_NAMES.get(c.dtype, str(c.dtype).removeprefix("torch.")),
    }
    out[row.activation_key] = c.hidden_act
    if row.attention_bias == "switch":
        out["attention_bias"] = bool(c.qkv_bias)
    if row.mlp_bias:
        out["mlp_bias"] = c.mlp_bias
    if row.sliding in ("all", "alternate"):
        out["sliding_window"] = c.sliding_window
    if row.sliding == "upper":
        out["use_sliding_window"] = c.sliding_window is not None
        out["sliding_window"] = c.sliding_window
        types = _layer_types(c)
        out["layer_types"] = types
        # HF rebuilds layer_types from max_window_layers when it is absent; keep both true.
        out["max_window_layers"] = types.index(SLIDING) if SLIDING in types else c.num_layers
    if row.sliding == "alternate":
        out["layer_types"] = _layer_types(c)
    if row.softcaps:
        scalar = c.query_pre_attn_scalar or c.head_dim
        # HF's Gemma2Config insists on an int where the value is one (256, 144).
        out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        out["attn_logit_softcapping"] = c.attn_logit_softcap
        out["final_logit_softcapping"] = c.final_logit_softcap
    if row.rope_original_at_top and c.rope_scaling is not None:
        # Phi-3 reads llama3's original length from the top level first.
        out["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings
    return out


# ---------------------------------------------------------------- config.json in


def family_of(hf: Mapping[str, Any]) -> str:
    """The ``model_type`` of a config.json mapping (from ``architectures`` when absent).

    Raises:
        ConfigError: an unsupported ``model_type`` or architecture.
    """
    supported = ", ".join(f"{f} ({a})" for f, a in FAMILIES.items())
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type is None and archs:
        by_arch = {a: f for f, a in FAMILIES.items()}
        model_type = by_arch.get(archs[0])
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {hf.get('model_type')!r} (architectures {archs}) is not supported; "
            f"supported: {supported}"
        )
    for arch in archs:
        if arch != FAMILIES[model_type]:
            raise ConfigError(
                f"architecture {arch!r} is not supported (only the causal LM head of each "
                f"family loads); supported: {supported}"
            )
    return model_type


def rope_of(hf: Mapping[str, Any], family: str) -> tuple[float, RopeScaling | None, float]:
    """``(rope_theta, scaling, partial_rotary_factor)`` from v5 ``rope_parameters`` or v4 keys."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return theta, None, partial
    if kind not in ("linear", "llama3"):
        raise ConfigError(
            f"rope type {kind!r} is not supported; supported: default, linear, llama3"
        )
    if "factor" not in rope:
        raise ConfigError(f"rope type {kind!r} needs a 'factor' in rope_parameters")
    if kind == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(rope["factor"])), partial
    original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if (
        TABLE[family].rope_original_at_top
        and hf.get("original_max_position_embeddings") is not None
    ):
        original = hf["original_max_position_embeddings"]
    scaling = RopeScaling(
        rope_type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or 8192),
    )
    return theta, scaling, partial


def layer_types_of(hf: Mapping[str, Any], family: str, n: int) -> tuple[int | None, Any]:
    """``(sliding_window, layer_types)`` as HF derives them for each family."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    sliding = TABLE[family].sliding
    if sliding == "none":
        return None, None
    if sliding == "all":
        return window, None
    if sliding == "upper":
        if not hf.get("use_sliding_window", False) or window is None:
            return None, None
        if types is None:
            start = hf.get("max_window_layers", n)
            types = [SLIDING if i >= start else FULL for i in range(n)]
        return (window, types) if SLIDING in types else (None, None)
    # alternate: every other layer slides, starting with the first.
    if types is None:
        types = [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    return (window if window is not None else 4096), types


def config_from_hf(
    cls: type[TransformerConfig], hf: Mapping[str, Any], dtype: torch.dtype | None
) -> TransformerConfig:
    """``cls`` from a config.json mapping (see ``TransformerConfig.from_hf_dict``)."""
    family = family_of(hf)
    row = TABLE[family]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in hf:
            raise ConfigError(f"config.json has no {key!r}")
    if dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if name not in DTYPES:
            raise ConfigError(f"config.json dtype {name!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[name]
    n = int(hf["num_hidden_layers"])
    theta, scaling, partial = rope_of(hf, family)
    window, types = layer_types_of(hf, family, n)
    act = hf.get(row.activation_key)
    if row.tanh_gelu_alias and act == "gelu":
        act = "gelu_pytorch_tanh"  # a legacy value of the Gemma releases; HF reads it as tanh
    attention_bias = bool(hf.get("attention_bias", False))
    switch = row.attention_bias == "switch"
    return cls(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", row.tied_by_default)),
        init_std=float(hf.get("initializer_range", 0.02)),
        dtype=dtype,
        hidden_act=act,
        qkv_bias=attention_bias if switch else row.attention_bias == "qkv",
        o_bias=attention_bias and switch,
        mlp_bias=bool(hf.get("mlp_bias", False)) and row.mlp_bias,
        sliding_window=window,
        layer_types=types,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if row.softcaps else None,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if row.softcaps else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if row.softcaps else None,
    )


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FAMILIES",
    "FULL",
    "SLIDING",
    "TABLE",
    "Family",
    "RopeScaling",
    "config_from_hf",
    "family_of",
    "family_problems",
    "layer_types_of",
    "rope_of",
    "to_hf_dict",
]
