"""Reward functions by name: the built-ins, and ``module:function`` imported from the Python path.

Errors are one line naming the YAML key (``task.rewards.functions[1].fn``) and what to do, as
for ``task.type`` (:func:`tscale.tasks.base.resolve_task_class`): a module that does not import
(is its folder on PYTHONPATH?), a missing attribute (with the closest names the module has), an
attribute that is not callable, a signature that cannot take the contract's arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from tscale.errors import ConfigError
from tscale.rewards import builtin

__all__ = [
    "CONTRACT_ARGS",
    "OPTIONAL_ARGS",
    "REWARDS",
    "BuiltinReward",
    "Signature",
    "register_reward",
    "resolve_reward_fn",
    "signature_of",
]

CONTRACT_ARGS = ("prompts", "completions", "completion_ids")
"""The keyword arguments every reward function is called with (the columns come beside them)."""

OPTIONAL_ARGS = ("prompt_ids",)
"""Keyword arguments a reward function gets only when its signature names them: ``prompt_ids``,
the prompt's token ids (None where the caller has only the text)."""


@attrs.frozen
class BuiltinReward:
    """A built-in reward function and the check of its ``kwargs`` (raises ValueError naming the
    key; None: no check beyond the signature)."""

    fn: Callable[..., Any]
    check_kwargs: Callable[[Mapping[str, Any]], None] | None = None


REWARDS: dict[str, BuiltinReward] = {
    "exact_match": BuiltinReward(builtin.exact_match),
    "format_match": BuiltinReward(builtin.format_match, builtin.check_format_match_kwargs),
    "ends_with_stop": BuiltinReward(builtin.ends_with_stop),
    "soft_overlong_punishment": BuiltinReward(
        builtin.soft_overlong_punishment, builtin.check_soft_overlong_kwargs
    ),
}
"""Built-in reward functions by the name YAML gives them."""


def register_reward(
    name: str, check_kwargs: Callable[[Mapping[str, Any]], None] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a function a built-in reward named ``name`` (its ``kwargs`` checked by
    ``check_kwargs`` when given)."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        REWARDS[name] = BuiltinReward(fn, check_kwargs)
        return fn

    return add


def resolve_reward_fn(name: str, key: str = "fn") -> Callable[..., Any]:
    """The function ``name`` names: a built-in, or ``module:function`` imported.

    Raises:
        ConfigError: an unknown built-in, a module that does not import, a missing attribute (with
            the closest names in the module), or an attribute that is not callable.
    """
    if name in REWARDS:
        return REWARDS[name].fn
    if ":" not in name:
        known = ", ".join(sorted(REWARDS))
        near = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"{key}: unknown reward {name!r}{hint}; built-in: {known}, or module:function for "
            "your own"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {name!r} is not module:function (e.g. my_rewards:brevity)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}: cannot import {module_name!r} ({err}); is its folder on PYTHONPATH?"
        ) from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        near = difflib.get_close_matches(attr, public, n=3)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise ConfigError(f"{key}: module {module_name!r} has no {attr!r}{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(
            f"{key}: {name} is not callable (its type is {type(fn).__name__}); a reward is "
            "fn(prompts, completions, completion_ids, **columns) -> list[float | None]"
        )
    return fn


@attrs.frozen
class Signature:
    """What a reward function's signature takes: named parameters (beyond the contract's and
    ``prompt_ids``), the required ones among them, whether it takes any keyword
    (``**columns``) and whether it names ``prompt_ids``."""

    named: frozenset[str]
    required: frozenset[str]
    any_keyword: bool
    takes_prompt_ids: bool = False


def signature_of(fn: Callable[..., Any], key: str = "fn") -> Signature:
    """The parameters ``fn`` takes, checked against the contract (it must accept ``prompts``,
    ``completions`` and ``completion_ids`` by keyword, or ``**kwargs``).

    Raises:
        ConfigError: a signature that cannot take the contract's arguments, or that cannot be read.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read the signature of {fn!r} ({err})") from None
    params = signature.parameters
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    by_keyword = {
        n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    missing = [a for a in CONTRACT_ARGS if a not in by_keyword and not any_keyword]
    positional_only = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY]
    if missing or positional_only:
        raise ConfigError(
            f"{key}: a reward takes prompts, completions, completion_ids and the columns by "
            f"keyword (fn(prompts, completions, completion_ids, **columns)); "
            f"{getattr(fn, '__name__', fn)!s} takes {signature}"
        )
    named = by_keyword - set(CONTRACT_ARGS) - set(OPTIONAL_ARGS)
    required = {n for n in named if params[n].default is inspect.Parameter.empty}
    return Signature(frozenset(named), frozenset(required), any_keyword, "prompt_ids" in by_keyword)
