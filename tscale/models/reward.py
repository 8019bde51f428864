"""Reward models: a sequence-classification head on the decoder, as pure functions.

A reward model is the decoder without its LM head plus ``score.weight`` [num_labels, H] (HF's
``*ForSequenceClassification`` name and shape; no bias). The score of a token is its
final-normed hidden state times ``score.weight``; the score of a sequence is the score of its
last token (Ouyang et al., "Training language models to follow instructions with human
feedback", 2022, §3.5: the scalar head reads the final token). Which token is "last":

- plain padded rows (HF's rule, :func:`last_token_positions`): the rightmost token that is not
  ``pad_token_id`` (left or right padding). When the pad id is the eos id (a tokenizer without
  pad), that is the token *before* the EOS, so an export sets a pad id of its own.
- the group layout of ``docs/preference.md`` (``doc_ids``/``branch_ids``, several sequences in a
  row, a shared prompt): each sequence ``(row, doc, branch)`` ends at its last position in
  storage with that doc and branch (:func:`sequence_ends`); with the branch mask every token's
  hidden state equals the one it has in the unpacked prompt + completion.

:class:`RewardModel` implements the model protocol around any
:class:`~tscale.models.protocol.LanguageModel` (a ``Transformer``, or the LoRA stack: then the
trainable params are the adapters plus ``score.weight``, as PEFT's ``modules_to_save=["score"]``).
Its ``apply`` returns per-token scores ``[B, S, num_labels]``: the "logits" of HF's
sequence-classification model before pooling, so every wrapper and parallel plan that runs
``apply`` runs the reward model unchanged.

Pure: no I/O (files are read and written in :mod:`tscale.checkpoint.reward`).
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
from tscale.errors import CheckpointError, ConfigError, ShapeError
from tscale.models.families import TABLE
from tscale.models.protocol import Batch, Frozen, Gather, frozen_kw, gather_kw
from tscale.models.transformer import TransformerConfig, param_shapes

__all__ = [
    "SCORE",
    "SCORE_WEIGHT",
    "RewardHead",
    "RewardModel",
    "check_reward_params",
    "family_of_architecture",
    "gather_at",
    "init_score",
    "last_token_positions",
    "reward_architecture",
    "reward_param_shapes",
    "sequence_ends",
    "with_score_head",
    "without_lm_head",
    "without_logits_index",
]

SCORE = "score"
"""The params key of the head (``score.weight``, as HF)."""
SCORE_WEIGHT = "score.weight"
_LM_HEAD = "lm_head"
# Salt of the head's key: the decoder's init uses the key itself, the head a key folded from it.
_SCORE_SALT = 0x5C0E


# ---------------------------------------------------------------- names and shapes


def reward_architecture(family: str) -> str:
    """The ``architectures`` entry of ``family``'s sequence-classification model
    (``LlamaForSequenceClassification`` …)."""
    return TABLE[family].architecture.removesuffix("ForCausalLM") + "ForSequenceClassification"


def family_of_architecture(architecture: str) -> str | None:
    """The family whose sequence-classification class is ``architecture`` (None: none)."""
    return next((f for f in TABLE if reward_architecture(f) == architecture), None)


def reward_param_shapes(
    config: TransformerConfig, num_labels: int = 1
) -> dict[str, tuple[int, ...]]:
    """The reward model's params: the decoder's without ``lm_head.weight``, plus
    ``score.weight`` [num_labels, hidden_size]; in checkpoint order."""
    shapes = {k: v for k, v in param_shapes(config).items() if not k.startswith(_LM_HEAD + ".")}
    shapes[SCORE_WEIGHT] = (num_labels, config.hidden_size)
    return shapes


def check_reward_params(
    config: TransformerConfig, flat: Mapping[str, torch.Tensor], num_labels: int = 1
) -> None:
    """Raise unless ``flat`` holds exactly the reward model's params, in their shapes.

    Raises:
        CheckpointError: unexpected or missing names (e.g. unmerged adapters), or a shape.
    """
    expected = reward_param_shapes(config, num_labels)
    unknown = [k for k in flat if k not in expected]
    missing = [k for k in expected if k not in flat]
    if unknown or missing:
        raise CheckpointError(
            f"reward-model params do not match the {config.family} config: unexpected "
            f"{unknown[:5]}, missing {missing[:5]} (merge adapters before exporting; the head "
            f"is {SCORE_WEIGHT!r})"
        )
    for k, shape in expected.items():
        if tuple(flat[k].shape) != shape:
            raise CheckpointError(f"param {k!r} has shape {tuple(flat[k].shape)}, not {shape}")


# ---------------------------------------------------------------- the head's params


def init_score(
    key: torch.Tensor,
    hidden_size: int,
    *,
    num_labels: int = 1,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A fresh ``score.weight`` [num_labels, hidden_size]: Normal(0, ``std``) as HF initialises
    a new ``nn.Linear`` (``std`` is the config's ``initializer_range``), drawn in float32 from
    ``key`` and cast to ``dtype``."""
    g = R.generator(key, device=device)
    w = torch.empty((num_labels, hidden_size), dtype=torch.float32, device=device)
    return w.normal_(0.0, std, generator=g).to(dtype)


def without_lm_head(params: TensorDictBase) -> TensorDictBase:
    """``params`` without ``lm_head`` (a reward model never reads it; HF's
    sequence-classification model has none). A tied head is the embedding and stays."""
    return params.exclude(_LM_HEAD) if _LM_HEAD in params.keys() else params  # noqa: SIM118


def with_score_head(
    params: TensorDictBase,
    key: torch.Tensor,
    config: TransformerConfig,
    *,
    num_labels: int = 1,
) -> TensorDict:
    """The decoder's ``params`` as a reward model's: ``lm_head`` dropped and a fresh
    ``score.weight`` (:func:`init_score` with ``config.init_std``) added in the params' dtype
    and device; a tree that has one already keeps it."""
    flat = T.flatten(without_lm_head(params))
    if SCORE_WEIGHT not in flat:
        emb = flat["model.embed_tokens.weight"]
        flat[SCORE_WEIGHT] = init_score(
            key,
            config.hidden_size,
            num_labels=num_labels,
            std=config.init_std,
            dtype=emb.dtype,
            device=emb.device,
        )
    return T.unflatten(flat)


# ---------------------------------------------------------------- where sequences end


def last_token_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """HF's rule: the position [B] of the rightmost token of each row that is not ``pad_id``
    (0 for a row of padding only; the last position when ``pad_id`` is None, which HF allows
    for one row only)."""
    b, s = input_ids.shape
    if pad_id is None:
        return torch.full((b,), s - 1, dtype=torch.int64, device=input_ids.device)
    index = torch.arange(s, device=input_ids.device)
    return (index * (input_ids != pad_id)).argmax(-1)


def sequence_ends(batch: Batch, *, num_branches: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position of every sequence ``(row, doc, branch)`` of a group-layout batch.

    A sequence is the tokens of one document ``doc_ids == d`` (``d >= 1``; 0 is padding) on one
    branch ``branch_ids == k`` (``1 <= k <= num_branches``; branch 0 is the shared prompt, part of
    every branch of its document but the end of none). Its end is its last position in storage,
    where its hidden state is that of the whole unpacked prompt + completion.

    Static shapes, no host sync: ``D`` is the row length (a row holds at most that many
    documents), ``num_branches`` is given. Branch ids above it are ignored.

    Args:
        batch: ``doc_ids`` [B|1, S] and ``branch_ids`` [B, S] ints.
        num_branches: how many branches a group has at most (2 for a chosen/rejected pair).

    Returns:
        ``(positions, valid)``, both [B, S, num_branches]: index ``[b, d - 1, k - 1]`` is the
        end of doc ``d``'s branch ``k`` in row ``b``; ``valid`` is False where that sequence does
        not exist (its position is then 0, safe to gather and to be masked).

    Raises:
        ShapeError: a field is missing or misshapen, or ``num_branches < 1``.
    """
    if num_branches < 1:
        raise ShapeError(f"sequence_ends: num_branches must be >= 1, got {num_branches}")
    for name in ("doc_ids", "branch_ids"):
        if batch.get(name, None) is None:
            raise ShapeError(
                f"sequence_ends: the batch has no {name!r}; reward and preference batches come "
                "from the group layout (doc_ids, branch_ids per token)"
            )
    branch = batch["branch_ids"]
    if branch.dim() != 2 or branch.dtype.is_floating_point:
        raise ShapeError(
            f"batch['branch_ids'] must be an integer tensor [batch, seq], got {branch.dtype} "
            f"{tuple(branch.shape)}"
        )
    b, s = branch.shape
    doc = batch["doc_ids"]
    if doc.dim() != 2 or doc.shape[0] not in (1, b) or doc.shape[1] != s:
        raise ShapeError(
            f"batch['doc_ids'] has shape {tuple(doc.shape)}, branch_ids has {(b, s)}; it must be "
            f"[{b}, {s}] (or [1, {s}])"
        )
    doc = doc.expand(b, s)
    nb = num_branches
    slots = s * nb  # one per (doc, branch), plus one where everything else goes
    ok = (doc > 0) & (doc <= s) & (branch > 0) & (branch <= nb)
    slot = torch.where(ok, (doc - 1) * nb + (branch - 1), slots)
    pos = torch.arange(s, device=branch.device).expand(b, s)
    ends = torch.full((b, slots + 1), -1, dtype=torch.int64, device=branch.device)
    ends = ends.scatter_reduce(1, slot, pos, reduce="amax", include_self=True)
    ends = ends[:, :slots].view(b, s, nb)
    valid = ends >= 0
    return ends.clamp_min(0), valid


def gather_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``values`` [B, S, ...] at ``positions`` [B, *P] (ints): [B, *P, ...]."""
    b = values.shape[0]
    flat = positions.reshape(b, -1)
    trailing = values.shape[2:]
    index = flat.view(b, -1, *([1] * len(trailing))).expand(b, flat.shape[1], *trailing)
    return values.gather(1, index).view(*positions.shape, *trailing)


# ---------------------------------------------------------------- the model


@attrs.frozen(kw_only=True)
class RewardHead:
    """The head's settings: ``hidden_size`` (the decoder's), ``num_labels`` (1 for a reward
    model), ``init_std`` (the config's ``initializer_range``) and ``pad_id`` (the pad id HF's
    last-token rule skips; None: the last position, one row at a time)."""

    hidden_size: int
    num_labels: int = 1
    init_std: float = 0.02
    pad_id: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("hidden_size", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"RewardHead.{name} must be a positive int, got {value!r}")

    @classmethod
    def of(cls, config: TransformerConfig, **kw: Any) -> RewardHead:
        """The head for a decoder of ``config`` (its hidden size and init std)."""
        return cls(hidden_size=config.hidden_size, init_std=config.init_std, **kw)


def _score_weight(params: TensorDictBase, gather: Gather | None) -> torch.Tensor:
    if SCORE not in params.keys():  # noqa: SIM118
        raise KeyError(
            f"the params have no {SCORE_WEIGHT!r}: add the head with with_score_head or "
            "RewardModel.init"
        )
    w = params[SCORE, "weight"]
    if gather is None:
        return w
    return gather(TensorDict({"weight": w}, batch_size=[]))["weight"]


@attrs.frozen(eq=False)
class RewardModel:
    """A sequence-classification model around ``inner`` (the protocol of
    :mod:`tscale.models.protocol`; see the module docstring).

    ``params`` are ``inner``'s plus ``score.weight``; ``inner`` gets them without the head.
    ``apply`` gives per-token scores [B, S, num_labels] (the HF class's logits before pooling),
    :meth:`sequence_scores` pools them by HF's last-token rule, :meth:`group_scores` at the
    ends of the group layout's sequences. Under a parallel ``gather`` hook the head is gathered
    as a group of its own, ``{"weight": w}``, as ``head_weight`` is.
    """

    inner: Any
    head: RewardHead

    @property
    def final_logit_softcap(self) -> float | None:
        """None: the score has no soft-cap (HF's sequence-classification models have none)."""
        return None

    def init(self, key: torch.Tensor, **kw: Any) -> TensorDict:
        """``inner``'s fresh params (without an LM head) plus a fresh ``score.weight``."""
        flat = T.flatten(without_lm_head(self.inner.init(key, **kw)))
        floats = [t for t in flat.values() if t.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.float32
        device = floats[0].device if floats else torch.device("cpu")
        head_key = R.fold_in(key, _SCORE_SALT)
        flat[SCORE_WEIGHT] = self.init_head(head_key, dtype=dtype, device=device)
        return T.unflatten(flat)

    def init_head(
        self,
        key: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A fresh ``score.weight`` (:func:`init_score` with this head's settings)."""
        h = self.head
        return init_score(
            key, h.hidden_size, num_labels=h.num_labels, std=h.init_std, dtype=dtype, device=device
        )

    def hidden_states(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """``inner``'s final-normed hidden states [B, S, H]."""
        return self.inner.hidden_states(
            params.exclude(SCORE), batch, **gather_kw(gather), **frozen_kw(frozen)
        )

    def head_weight(
        self,
        params: TensorDictBase,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """``score.weight`` [num_labels, H] as the model computes with it."""
        return _score_weight(params, gather)

    def logits_from_hidden(
        self,
        params: TensorDictBase,
        h: torch.Tensor,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Scores ``h @ score.weight.T`` [..., num_labels], in ``h``'s dtype (the head is cast
        to it, differentiably: under LoRA with a cast the adapters and head may be in the
        compute dtype while a frozen base keeps its own)."""
        return F.linear(h, _score_weight(params, gather).to(h.dtype))

    def apply(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Per-token scores [B, S, num_labels] (or [B, M, num_labels] at
        ``batch["logits_index"]``)."""
        h = self.hidden_states(params, batch, gather=gather, frozen=frozen)
        return self.logits_from_hidden(params, h, gather=gather)

    def sequence_scores(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> torch.Tensor:
        """Scores [B, num_labels] of plain padded rows at HF's last token that is not
        ``head.pad_id`` (what ``AutoModelForSequenceClassification`` returns as ``logits``).

        Raises:
            ShapeError: more than one row and no ``pad_id`` (as HF refuses it).
        """
        ids = batch["input_ids"]
        if self.head.pad_id is None and ids.shape[0] != 1:
            raise ShapeError(
                "RewardModel.sequence_scores: several rows need RewardHead.pad_id to find each "
                "row's last token (HF's rule)"
            )
        scores = self.apply(params, without_logits_index(batch), gather=gather, frozen=frozen)
        return gather_at(scores, last_token_positions(ids, self.head.pad_id))

    def group_scores(
        self,
        params: TensorDictBase,
        batch: Batch,
        *,
        num_branches: int = 2,
        gather: Gather | None = None,
        frozen: Frozen | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every sequence of a group-layout batch at its last token:
        ``(scores [B, S, num_branches, num_labels], valid [B, S, num_branches])`` indexed as
        :func:`sequence_ends` (``[b, doc - 1, branch - 1]``)."""
        positions, valid = sequence_ends(batch, num_branches=num_branches)
        scores = self.apply(params, without_logits_index(batch), gather=gather, frozen=frozen)
        return gather_at(scores, positions), valid

    def init_cache(self, batch_size: int, max_length: int, **kw: Any) -> TensorDict:
        """``inner``'s cache (a reward model scores whole sequences; see
        :meth:`apply_with_cache`)."""
        return self.inner.init_cache(batch_size, max_length, **kw)

    def apply_with_cache(self, *args: Any, **kw: Any) -> Any:
        """Not available: a reward model scores whole sequences (decode with the LM)."""
        raise NotImplementedError(
            "RewardModel scores whole sequences; it has no incremental decoding"
        )


def without_logits_index(batch: Batch) -> Batch:
    """``batch`` without ``logits_index``: scores are read at sequence ends, not at the
    positions an LM loss trains."""
    if batch.get("logits_index", None) is None:
        return batch
    if isinstance(batch, TensorDictBase):
        return batch.exclude("logits_index")
    return {k: v for k, v in batch.items() if k != "logits_index"}
