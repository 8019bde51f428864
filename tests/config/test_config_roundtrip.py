"""Property tests: any config survives YAML and overrides (strategies derived from the schema)."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

import attrs
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tscale.config import Config, load_config, to_dict, to_yaml
from tscale.core.fields import Domain, domain_of
from tscale.tasks import TASKS

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_FLOAT = st.floats(allow_nan=False)
_INT64 = (-(2**63), 2**63 - 1)  # the loader refuses integers wider than 64 bits
_INT = st.integers(*_INT64)


def _field_values(f: attrs.Attribute) -> st.SearchStrategy:
    """A field's values; an open union (``task``) takes any registered record of it."""
    if "resolve" in f.metadata:
        return st.one_of(*(_values(cls) for _, cls in sorted(TASKS.items())))
    return _values(f.type, domain_of(f))


def _values(tp: Any, domain: Domain | None = None) -> st.SearchStrategy:
    """Values of a schema type, from the type and the field's declared domain alone, so new
    fields are covered automatically (a domain applies to a number, or to each item of a list or
    mapping of numbers)."""
    if isinstance(tp, type) and attrs.has(tp):
        attrs.resolve_types(tp)
        return st.builds(tp, **{f.name: _field_values(f) for f in attrs.fields(tp) if f.init})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, type(int | None)):
        return st.one_of(*(_values(a, domain) for a in args))
    if origin is list:
        return st.lists(_values(args[0], domain), max_size=3)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_values(args[0], domain), max_size=3).map(tuple)
        return st.tuples(*(_values(a, domain) for a in args))
    if origin is dict:
        return st.dictionaries(_values(args[0]), _values(args[1], domain), max_size=3)
    if domain is not None and tp in (int, float):
        return _in_domain(tp, domain)
    simple = {bool: st.booleans(), int: _INT, float: _FLOAT, str: _TEXT}
    if tp is Any:  # free-form YAML (parallel.deepspeed.config): scalars, lists and mappings
        scalars = st.none() | st.booleans() | st.integers() | _FLOAT | _TEXT
        return st.recursive(
            scalars,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
            max_leaves=6,
        )
    if tp is type(None):
        return st.none()
    return simple[tp]


def _in_domain(tp: type, d: Domain) -> st.SearchStrategy:
    """Numbers of type ``tp`` inside the domain ``d``, or one of its sentinels."""
    low = d.ge if d.ge is not None else d.gt
    high = d.le if d.le is not None else d.lt
    if tp is int:
        lo = _INT64[0] if low is None else math.floor(low) + (d.gt is not None)
        hi = _INT64[1] if high is None else math.ceil(high) - (d.lt is not None)
        inside = st.integers(min_value=lo, max_value=hi)
    else:
        inside = st.floats(
            min_value=low,
            max_value=high,
            exclude_min=d.gt is not None,
            exclude_max=d.lt is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    return inside | st.sampled_from(list(d.sentinels)) if d.sentinels else inside


@settings(max_examples=60, deadline=None)
@given(_values(Config))
def test_yaml_round_trip(cfg):
    assert load_config(yaml.safe_load(to_yaml(cfg))) == cfg


@settings(max_examples=60, deadline=None)
@given(_values(Config))
def test_file_round_trip(tmp_path_factory, cfg):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def _leaves(data: dict, cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Key paths of the leaves; a mapping field (e.g. data.column_map) is one leaf, since its
    keys may be any string (empty, dotted) that a key path cannot spell."""
    attrs.resolve_types(cls)
    types = {f.name: f.type for f in attrs.fields(cls)}
    out = []
    for key, value in data.items():
        tp = types[key]
        if isinstance(tp, type) and attrs.has(tp):
            out += _leaves(value, tp, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


@settings(max_examples=60, deadline=None)
@given(_values(Config), st.data())
def test_overrides_rebuild_any_config(cfg, data):
    """Writing some leaves as ``key=yaml`` overrides over the defaults gives the same values."""
    leaves = _leaves(to_dict(cfg))
    chosen = data.draw(st.lists(st.sampled_from(leaves), max_size=6, unique_by=lambda kv: kv[0]))
    overrides = []
    for key, value in chosen:
        text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
        overrides.append(f"{key}={text.removesuffix(chr(10)).removesuffix(chr(10) + '...')}")
    rebuilt = to_dict(load_config(None, overrides))
    expected = dict(_leaves(to_dict(Config())))
    expected.update(chosen)
    assert dict(_leaves(rebuilt)) == expected


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False))
def test_floats_in_any_yaml_spelling(x):  # optimizer.lr's domain: >= 0
    for text in (repr(x), f"{x:e}", f"{x:g}"):
        cfg = load_config(yaml.safe_load(f"optimizer:\n  lr: {text}\n"))
        assert cfg.optimizer.lr == float(text)
