"""``Ok``/``Err`` results of per-record data transforms: bad records are quarantined, not lost."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")


@attrs.frozen
class Ok(Generic[T]):
    """A record that passed a transform."""

    value: T


@attrs.frozen
class Err:
    """A record that failed a transform: ``reason`` says why, ``where`` names the file/row."""

    reason: str
    record: Any = None
    where: str | None = None


Result = Ok[T] | Err
