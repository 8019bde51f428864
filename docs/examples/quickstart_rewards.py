"""Reward functions of your own for the quickstart tasks (docs/rewards.md).

Name them in YAML as ``quickstart_rewards:positional_credit`` with this folder on PYTHONPATH.
"""

from __future__ import annotations

from collections.abc import Sequence


def positional_credit(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    completion: Sequence[str],
    task: Sequence[str],
) -> list[float | None]:
    """Partial credit for reverse and sort: the fraction of the reference's items the completion
    has in the right place (extra items count against it). None for add, whose answer is one
    number: exact match scores it."""
    out: list[float | None] = []
    for text, answer, kind in zip(completions, completion, task, strict=True):
        if kind == "add":
            out.append(None)
            continue
        got, want = text.split(), answer.split()
        right = sum(g == w for g, w in zip(got, want, strict=False))
        out.append(right / max(len(got), len(want), 1))
    return out
