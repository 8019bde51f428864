"""Detect a changed or nondeterministic reward on resume: score a fixed probe, hash the outputs.

Exact resume needs reward functions that are pure functions of their arguments: no clock, no
unseeded randomness, no network answer that changes. tscale cannot prove that, but it catches
the obvious violations: :func:`fingerprint_rewards` scores a fixed probe batch twice (two
different answers: not deterministic, an error at once) and hashes each function's outputs with
its weight; the checkpoint stores the hashes, and on resume :func:`check_fingerprint` compares
them with the resumed run's, naming each function whose behaviour (or weight) changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from tscale.errors import CheckpointError, RewardError
from tscale.rewards.scoring import RewardSet, Scores

__all__ = [
    "RewardProbe",
    "check_fingerprint",
    "compare_fingerprints",
    "fingerprint_rewards",
    "make_probe",
]

_FILLER = " a 1 b 2"  # a fixed wrong answer in the quickstart's item format


@attrs.frozen(kw_only=True)
class RewardProbe:
    """A fixed batch to score: one entry per completion, the columns one list each."""

    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    completion_ids: tuple[tuple[int, ...], ...]
    columns: Mapping[str, tuple[Any, ...]] = attrs.field(factory=dict)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def make_probe(
    records: Sequence[Mapping[str, Any]],
    *,
    prompt_key: str = "prompt",
    encode: Callable[[str], Sequence[int]] | None = None,
    max_records: int = 8,
) -> RewardProbe:
    """A probe from the first ``max_records`` records: each record's prompt with, as its
    completions, every string value of its other columns (its reference answer among them, so
    that exact match scores 1 somewhere), the same padded with spaces, a fixed wrong answer and
    the empty string. ``encode`` gives the completion ids (default: the UTF-8 bytes; the run's
    tokenizer gives length rewards realistic lengths). A pure function of its arguments.
    """
    encode = encode or _utf8
    chosen = list(records[:max_records])
    keys = sorted({k for r in chosen for k in r if k != prompt_key})
    prompts: list[str] = []
    completions: list[str] = []
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    for record in chosen:
        answers = [v for k, v in sorted(record.items()) if k != prompt_key and isinstance(v, str)]
        texts = [*answers, *(f"  {a} " for a in answers), _FILLER, ""]
        for text in texts:
            prompts.append(str(record.get(prompt_key, "")))
            completions.append(text)
            for k in keys:
                columns[k].append(record.get(k))
    return RewardProbe(
        prompts=tuple(prompts),
        completions=tuple(completions),
        completion_ids=tuple(tuple(int(i) for i in encode(c)) for c in completions),
        columns={k: tuple(v) for k, v in columns.items()},
    )


def _outputs(scores: Scores, i: int) -> list[str | None]:
    """Function ``i``'s outputs, exactly (float.hex), None where it gave none; and the type of
    the exception when it raised (the message may hold addresses)."""
    values = [None if v != v else float(v).hex() for v in scores.per_function[:, i].tolist()]
    raised = [f.error.partition(":")[0] for f in scores.failures if f.name == scores.names[i]]
    return [*values, *(f"raised {r}" for r in raised)]


def fingerprint_rewards(reward_set: RewardSet, probe: RewardProbe) -> dict[str, str]:
    """Each reward function's fingerprint on ``probe`` (name → hex digest of its weight and its
    outputs; for a function with an ``identity``, a reward model, of its weight and that
    identity), for the checkpoint. Scores the probe twice without touching the failure window.

    Raises:
        RewardError: a function gave different outputs on the two calls (not deterministic).
    """
    out: dict[str, str] = {}
    for f in reward_set.functions:
        if f.identity is not None:  # a reward model: its weights, not its outputs
            text = json.dumps([float(f.weight).hex(), "identity", f.identity])
            out[f.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    scored = [f for f in reward_set.functions if f.identity is None]
    if not scored:
        return out
    probed = RewardSet(scored, failure_window=1)  # track_failures=False: the window is unused
    args = (list(probe.prompts), list(probe.completions), [list(i) for i in probe.completion_ids])
    columns = {k: list(v) for k, v in probe.columns.items()}
    first = probed.score(*args, columns, track_failures=False)
    again = probed.score(*args, columns, track_failures=False)
    for i, f in enumerate(scored):
        a, b = _outputs(first, i), _outputs(again, i)
        if a != b:
            at = next(
                (j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            shown = [_show(x[at]) if at < len(x) else "nothing" for x in (a, b)]
            which = (
                f"for completion {at} ({probe.completions[at]!r})"
                if at < len(probe.completions)
                else "in its exceptions"
            )
            raise RewardError(
                f"{f.where} is not deterministic: two calls on the same probe gave {shown[0]} "
                f"then {shown[1]} {which}; exact "
                "resume needs rewards that are pure functions of their arguments "
                "(docs/rewards.md)"
            )
        text = json.dumps([float(f.weight).hex(), a], separators=(",", ":"))
        out[f.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {f.name: out[f.name] for f in reward_set.functions}


def _show(x: str | None) -> str:
    if x is None:
        return "None"
    return x if x.startswith("raised") else repr(float.fromhex(x))


def compare_fingerprints(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What differs between a checkpoint's fingerprints and the resumed run's, one phrase each
    (empty: the same rewards)."""
    problems = [f"{n!r} is new" for n in current if n not in saved]
    problems += [f"{n!r} is gone" for n in saved if n not in current]
    problems += [
        f"{n!r} scores the probe differently or has another weight"
        for n in saved
        if n in current and saved[n] != current[n]
    ]
    return problems


def check_fingerprint(saved: Mapping[str, str], current: Mapping[str, str]) -> None:
    """Raise when the resumed run's rewards differ from the checkpoint's.

    Raises:
        CheckpointError: one line listing the differences.
    """
    problems = compare_fingerprints(saved, current)
    if problems:
        raise CheckpointError(
            "the reward functions changed since the checkpoint was written: "
            + "; ".join(problems)
            + ". A resumed run repeats the original only with the same deterministic rewards; "
            "restore them, or start a new run from the checkpoint's weights"
        )
