"""The generated reference ``docs/config.md`` matches the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs

from tscale.config import Config, render_reference

ROOT = Path(__file__).resolve().parents[2]


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for field in attrs.fields(cls):
        attrs.resolve_types(cls)
        if isinstance(field.type, type) and attrs.has(field.type):
            out += _leaf_paths(field.type, f"{prefix}{field.name}.")
        else:
            out.append(prefix + field.name)
    return out


def test_checked_in_reference_is_current():
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == render_reference(), (
        "docs/config.md is out of date: run `python -m tscale.config.reference > docs/config.md`"
    )


def test_every_key_has_a_row_with_its_help():
    text = render_reference()
    for path in _leaf_paths(Config):
        rows = [line for line in text.splitlines() if line.startswith(f"| `{path}` |")]
        assert len(rows) == 1, path
        *_, name = path.split(".")
        section = Config
        for part in path.split(".")[:-1]:
            section = attrs.fields_dict(section)[part].type
        help_text = attrs.fields_dict(section)[name].metadata["help"]
        assert help_text.replace("|", "\\|") in rows[0]


def test_one_table_per_section_with_defaults():
    text = render_reference()
    for heading in ("## `run`", "## `optimizer`", "### `data.synthetic`", "### `data.tokenizer`"):
        assert f"\n{heading}\n" in text
    assert "| `optimizer.betas` | [float, float] \\| null | `null` |" in text
    assert (
        "| `scheduler.type` | `constant` \\| `cosine` \\| `cosine_restarts` \\| `linear` \\| "
        "`wsd` \\| `rex` \\| `inverse_sqrt` \\| `polynomial` | `cosine` |"
    ) in text
    assert "| `run.threads` | int \\| null | `null` |" in text


def test_module_prints_the_reference():
    out = subprocess.run(
        [sys.executable, "-m", "tscale.config.reference"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout == render_reference()
    assert out.stderr == ""


def test_every_declared_domain_is_in_its_row():
    from tscale.core.fields import domain_of

    text = render_reference()
    shown = 0
    for path in _leaf_paths(Config):
        *parents, name = path.split(".")
        section = Config
        for part in parents:
            section = attrs.fields_dict(section)[part].type
        domain = domain_of(attrs.fields_dict(section)[name])
        if domain is None:
            continue
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{path}` |")]
        assert f" | {domain.describe()} | " in row, path
        shown += 1
    assert shown >= 40  # the run's numeric keys (optimizer and scheduler records add theirs)
    assert "| `train.keep_last` | int | `2` | >= 1, or 0: keep all |" in text
