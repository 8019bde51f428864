"""A trained reward model as a reward function: ``{model: <folder>}`` in a run's ``rewards``.

The folder is what ``task.type: reward`` exports (``tscale export``): an HF
``<Family>ForSequenceClassification`` folder with one label, its ``score.weight`` and the
tokenizer it was trained with. :class:`RewardModelReward` loads it with tscale's own model code
(:func:`tscale.checkpoint.reward.load_reward_model`) and scores each completion as the model
scores ``prompt ids + completion ids`` — the sampled ids themselves, never re-tokenised text —
at the sequence's last token (HF's rule for a row without padding), batched, without a graph,
on the run's device, in float32 unless ``kwargs.dtype`` says otherwise.

A sequence longer than the reward model's ``max_position_embeddings`` is cut from the left of
its prompt, so that the completion the reward judges is kept whole (as OpenRLHF and TRL's
reward-model truncation keep the end), and counted: ``reward/<name>/truncated`` in the metrics.
A run whose ``task.max_completion_length`` leaves no room for a prompt is refused when it is
built; a completion longer than the reward model's positions on its own (a caller that did not
say how long they get) is unscored (None).

The policy's token ids mean the same tokens to the reward model only when both use one
tokenizer: :func:`check_same_tokenizer` compares their vocabularies (every token of the
policy's has the same id in the reward model's, which may add tokens, e.g. its pad) and refuses
a mismatch in one line. The reward's fingerprint for resume (:mod:`tscale.rewards.fingerprint`)
is the folder's weight fingerprint and the scoring dtype, not its outputs on a probe: the same
weights give the same scores, on any device.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from tscale.checkpoint.frozen import folder_fingerprint
from tscale.checkpoint.hf import CONFIG_NAME
from tscale.checkpoint.reward import RewardCheckpoint, load_reward_model
from tscale.errors import ConfigError, RewardError, TscaleError
from tscale.models.reward import family_of_architecture, gather_at

__all__ = [
    "MODEL_SETTINGS",
    "RewardModelReward",
    "check_model_settings",
    "check_reward_model_folder",
    "check_same_tokenizer",
    "fit_sequences",
    "vocabulary",
]

MODEL_SETTINGS: dict[str, Any] = {"batch_size": 16, "dtype": "float32"}
"""A reward model's settings (``kwargs:`` in YAML) and their defaults: ``batch_size``
sequences per forward pass, ``dtype`` of the weights and the computation (``float32``,
``bfloat16``, ``float16``, or ``auto``: the folder's)."""

_DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
_TOKENIZER_FILE = "tokenizer.json"


def check_reward_model_folder(path: str, key: str) -> Path:
    """``path`` as an exported reward model: a folder whose config.json names a supported
    family's ``*ForSequenceClassification`` with one label, with a ``tokenizer.json``.

    Raises:
        ConfigError: one line naming ``key`` and what is wrong.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"{key}: {path} is not a folder; give the folder `tscale export` wrote for a "
            "task.type: reward run"
        )
    config_path = root / CONFIG_NAME
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: {path} has no {CONFIG_NAME}; give the folder `tscale export` wrote for a "
            "task.type: reward run"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read {config_path} ({err})") from None
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch, str) or family_of_architecture(arch) is None:
        raise ConfigError(
            f"{key}: {path} holds a {arch or 'model without architectures'}, not a reward model "
            "(a supported family's *ForSequenceClassification, what a task.type: reward run "
            "exports)"
        )
    labels = hf.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) and labels else hf.get("num_labels", 2)
    if num_labels != 1:
        raise ConfigError(
            f"{key}: {path} is a {arch} with {num_labels} labels; a reward model has one "
            "(a scalar score)"
        )
    if not (root / _TOKENIZER_FILE).is_file():
        raise ConfigError(
            f"{key}: {path} has no {_TOKENIZER_FILE}, so its tokenizer cannot be checked against "
            "the policy's; export it with `tscale export`, which writes the tokenizer"
        )
    return root


def check_model_settings(kwargs: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The settings of a reward model (:data:`MODEL_SETTINGS` with ``kwargs`` over them).

    Raises:
        ConfigError: an unknown setting (with the closest name), a batch size that is not a
            positive int, an unknown dtype; one line naming ``key.<setting>``.
    """
    for k in kwargs:
        if k not in MODEL_SETTINGS:
            near = difflib.get_close_matches(k, list(MODEL_SETTINGS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"{key}.{k}: a reward model takes no setting {k!r} (it takes: "
                f"{', '.join(MODEL_SETTINGS)}){hint}"
            )
    settings = {**MODEL_SETTINGS, **kwargs}
    size = settings["batch_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{key}.batch_size: expected a positive integer, got {size!r}")
    if settings["dtype"] not in _DTYPE_NAMES:
        raise ConfigError(
            f"{key}.dtype: {settings['dtype']!r} is not one of {', '.join(_DTYPE_NAMES)}"
        )
    return settings


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """Token → id of a ``tokenizers.Tokenizer`` (added tokens included) or of anything with
    ``get_vocab()`` (a ``transformers`` tokenizer)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.get_vocab(with_added_tokens=True)
    return dict(tokenizer.get_vocab())


def check_same_tokenizer(policy: Any, folder: Path, key: str) -> None:
    """Every token of the policy's tokenizer has the same id in the reward model's (which may
    have more tokens, e.g. the pad its export added), so the policy's ids mean the same text.

    Raises:
        ConfigError: one line naming ``key``: the first token that differs and how many do.
    """
    try:
        theirs = vocabulary(Tokenizer.from_file(str(folder / _TOKENIZER_FILE)))
    except Exception as err:  # tokenizers raises a plain Exception on a bad file
        raise ConfigError(f"{key}: cannot read {folder / _TOKENIZER_FILE} ({err})") from None
    ours = vocabulary(policy)
    differ = sorted((i, t) for t, i in ours.items() if theirs.get(t) != i)
    if differ:
        i, token = differ[0]
        where = "has no such token" if token not in theirs else f"has it as id {theirs[token]}"
        raise ConfigError(
            f"{key}: the reward model's tokenizer is not the policy's: {len(differ)} of the "
            f"policy's {len(ours)} tokens differ (token {token!r} is id {i} in the policy's, "
            f"{folder}'s {where}); score with a reward model trained on the policy's tokenizer"
        )


def _max_positions(folder: Path) -> int | None:
    """The reward model's ``max_position_embeddings`` from its config.json (None: absent)."""
    try:
        value = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get(
            "max_position_embeddings"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def fit_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    max_positions: int | None,
) -> tuple[list[list[int]], int]:
    """Each ``prompt + completion`` in at most ``max_positions`` tokens (None: no limit): a
    longer one keeps the end of its prompt and the whole completion; a completion that is
    longer on its own becomes the empty sequence (unscored). Returns the sequences and how
    many prompts were cut."""
    out: list[list[int]] = []
    cut = 0
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        prompt, completion = [int(i) for i in p], [int(i) for i in c]
        if max_positions is not None and len(prompt) + len(completion) > max_positions:
            room = max_positions - len(completion)
            if room < 0:
                out.append([])
                continue
            cut += 1
            prompt = prompt[len(prompt) - room :]
        out.append(prompt + completion)
    return out, cut


@functools.lru_cache(maxsize=4)
def _load(path: str, fingerprint: str, dtype: str, device: str) -> RewardCheckpoint:
    """The folder's reward model, loaded once per (folder content, dtype, device) in a process:
    a run builds its reward set more than once (rollout, eval) and must not hold two copies."""
    return load_reward_model(path, dtype=dtype, device=device)


class RewardModelReward:
    """A reward function (the contract of docs/rewards.md) that scores prompt + completion ids
    with a trained reward model (see the module docstring).

    Args:
        path: the exported ``*ForSequenceClassification`` folder (checked by
            :func:`check_reward_model_folder`).
        tokenizer: the policy's tokenizer, checked against the folder's
            (:func:`check_same_tokenizer`); None: not checked yet, and scoring refuses.
        device: where the model runs (the run's device).
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (the folder's).
        batch_size: sequences per forward pass.
        key: the YAML key, for messages.
        max_completion_length: the most tokens a completion has (``task.max_completion_length``;
            None: not known, not checked).

    Raises:
        ConfigError: the folder is not a reward model, a setting is invalid, the tokenizers
            differ, or ``max_completion_length`` leaves no room for a prompt in the reward
            model's positions.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        key: str = "model",
        max_completion_length: int | None = None,
    ) -> None:
        settings = check_model_settings({"dtype": dtype, "batch_size": batch_size}, key)
        self.path = check_reward_model_folder(str(path), key)
        self.key = key
        self.device = torch.device(device)
        self.dtype: str = settings["dtype"]
        self.batch_size: int = settings["batch_size"]
        self.tokenizer_checked = tokenizer is not None
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, self.path, key)
        try:
            self.weights = folder_fingerprint(self.path)
        except TscaleError as err:
            raise ConfigError(f"{key}: {err}") from None
        self.max_positions = _max_positions(self.path)
        if (
            max_completion_length is not None
            and self.max_positions is not None
            and max_completion_length >= self.max_positions
        ):
            raise ConfigError(
                f"{key}: task.max_completion_length ({max_completion_length}) leaves no room for "
                f"a prompt in the reward model's max_position_embeddings ({self.max_positions}, "
                f"{self.path}); set task.max_completion_length below {self.max_positions}"
            )
        self.counts: dict[str, int] = {name: 0 for name in self.counters}
        self.__name__ = "reward_model"

    counters = ("truncated",)
    """What :attr:`counts` counts in the last call: ``truncated``, the sequences whose prompt
    was cut from the left to fit the reward model's positions (RewardSet logs it as
    ``reward/<name>/truncated``)."""

    @property
    def identity(self) -> str:
        """What fixes the scores: the folder's weight fingerprint and the dtype (the resume
        fingerprint of this reward)."""
        text = json.dumps(["reward_model", self.weights, self.dtype])
        return hashlib.sha256(text.encode()).hexdigest()

    @functools.cached_property
    def _tokenizer(self) -> Tokenizer:
        """The folder's tokenizer (the policy's, checked), for prompts given as text only."""
        return Tokenizer.from_file(str(self.path / _TOKENIZER_FILE))

    def checkpoint(self) -> RewardCheckpoint:
        """The loaded model (once per process for one folder, dtype and device)."""
        return _load(str(self.path.resolve()), self.weights, self.dtype, str(self.device))

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        *,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[float | None]:
        """The reward model's score of each ``prompt_ids[i] + completion_ids[i]``; None for an
        empty sequence. Without ``prompt_ids`` (a caller that has only the text, e.g. a held-out
        eval) each prompt is encoded with the shared tokenizer, special tokens as written.
        A sequence longer than the reward model's positions has its prompt cut from the left
        (counted in :attr:`counts`); a completion longer than them on its own is unscored.

        Raises:
            RewardError: the policy's tokenizer was not checked, or an id is outside the
                reward model's vocabulary.
        """
        if not self.tokenizer_checked:
            raise RewardError(
                f"{self.key}: the policy's tokenizer was not checked against {self.path}'s; "
                "build the reward set with tokenizer=<the policy's tokenizer>"
            )
        if prompt_ids is None:
            encoded = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
            prompt_ids = [e.ids for e in encoded]
        sequences, cut = fit_sequences(prompt_ids, completion_ids, self.max_positions)
        self.counts = {"truncated": cut}
        return self.score_sequences(sequences)

    def score_sequences(self, sequences: Sequence[Sequence[int]]) -> list[float | None]:
        """The score of each token-id sequence at its last token (None for an empty one):
        longest first in batches of ``batch_size``, right-padded (causal attention: padding
        after a sequence changes nothing before it), without a graph."""
        ckpt = self.checkpoint()
        model, params = ckpt.model, ckpt.params
        vocab = ckpt.config.vocab_size
        out: list[float | None] = [None] * len(sequences)
        order = sorted((i for i, s in enumerate(sequences) if s), key=lambda i: -len(sequences[i]))
        pad = ckpt.pad_id if ckpt.pad_id is not None else 0
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = len(sequences[chunk[0]])
                ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
                for row, i in enumerate(chunk):
                    ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.int64)
                if int(ids.max()) >= vocab or int(ids.min()) < 0:
                    raise RewardError(
                        f"{self.key}: a token id outside the reward model's vocabulary "
                        f"[0, {vocab}) of {self.path}"
                    )
                ids = ids.to(self.device)
                last = torch.tensor([len(sequences[i]) - 1 for i in chunk], device=self.device)
                scores = model.apply(params, {"input_ids": ids})  # [b, width, 1]
                values = gather_at(scores, last[:, None])[:, 0, 0].float().cpu().tolist()
                for i, v in zip(chunk, values, strict=True):
                    out[i] = v  # a non-finite score stops the run (RewardSet's check)
        return out
