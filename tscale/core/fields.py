"""Config fields that carry their help text and their domain.

A config record (an attrs class, frozen) declares each field with :func:`field`: its default, one
line of help for ``docs/config.md``, and for numbers the range it accepts plus sentinel values
allowed outside it (``-1`` for "fill", ``0`` for "off"). The YAML loader checks every value
against its field's domain at load time, so the message names the YAML key and the file:line,
never a library argument. Records live beside the factories they build (``tscale.optim``,
``tscale.tasks``), hence this module sits in ``core``: every package may declare fields.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = ["Domain", "domain_of", "field"]


@attrs.frozen(kw_only=True)
class Domain:
    """The values a numeric field accepts: ``ge <= v`` / ``gt < v`` / ``v <= le`` / ``v < lt``
    (each optional), or one of ``sentinels`` (value → what it means)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    sentinels: dict[Any, str] = attrs.field(factory=dict)

    def check(self, value: Any) -> str | None:
        """None when ``value`` is in the domain, else what is wrong (one phrase)."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None  # the type check owns these
        if any(value == s and type(value) is type(s) for s in self.sentinels):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number{self._range_phrase()}, got {value}"
        bad = (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )
        return (
            f"must be{self._range_phrase()}{self._sentinel_phrase()}, got {value}" if bad else None
        )

    def describe(self) -> str:
        """The domain in words for docs/config.md (``>= 1``, ``[0, 1]``, ``>= 1, or -1: fill``)."""
        text = self._range_phrase().removeprefix(" ")
        extra = ", ".join(f"{_show(k)}: {v}" for k, v in self.sentinels.items())
        return f"{text}, or {extra}" if text and extra else text or extra

    def _sentinel_phrase(self) -> str:
        """`` or 0 (keep all)`` / `` or -1 (fill)``: the sentinels, for messages."""
        return "".join(f" or {_show(k)} ({v})" for k, v in self.sentinels.items())

    def _range_phrase(self) -> str:
        low = (f"{_show(self.ge)}", "[") if self.ge is not None else None
        low = (f"{_show(self.gt)}", "(") if self.gt is not None else low
        high = (f"{_show(self.le)}", "]") if self.le is not None else None
        high = (f"{_show(self.lt)}", ")") if self.lt is not None else high
        if low and high:
            return f" in {low[1]}{low[0]}, {high[0]}{high[1]}"
        if low:
            return f" {'>=' if low[1] == '[' else '>'} {low[0]}"
        if high:
            return f" {'<=' if high[1] == ']' else '<'} {high[0]}"
        return ""


def _show(x: Any) -> str:
    return repr(x) if isinstance(x, str) else f"{x:g}" if isinstance(x, float) else str(x)


def field(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    sentinels: dict[Any, str] | None = None,
    finite: bool = False,
    **kw: Any,
) -> Any:
    """An attrs field with ``metadata["help"]`` and, when a bound or sentinel is given (or
    ``finite``: any finite number), ``metadata["domain"]`` (a :class:`Domain`). A list or dict
    default is copied per record."""
    metadata: dict[str, Any] = {"help": help}
    if finite or any(b is not None for b in (ge, gt, le, lt)) or sentinels:
        metadata["domain"] = Domain(ge=ge, gt=gt, le=le, lt=lt, sentinels=dict(sentinels or {}))
    if isinstance(default, list | dict):
        return attrs.field(factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return attrs.field(default=default, metadata=metadata, **kw)


def domain_of(f: attrs.Attribute) -> Domain | None:
    """The domain a field declares (None: any value of its type)."""
    return f.metadata.get("domain")
