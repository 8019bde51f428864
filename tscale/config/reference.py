"""The config reference (``docs/config.md``), generated from the schema.

Regenerate it after a schema change with ``python -m tscale.config.reference > docs/config.md``;
a test fails while the checked-in file differs.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from tscale.config.load import (
    _fields,
    _is_union,
    _plain_out,
    _section_class,
    _tagged_members,
    _yaml_scalar,
)
from tscale.config.schema import Config
from tscale.core.fields import domain_of

__all__ = ["render_reference"]

_HEADER = """\
# Configuration reference

<!-- Generated from tscale/config/schema.py by `python -m tscale.config.reference > docs/config.md`.
     Do not edit by hand: a test fails while this file and the schema disagree. -->

A config is a YAML file of the sections below. Every key has a default, so an empty file is a
valid config; a key that is not listed here is an error (the message names the closest valid key).
Any key can be overridden on the command line as `key.path=value`, where the value is YAML:
`optimizer.lr=3e-4`, `data.synthetic.tasks=[sort]`, `model.num_kv_heads=null`.

The domain column gives the values a number accepts (for a list or mapping: each of its
numbers), and the special values allowed outside that range with what they mean
(`>= 1, or 0: keep all`). The loader checks it when the config is read, so a value outside it
stops at once with the key and the file:line where it was written.
"""


def _type_name(tp: Any) -> str:
    """A short name of a schema type for the table (``int | null``, ``list[str]``)."""
    if tp is Any or tp is object:
        return "any"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and attrs.has(tp):
        return "section"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(f"`{_yaml_scalar(a)}`" for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, Sequence) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin in (dict, Mapping):
        return f"mapping[{_type_name(args[0])}, {_type_name(args[1])}]" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: attrs.Attribute) -> str:
    """The default as YAML, in code quotes."""
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory(None) if default.takes_self else default.factory()
    if attrs.has(type(default)):
        return "see below"
    if isinstance(default, list):  # a list of records (e.g. task.rewards.functions): as mappings
        default = [attrs.asdict(x) if attrs.has(type(x)) else x for x in default]
    return f"`{_yaml_scalar(_plain_out(default))}`"


def _domain(field: attrs.Attribute) -> str:
    """The field's declared domain in words (empty when any value of its type is accepted)."""
    domain = domain_of(field)
    return domain.describe() if domain is not None else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(path: str) -> str:
    """GitHub's anchor of a heading "`a.b`"."""
    return path.replace(".", "").lower()


def _section(
    cls: type,
    path: tuple[str, ...],
    level: int,
    title: str | None,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    """The heading, docstring and table of one section (without the fields in ``skip``), then
    its subsections."""
    out = []
    dotted = ".".join(path)
    out.append(f"{'#' * level} {title or f'`{dotted}`'}\n")
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    if doc and path:
        out.append(_cell(doc) + "\n")
    rows = []
    nested = []
    for field in _fields(cls):
        if field.name in skip:
            continue
        key = ".".join((*path, field.name))
        help_text = _cell(field.metadata.get("help", ""))
        sub = _section_class(field.type)
        members = _tagged_members(field.type) or field.metadata.get("registry")
        if (sub is not None or members is not None) and path:
            help_text += f" See [`{key}`](#{_anchor(key)})."
        if members is not None:
            tag = getattr(field.default, "type", None)
            if tag in members:  # the default type first: its table gives the shared defaults
                members = {tag: members[tag], **members}
            nested.append((members, (*path, field.name), help_text))
            continue  # a tagged union: its own heading, then one per type
        if sub is not None:
            nested.append((sub, (*path, field.name), None))
            if not path:
                continue  # top-level sections are the headings themselves
        type_name = _cell(_type_name(field.type))
        domain = _cell(_domain(field))
        rows.append(f"| `{key}` | {type_name} | {_default(field)} | {domain} | {help_text} |")
    if rows:
        out.append("| key | type | default | domain | description |")
        out.append("| --- | --- | --- | --- | --- |")
        out.extend(rows)
        out.append("")
    for sub, sub_path, help_text in nested:
        out.append("")
        level_below = min(len(sub_path) + 1, 6)
        if isinstance(sub, dict):
            is_open = sub_path[-1] in {f.name for f in _fields(cls) if "registry" in f.metadata}
            out.extend(
                _tagged_section(sub, sub_path, level_below, help_text or "", open_union=is_open)
            )
        else:
            out.extend(_section(sub, sub_path, level_below, None))
    return out


def _tagged_section(
    members: dict[str, type],
    path: tuple[str, ...],
    level: int,
    help_text: str,
    *,
    open_union: bool = False,
) -> list[str]:
    """A tagged union: the keys every type shares (same type, default and help) under the
    union's heading, then one heading per type with its own keys."""
    dotted = ".".join(path)
    classes = list(members.values())

    def same_everywhere(name: str) -> bool:
        fields = [next((f for f in _fields(c) if f.name == name), None) for c in classes]
        first = fields[0]
        return all(
            f is not None
            and (f.type, _default(f), f.metadata.get("help"))
            == (first.type, _default(first), first.metadata.get("help"))  # type: ignore[union-attr]
            for f in fields
        )

    shared = frozenset(
        f.name for f in _fields(classes[0]) if f.name != "type" and same_everywhere(f.name)
    )
    tags = ", ".join(f"[`{t}`](#{_heading_anchor(f'{dotted}.type: {t}')})" for t in members)
    out = [f"{'#' * level} `{dotted}`\n"]
    if help_text:
        out.append(help_text + "\n")
    out.append(
        f"`{dotted}.type` picks one of {tags}; each type takes the keys below and its own, and "
        "a key that the chosen type does not take is an error.\n"
    )
    if open_union:
        out.append(
            f"`{dotted}.type` may also name a record of your own as `module:ClassName` (an open "
            "union; see [tasks.md](tasks.md)): its fields are then the section's keys.\n"
        )
    # The shared keys' table as _section renders it (header and columns included), with the
    # type row listing every tag.
    keep = shared | {"type"}
    first = _section(classes[0], path, level, None, skip=frozenset(_fields_but(classes[0], keep)))
    table = [line for line in first if line.startswith("|")]
    type_row = next(i for i, line in enumerate(table) if line.startswith(f"| `{dotted}.type` |"))
    cells = table[type_row].split(" | ")
    cells[1] = " \\| ".join(f"`{t}`" for t in members)
    cells[-1] = "The type: the keys of each are below. |"
    table[type_row] = " | ".join(cells)
    out.extend([*table, ""])
    sub_level = min(level + 1, 6)
    for tag, cls in members.items():
        out.append("")
        title = f"`{dotted}.type: {tag}`"
        own = _section(cls, path, sub_level, title, skip=shared | {"type"})
        defaults = _run_defaults_line(cls)
        if defaults:
            own.insert(2 if len(own) > 1 and not own[1].startswith("|") else 1, defaults)
        if not any(line.startswith("| `") for line in own):
            own.append("No keys of its own.\n")
        out.extend(own)
    return out


def _run_defaults_line(cls: type) -> str:
    """The line naming a type's own defaults of the run-dependent keys (``run_defaults``: they
    win over the fine-tuning / random-init ones when the key is null), or ''."""
    own = getattr(cls, "run_defaults", None) or {}
    if not own:
        return ""
    keys = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in own.items())
    return (
        f"Its own defaults of null keys (over the fine-tuning / random-init ones; a value you "
        f"set wins): {keys}.\n"
    )


def _fields_but(cls: type, keep: frozenset[str]) -> list[str]:
    return [f.name for f in _fields(cls) if f.name not in keep]


def _heading_anchor(text: str) -> str:
    """GitHub's anchor of a heading "`text`": lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", text).lower().replace(" ", "-")


def render_reference(cls: type = Config) -> str:
    """The markdown reference of a config schema: one table per section (key, type, default,
    domain, help).

    Args:
        cls: the root attrs record (the run config by default).
    """
    lines = [_HEADER]
    top = [f for f in _fields(cls) if _section_class(f.type) is None]
    body = _section(cls, (), 2, "Top-level keys")
    if not top:
        body = body[1:]  # no keys outside sections: drop the empty "Top-level keys" heading
    lines.extend(body)
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip("\n") + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
