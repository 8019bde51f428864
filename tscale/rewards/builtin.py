"""Built-in reward functions, named in YAML by their names (``fn: exact_match``).

Each follows the reward contract (docs/rewards.md): keyword arguments ``prompts``,
``completions`` (decoded text, special tokens skipped), ``completion_ids`` (the sampled ids, the
stop token included when generation stopped on one) and the batch's extra columns, one list per
column; it returns one float per completion, or None where it cannot score one. Their own
settings are keyword-only parameters, set under ``kwargs:`` in YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tscale.errors import ConfigError

__all__ = [
    "check_format_match_kwargs",
    "check_soft_overlong_kwargs",
    "ends_with_stop",
    "exact_match",
    "format_match",
    "soft_overlong_punishment",
]


def exact_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    answer_column: str = "completion",
    **columns: Sequence[Any],
) -> list[float | None]:
    """1.0 where the completion equals the record's reference answer, whitespace stripped at
    both ends (as the SFT eval's exact match), else 0.0; None where the record has no answer.

    The quickstart tasks (reverse, sort, add) keep their answer in the ``completion`` column;
    set ``answer_column`` for a dataset that names it otherwise (``answer``, ``solution``).

    Raises:
        ConfigError: the batch has no ``answer_column`` column.
    """
    answers = _column(columns, answer_column, "exact_match", "answer_column")
    return [
        None if answer is None else float(str(c).strip() == str(answer).strip())
        for c, answer in zip(completions, answers, strict=True)
    ]


MatchMode = Literal["fullmatch", "match", "search"]
_FLAGS = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "DOTALL": re.DOTALL}


def format_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    pattern: str,
    mode: MatchMode = "fullmatch",
    flags: Sequence[str] = (),
    **columns: Sequence[Any],
) -> list[float | None]:
    """1.0 where the completion matches the regular expression ``pattern``, else 0.0.

    ``mode``: ``fullmatch`` (the whole completion), ``match`` (from its start) or ``search``
    (anywhere); ``flags``: any of IGNORECASE, MULTILINE, DOTALL. For the quickstart tasks,
    ``pattern: '(?: \\S+)+'`` asks for space-separated items and nothing else.
    """
    compiled = re.compile(pattern, _flag_bits(flags))
    matcher = getattr(compiled, mode)
    return [float(matcher(str(c)) is not None) for c in completions]


def check_format_match_kwargs(kwargs: Mapping[str, Any]) -> None:
    """``format_match``'s settings are usable: the pattern compiles, mode and flags are known.

    Raises:
        ValueError: what is wrong, naming the key.
    """
    pattern = kwargs.get("pattern")
    if not isinstance(pattern, str):
        raise ValueError(f"pattern: expected a regular expression string, got {pattern!r}")
    mode = kwargs.get("mode", "fullmatch")
    if mode not in ("fullmatch", "match", "search"):
        raise ValueError(f"mode: {mode!r} is not one of: fullmatch, match, search")
    flags = kwargs.get("flags", ())
    if isinstance(flags, str) or not isinstance(flags, Sequence):
        raise ValueError(f"flags: expected a list of flag names, got {flags!r}")
    try:
        re.compile(pattern, _flag_bits(flags))
    except KeyError as err:
        raise ValueError(f"flags: unknown flag {err}; use any of {', '.join(_FLAGS)}") from None
    except re.error as err:
        raise ValueError(
            f"pattern: {pattern!r} is not a valid regular expression ({err})"
        ) from None


def _flag_bits(flags: Sequence[str]) -> int:
    bits = 0
    for name in flags:
        bits |= _FLAGS[str(name).upper()]
    return bits


def ends_with_stop(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    **columns: Sequence[Any],
) -> list[float | None]:
    """1.0 where the completion's last id is a stop id (the model ended its turn), 0.0 where it
    was cut at the length limit or is empty. ``stop_ids``: the tokenizer's end-of-sequence and
    the template's end-of-turn ids (the run passes them when the YAML does not)."""
    stops = {int(i) for i in stop_ids}
    return [float(len(ids) > 0 and int(ids[-1]) in stops) for ids in completion_ids]


def soft_overlong_punishment(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    *,
    max_completion_length: int,
    soft_punish_cache: int,
    **columns: Sequence[Any],
) -> list[float | None]:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale", eq. 13): 0 up to ``L_max - L_cache`` tokens, then falling
    linearly to -1 at ``L_max`` (``max_completion_length``), -1 beyond it.
    ``L_cache`` is ``soft_punish_cache``."""
    start = max_completion_length - soft_punish_cache
    out: list[float | None] = []
    for ids in completion_ids:
        n = len(ids)
        if n <= start:
            out.append(0.0)
        elif n <= max_completion_length:
            out.append((start - n) / soft_punish_cache)
        else:
            out.append(-1.0)
    return out


def check_soft_overlong_kwargs(kwargs: Mapping[str, Any]) -> None:
    """``1 <= max_completion_length`` and ``0 <= soft_punish_cache <= max_completion_length``.

    Raises:
        ValueError: what is wrong, naming the key.
    """
    top, cache = kwargs.get("max_completion_length"), kwargs.get("soft_punish_cache")
    for key, value in (("max_completion_length", top), ("soft_punish_cache", cache)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    assert isinstance(top, int) and isinstance(cache, int)
    if top < 1:
        raise ValueError(f"max_completion_length: must be >= 1, got {top}")
    if not 0 <= cache <= top:
        raise ValueError(
            f"soft_punish_cache: must be in [0, max_completion_length={top}], got {cache}"
        )


def _column(columns: Mapping[str, Sequence[Any]], name: str, fn: str, key: str) -> Sequence[Any]:
    if name not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise ConfigError(
            f"{fn}: the batch has no column {name!r} (its columns: {have}); set kwargs.{key}"
        )
    return columns[name]
