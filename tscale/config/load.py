"""Load, override, check and save configs: YAML → plain mapping → attrs records via cattrs.

Loading is strict. A pre-check walks the raw mapping beside the schema (any attrs class, nothing
here names a field) so that every mistake becomes one :class:`~tscale.errors.ConfigError` line that
names the file, the line, the key path and the fix::

    cfg.yaml:7: unknown key 'optimizer.lr_rate'; did you mean 'optimizer.lr'?
    cfg.yaml:3: optimizer.type: 'adamx' is not one of: adamw (did you mean 'adamw'?)
    cfg.yaml:5: model.hidden_size must be >= 1, got 0
    override 'optimizer.lr=fast': optimizer.lr: expected a number, got 'fast'

A field's declared domain (:func:`tscale.core.fields.field`: a range and its sentinels) is
checked in the same walk, on the value or on each item of a list or mapping value; rules that
relate several keys live in :mod:`tscale.config.rules`.

The pre-check also normalises values that YAML gets wrong: PyYAML reads ``3e-4`` (no dot) as the
string ``'3e-4'``, so number-looking strings are accepted for number fields; an ``int`` field takes
``3.0`` but not ``1.5``; a ``bool`` field takes only ``true``/``false``. Then a strict
``cattrs.Converter(forbid_extra_keys=True)`` builds the records (and runs any attrs validators).
"""

from __future__ import annotations

import datetime
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, IterableValidationError

from tscale.config.schema import Config
from tscale.core.fields import domain_of
from tscale.errors import ConfigError

__all__ = ["load_config", "save_config", "to_dict", "to_yaml"]

T = TypeVar("T")
_Path = tuple[str | int, ...]  # a key path: field names, and list indices

# YAML-1.2-style numbers, including the ones PyYAML 1.1 leaves as strings ("3e-4", "1.0e3").
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d[\d_]*")


# ----------------------------------------------------------------------------------------------
# Errors


class _Problem(Exception):
    """A mistake found at a key path; :func:`load_config` adds the source (file, line, override)."""

    def __init__(
        self, path: _Path, message: str, *, section: type | None = None, sep: str = ": "
    ) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.section = section  # set for an unknown key: the attrs class it is not a field of
        self.sep = sep  # between the key path and the message ("key: expected…", "key must…")


def _dotted(path: _Path) -> str:
    """``('data', 'synthetic', 'tasks', 1)`` → ``'data.synthetic.tasks[1]'``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _show(value: Any) -> str:
    """A short, single-line description of a value for "got ..." messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def _similar(word: str, candidates: Sequence[str]) -> list[tuple[str, float]]:
    """The candidates a typo of ``word`` may have meant, with scores in [0.6, 1], best first.

    difflib's ratio, plus two cases it scores low: ``lr_rate`` → ``lr`` (a candidate that is the
    leading word of ``word``) and ``learning_rate`` → ``lr`` (initials).
    """
    norm = _norm(word)
    scored = []
    for cand in candidates:
        c = _norm(cand)
        score = difflib.SequenceMatcher(None, norm, c).ratio()
        words = [w for w in norm.split("_") if w]
        if c == norm or (len(words) > 1 and c in (words[0], "".join(w[0] for w in words))):
            score = 1.0
        if score >= 0.6:
            scored.append((-score, cand))
    return [(cand, -neg) for neg, cand in sorted(scored)]


def _or_list(items: Sequence[str]) -> str:
    quoted = [f"'{i}'" for i in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# ----------------------------------------------------------------------------------------------
# Schema introspection (generic over attrs classes)


@functools.cache
def _fields(cls: type) -> tuple[attrs.Attribute, ...]:
    """The fields of an attrs class that a config may set, with string annotations resolved."""
    attrs.resolve_types(cls)
    return tuple(f for f in attrs.fields(cls) if f.init)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _strip_optional(tp: Any) -> Any:
    """``X | None`` → ``X``; anything else unchanged."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _section_class(tp: Any) -> type | None:
    """The attrs class of a section type (``X`` or ``X | None``), else None."""
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and attrs.has(tp) else None


@functools.cache
def _tag(cls: type) -> str | None:
    """The tag of a record in a tagged union: its ``type`` field's one ``Literal`` value."""
    field = next((f for f in _fields(cls) if f.name == "type"), None)
    if field is None or typing.get_origin(field.type) is not Literal:
        return None
    choices = typing.get_args(field.type)
    return choices[0] if len(choices) == 1 and isinstance(choices[0], str) else None


@functools.cache
def _tagged_members(tp: Any) -> dict[str, type] | None:
    """``{tag: record}`` of a tagged union (``A | B | ...``, optionally ``| None``: attrs records
    each with a ``type: Literal["a"]`` field, the first member the default), else None."""
    if not _is_union(tp):
        return None
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(members) < 2 or not all(isinstance(m, type) and attrs.has(m) for m in members):
        return None
    tags = {_tag(m): m for m in members}
    return tags if None not in tags and len(tags) == len(members) else None  # type: ignore[return-value]


def _section_classes(tp: Any) -> tuple[type, ...]:
    """The records a value of type ``tp`` may be: a section's class, a tagged union's members."""
    members = _tagged_members(tp)
    if members is not None:
        return tuple(members.values())
    cls = _section_class(tp)
    return () if cls is None else (cls,)


def _all_paths(
    cls: type, prefix: tuple[str, ...] = (), *, sections: bool = True
) -> list[tuple[str, ...]]:
    """Every settable key path of a schema, sections (and every member of a tagged union)
    included, in schema order; ``sections=False`` leaves out the open unions (``task``: its keys
    depend on its type, so it is never where a misplaced key belongs)."""
    out: list[tuple[str, ...]] = []
    for f in _fields(cls):
        path = (*prefix, f.name)
        if sections or "resolve" not in f.metadata:
            out.append(path)
        for sub in _section_classes(f.type):
            out += [p for p in _all_paths(sub, path, sections=sections) if p not in out]
    return out


def _describe_type(tp: Any) -> str:
    """A human name of a schema type, as used in messages and the reference ("a number")."""
    if tp is Any or tp is object:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and attrs.has(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of: " + ", ".join(_yaml_scalar(a) for a in args)
    if _is_union(tp):
        return " or ".join(_describe_type(a) for a in args)
    if origin in (list, Sequence) or tp in (list, tuple):
        return "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        return f"a list of {len(args)} items"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _yaml_scalar(value: Any) -> str:
    """A scalar as YAML writes it inline (``null``, ``true``, ``0.001``, ``adamw``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# ----------------------------------------------------------------------------------------------
# The pre-check: validate and normalise a raw value against a type


def _check(value: Any, tp: Any, path: _Path) -> Any:
    """Check ``value`` against the schema type ``tp``; return it normalised for cattrs.

    Raises:
        _Problem: at the deepest key path that is wrong.
    """
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type) and attrs.has(tp):
        return _check_section(value, tp, path)
    if _is_union(tp):
        return _check_union(value, tp, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _check_literal(value, args, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Problem(path, f"expected true or false, got {_show(value)}")
    if tp is int:
        return _check_int(value, path)
    if tp is float:
        return _check_float(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-01-01 as a date
            return value.isoformat()
        hint = f" (quote it: '{value}')" if isinstance(value, int | float) else ""
        raise _Problem(path, f"expected a string, got {_show(value)}{hint}")
    if tp is type(None):
        if value is None:
            return None
        raise _Problem(path, f"expected null, got {_show(value)}")
    if origin in (list, Sequence) or tp in (list, tuple):
        item = args[0] if args else Any
        return [_check(v, item, (*path, i)) for i, v in enumerate(_as_list(value, tp, path))]
    if origin is tuple:
        items = _as_list(value, tp, path)
        if len(args) == 2 and args[1] is Ellipsis:
            return [_check(v, args[0], (*path, i)) for i, v in enumerate(items)]
        if len(items) != len(args):
            got = f"{len(items)} item{'s' * (len(items) != 1)}"
            raise _Problem(path, f"expected {_describe_type(tp)}, got {got}")
        return [_check(v, a, (*path, i)) for i, (v, a) in enumerate(zip(items, args, strict=True))]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Problem(path, f"expected a mapping, got {_show(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _check(k, key_tp, (*path, str(k))): _check(v, val_tp, (*path, str(k)))
            for k, v in value.items()
        }
    # A type this pre-check does not know: leave it to cattrs.
    return value


def _as_list(value: Any, tp: Any, path: _Path) -> list:
    if isinstance(value, list | tuple):
        return list(value)
    raise _Problem(path, f"expected {_describe_type(tp)}, got {_show(value)}")


def _check_section(value: Any, cls: type, path: _Path) -> dict:
    if value is None:  # "optimizer:" with every entry commented out: all defaults
        return {}
    if not isinstance(value, Mapping):
        raise _Problem(path, f"expected a mapping, got {_show(value)}")
    fields = {f.name: f for f in _fields(cls)}
    out = {}
    for key, item in value.items():
        if key not in fields:
            raise _Problem((*path, str(key)), "unknown key", section=cls)
        resolve = fields[key].metadata.get("resolve")
        if resolve is not None:
            out[key] = _check_resolved(item, resolve, fields[key], (*path, key))
        else:
            out[key] = _check(item, fields[key].type, (*path, key))
            _check_domain(out[key], fields[key], (*path, key))
    return out


def _check_domain(value: Any, f: attrs.Attribute, path: _Path) -> None:
    """The field's declared domain (:func:`tscale.core.fields.field`) holds for ``value``, or
    for each item of a list or mapping value (``data.length.per_column_limits``)."""
    domain = domain_of(f)
    if domain is None:
        return
    if isinstance(value, Mapping):
        items: list[tuple[_Path, Any]] = [((*path, str(k)), v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [((*path, i), v) for i, v in enumerate(value)]
    else:
        items = [(path, value)]
    for where, item in items:
        wrong = domain.check(item)
        if wrong is not None:
            raise _Problem(where, wrong, sep=" ")


def _check_resolved(value: Any, resolve: Any, field: attrs.Attribute, path: _Path) -> Any:
    """An open tagged union (e.g. ``task``): ``resolve(type_name)`` gives the record class of
    ``value["type"]`` (the default's type when absent); the value is checked against that class
    and returned built (the schema types the field ``Any``, so cattrs passes it through)."""
    default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    if value is None:
        return default
    if not isinstance(value, Mapping):
        raise _Problem(path, f"expected a mapping, got {_show(value)}")
    name = value.get("type", default.type)
    if not isinstance(name, str):
        raise _Problem((*path, "type"), f"expected a string, got {_show(name)}")
    try:
        cls = resolve(name)
    except ConfigError as err:
        raise _Problem((*path, "type"), str(err).split(": ", 1)[-1]) from None
    return _converter.structure(_check_section(value, cls, path), cls)


def _check_union(value: Any, tp: Any, path: _Path) -> Any:
    args = typing.get_args(tp)
    tagged = _tagged_members(tp)
    if value is None:
        if type(None) in args:
            return None
        if tagged is not None:  # "optimizer:" with every entry commented out: the default type
            return _check_tagged({}, tagged, path)
        raise _Problem(path, f"expected {_describe_type(tp)}, got null")
    if tagged is not None:
        return _check_tagged(value, tagged, path)
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:  # X | None: X's own message is the precise one
        return _check(value, members[0], path)
    for member in members:
        try:
            return _check(value, member, path)
        except _Problem as e:
            if e.path != path:  # the value has this member's shape; the mistake is deeper
                raise
    raise _Problem(path, f"expected {_describe_type(tp)}, got {_show(value)}")


def _check_tagged(value: Any, members: dict[str, type], path: _Path) -> dict:
    """A section of a tagged union: its ``type`` (the first member's when absent) picks the
    record, then the section is checked as that record; the result names its ``type``.

    A key the chosen type does not take but another does is one error naming the types that
    take it; a key no type takes is an unknown key (with "did you mean"). ``null`` for a key the
    chosen type does not take (but another does) unsets it.
    """
    if not isinstance(value, Mapping):
        raise _Problem(path, f"expected a mapping, got {_show(value)}")
    tag = value.get("type", next(iter(members)))
    _check_literal(tag, tuple(members), (*path, "type"))
    cls = members[tag]
    own = {f.name: f for f in _fields(cls)}
    # null unsets a key that another type takes but the chosen one does not:
    # `optimizer.type=muon optimizer.betas=null` switches a file's adamw section to muon.
    unset = {k for k, v in value.items() if v is None and k not in own and _takes_key(members, k)}
    value = {k: v for k, v in value.items() if k not in unset}

    def takers(name: str) -> str:
        them = [t for t, m in members.items() if name in {f.name for f in _fields(m)}]
        return f"{', '.join(them)} take{'s' * (len(them) == 1)} it"

    others = sorted({f.name for m in members.values() for f in _fields(m)} - own.keys())
    for key in value:
        if key in own:
            continue
        kind = f"{_dotted((*path, 'type'))}: {tag}"
        if key in others:
            raise _Problem((*path, str(key)), f"is not a field of {kind} ({takers(key)})", sep=" ")
        near_other = _similar(str(key), others)[:1]
        near_own = _similar(str(key), sorted(own))[:1]
        if near_other and (not near_own or near_other[0][1] > near_own[0][1]):
            name = near_other[0][0]  # a typo of another type's key
            raise _Problem(
                (*path, str(key)),
                f"is not a field of {kind}; did you mean "
                f"'{_dotted((*path, name))}' ({takers(name)})?",
                sep=" ",
            )
    return {"type": tag, **_check_section(value, cls, path)}


def _takes_key(members: dict[str, type], key: Any) -> bool:
    return any(key in {f.name for f in _fields(m)} for m in members.values())


def _check_literal(value: Any, choices: tuple, path: _Path) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return value
    shown = ", ".join(_yaml_scalar(c) for c in choices)
    message = f"{_show(value)} is not one of: {shown}"
    if isinstance(value, str):
        close = _similar(value, [c for c in choices if isinstance(c, str)])
        if close:
            message += f" (did you mean '{close[0][0]}'?)"
    raise _Problem(path, message)


def _number_from_string(value: str) -> float | None:
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text.replace("_", ""))
    return None


_INT64 = (-(2**63), 2**63 - 1)  # what torch, numpy and C libraries take as an integer


def _check_int(value: Any, path: _Path) -> int:
    number = _int_value(value, path)
    if not _INT64[0] <= number <= _INT64[1]:
        raise _Problem(path, f"integer out of the 64-bit range: {_show(number)}")
    return number


def _int_value(value: Any, path: _Path) -> int:
    if isinstance(value, bool):
        raise _Problem(path, f"expected an integer, got {_show(value)}")
    if isinstance(value, int):
        return value
    number: float | None = value if isinstance(value, float) else None
    if isinstance(value, str):
        if _INTEGER.fullmatch(value.strip()):
            return int(value.strip().replace("_", ""))
        number = _number_from_string(value)
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise _Problem(path, f"expected an integer, got {_show(value)}")


def _check_float(value: Any, path: _Path) -> float:
    if isinstance(value, bool):
        raise _Problem(path, f"expected a number, got {_show(value)}")
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise _Problem(path, f"number too large: {_show(value)}") from None
    if isinstance(value, str):
        number = _number_from_string(value)  # "3e-4": a float that PyYAML left as a string
        if number is not None:
            return number
    raise _Problem(path, f"expected a number, got {_show(value)}")


def _unknown_key_message(path: _Path, section: type, root: type) -> str:
    """``unknown key 'train.lr'; did you mean 'optimizer.lr'?`` (or the valid keys)."""
    *parent, key = [str(p) for p in path]
    here = [f.name for f in _fields(section)]
    prefix = f"{_dotted(path[:-1])}." if parent else ""  # list items as [i]: data.sources[0].
    near = [(prefix + name, score) for name, score in _similar(key, here)[:1]]
    # The same key in another section (train.lr → optimizer.lr) beats a loose match here.
    elsewhere = [p for p in _all_paths(root, sections=False) if p[:-1] != tuple(parent)]
    exact = [".".join(p) for p in elsewhere if _norm(p[-1]) == _norm(key)]
    if near and near[0][1] == 1.0:  # a different case, or lr_rate → lr: surely meant here
        exact = []
    suggestions = [name for name, score in near if score >= 0.8 or not exact] + exact
    if not suggestions:  # failing all else, a close key in another section
        near_elsewhere = _similar(key, sorted({p[-1] for p in elsewhere}))[:1]
        close = [name for name, score in near_elsewhere if score >= 0.8]
        suggestions = [".".join(p) for p in elsewhere if p[-1] in close]
    message = f"unknown key '{_dotted(path)}'"
    if suggestions:
        return f"{message}; did you mean {_or_list(suggestions[:3])}?"
    where = f" in '{_dotted(path[:-1])}'" if parent else ""
    return f"{message}; valid keys{where}: {', '.join(here)}"


# ----------------------------------------------------------------------------------------------
# The converter: strict scalar hooks behind the pre-check (which already normalised the values)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (bool, int, float, str):
        conv.register_structure_hook(tp, lambda value, t: _check(value, t, ()))

    def structure_union(value: Any, tp: Any) -> Any:
        # cattrs needs a strategy for unions of several types; the pre-check already chose one.
        if value is None and type(None) in typing.get_args(tp):
            return None
        tagged = _tagged_members(tp)
        if tagged is not None:  # the member its `type` names (the pre-check added it)
            tag = value.get("type", next(iter(tagged))) if isinstance(value, Mapping) else None
            return conv.structure(value, tagged.get(tag, next(iter(tagged.values()))))
        errors = []
        for member in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return conv.structure(value, member)
            except Exception as e:  # try the next member
                errors.append(e)
        raise errors[0]

    def several(tp: Any) -> bool:
        return _is_union(tp) and sum(a is not type(None) for a in typing.get_args(tp)) > 1

    conv.register_structure_hook_func(several, structure_union)
    return conv


_converter = _make_converter()


def _cattrs_problem(error: BaseException, path: _Path = ()) -> _Problem:
    """The first leaf of a cattrs error tree, with its key path (a backstop to the pre-check)."""
    if isinstance(error, _Problem):
        return _Problem(path + error.path, error.message, section=error.section, sep=error.sep)
    if isinstance(error, ClassValidationError | IterableValidationError):
        with_notes, without = error.group_exceptions()
        for exc, note in with_notes:
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            step = name if name is not None else index
            return _cattrs_problem(exc, path if step is None else (*path, step))
        for exc in without:
            return _cattrs_problem(exc, path)
    return _Problem(path, str(error).replace("\n", " ") or type(error).__name__)


# ----------------------------------------------------------------------------------------------
# YAML reading with line numbers


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader; a separate class so that nothing global is changed."""


def _timestamp_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A YAML timestamp (``2026-01-01``) as PyYAML builds it, or its text when it is no real
    date (``2026-13-45``): PyYAML raises a bare ValueError there, which the string field's own
    check turns into a message with the key."""
    try:
        return loader.construct_yaml_timestamp(node)
    except ValueError:
        return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_or_text)


def _parse_yaml(text: str, name: str) -> tuple[Any, dict[_Path, int]]:
    """Parse one YAML document; return the data and the line (1-based) of every key path."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_duplicate_keys(node, (), name)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        column = f" (column {mark.column + 1})" if mark else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {_one_line(what)}{column}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {_one_line(str(e))}") from None
    finally:
        loader.dispose()
    lines: dict[_Path, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_duplicate_keys(node: yaml.Node, path: _Path, name: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a config must not."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise ConfigError(
                        f"{name}:{line}: duplicate key '{_dotted((*path, key.value))}' "
                        f"(first on line {seen[key.value]})"
                    )
                seen[key.value] = line
                _check_duplicate_keys(value, (*path, key.value), name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, (*path, i), name)


def _collect_lines(node: yaml.Node, path: _Path, lines: dict[_Path, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                sub = (*path, key.value)
                _collect_lines(value, sub, lines)
                lines[sub] = key.start_mark.line + 1  # a key's line: where the key is written
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*path, i), lines)


def _read_file(path: Path) -> tuple[Any, dict[_Path, int]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file: {e.strerror}") from None
    return _parse_yaml(text, name)


# ----------------------------------------------------------------------------------------------
# Overrides


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key.path=value (e.g. optimizer.lr=3e-4)")
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise ConfigError(f"override '{text}': empty name in key path '{key}'")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': invalid YAML value: {_one_line(str(e))}") from None
    return parts, value


def _override_type(parts: tuple[str, ...], root: type) -> Any:
    """The schema type at an override's key path; raises _Problem for unknown keys."""
    tp: Any = root
    for i, name in enumerate(parts):
        classes = _section_classes(tp)
        stripped = _strip_optional(tp)
        if classes:  # a tagged union: a key any member takes (the chosen one is checked later)
            fields = {f.name: f for cls in reversed(classes) for f in _fields(cls)}
            if name not in fields:
                raise _Problem(parts[: i + 1], "unknown key", section=classes[0])
            tp = fields[name].type
        elif typing.get_origin(stripped) in (dict, Mapping):
            tp = typing.get_args(stripped)[1] if typing.get_args(stripped) else Any
        elif stripped is not Any:
            raise _Problem(parts[:i], f"is {_describe_type(tp)}, not a section with key '{name}'")
    return tp


def _apply_override(raw: dict, parts: tuple[str, ...], value: Any) -> None:
    node = raw
    for i, name in enumerate(parts[:-1]):
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        elif not isinstance(child, dict):
            raise _Problem(parts[: i + 1], f"expected a mapping, got {_show(child)}")
        node = child
    old = node.get(parts[-1])
    node[parts[-1]] = _merge(old, value) if isinstance(old, dict) else value


def _merge(old: dict, new: Any) -> Any:
    """A mapping override merges into the mapping it replaces (``model={num_layers: 2}``)."""
    if not isinstance(new, dict):
        return new
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) else v
    return out


def _wants_text(tp: Any) -> bool:
    """Whether an override's value is a string field's text (``run.name=2024`` is a name)."""
    return _strip_optional(tp) is str


# ----------------------------------------------------------------------------------------------
# Public API


def _plain(value: Any) -> Any:
    """A deep copy in plain types: mappings → dict, sequences → list, attrs records → dict."""
    if attrs.has(type(value)):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_config(
    source: str | os.PathLike | Mapping | None = None,
    overrides: Sequence[str] = (),
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Load a config strictly from a YAML file, a mapping or defaults, then apply overrides.

    Args:
        source: a YAML file path (``str`` is always a path), a mapping of sections, or None for
            all defaults.
        overrides: ``key.path=value`` strings applied in order; values are YAML
            (``data.synthetic.tasks=[sort]``, ``model.num_kv_heads=null``).
        cls: the attrs record to build (any attrs class; the run config by default).

    Returns:
        The frozen record.

    Raises:
        ConfigError: one line naming the file (and line) or the override, the key path, and what
            to do: unknown keys (with the closest valid key), wrong types, invalid choices, a
            missing file, invalid YAML.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    lines: dict[_Path, int] = {}
    name: str | None = None
    if source is None:
        raw: Any = {}
    elif isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        raw, lines = _read_file(Path(source))
    elif isinstance(source, Mapping):
        raw = _plain(source)
    else:
        raise ConfigError(f"config source must be a path or a mapping, got {type(source).__name__}")

    def where(path: _Path) -> str:
        """The message prefix of a mistake at ``path`` that came from the file or the mapping."""
        if name is None:
            return ""
        line = lines.get(path)
        return f"{name}:{line}: " if line else f"{name}: "

    if raw is None:  # an empty file is a valid (all-defaults) config
        raw = {}
    if not isinstance(raw, dict):
        keys = ", ".join(f.name for f in _fields(cls))
        raise ConfigError(
            f"{where(())}the top level must be a mapping of sections ({keys}), got {_show(raw)}"
        )

    origin: dict[tuple[str, ...], str] = {}  # key paths set by an override → the override
    for text in overrides:
        parts, value = _parse_override(text)
        try:
            tp = _override_type(parts, cls)
            if _wants_text(tp) and isinstance(value, bool | int | float):
                value = text.partition("=")[2].strip()
            _apply_override(raw, parts, value)
        except _Problem as p:
            raise ConfigError(f"override '{text}': {_format(p, cls)}") from None
        origin = {k: v for k, v in origin.items() if k[: len(parts)] != parts}
        origin[parts] = text

    try:
        checked = _check(raw, cls, ())
        return _converter.structure(checked, cls)
    except _Problem as p:
        problem = p
    except (cattrs.BaseValidationError, ValueError, TypeError) as e:  # e.g. attrs validators
        problem = _cattrs_problem(e)
    # A mistake inside an override's value: blame the override (the most specific one).
    for parts, text in sorted(origin.items(), key=lambda item: -len(item[0])):
        if problem.path[: len(parts)] == parts:
            raise ConfigError(f"override '{text}': {_format(problem, cls)}")
    raise ConfigError(where(problem.path) + _format(problem, cls))


def _format(problem: _Problem, root: type) -> str:
    if problem.section is not None:
        return _unknown_key_message(problem.path, problem.section, root)
    if not problem.path:
        return problem.message
    return f"{_dotted(problem.path)}{problem.sep}{problem.message}"


def to_dict(config: Any) -> dict:
    """The record as plain YAML-able types (tuples become lists), keys in schema order."""
    return _plain_out(_converter.unstructure(config))


def _plain_out(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_out(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_out(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Block mappings, and lists of scalars on one line (``betas: [0.9, 0.999]``)."""


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    flow = all(not isinstance(v, Mapping | list) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(config: Any) -> str:
    """The record as YAML text, keys in schema order; ``load_config`` reads it back equal."""
    return yaml.dump(
        to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write ``to_yaml(config)`` to ``path`` atomically (parent folders are created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_yaml(config), encoding="utf-8")
    os.replace(tmp, path)
    return path
