"""The generated reference ``docs/config.md`` matches the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs

from tscale.config import Config, render_reference
from tscale.config.load import _tagged_members

ROOT = Path(__file__).resolve().parents[2]


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, attrs.Attribute]]:
    """``(key path, field)`` of every leaf, each member of a tagged union included."""
    out = []
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        members = _tagged_members(field.type) or field.metadata.get("registry")
        if members is not None:
            for member in members.values():
                out += _leaf_fields(member, f"{prefix}{field.name}.")
        elif isinstance(field.type, type) and attrs.has(field.type):
            out += _leaf_fields(field.type, f"{prefix}{field.name}.")
        else:
            out.append((prefix + field.name, field))
    return out


def test_checked_in_reference_is_current():
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == render_reference(), (
        "docs/config.md is out of date: run `python -m tscale.config.reference > docs/config.md`"
    )


def test_every_key_has_a_row_with_its_help():
    """One row per key; a key several types of a tagged union take has a row per distinct
    help (the shared keys one row under the union's heading)."""
    text = render_reference()
    for path, field in _leaf_fields(Config):
        if (
            field.name == "type"
            and path.count(".") == 1
            and path.startswith(("optim", "sched", "task"))
        ):
            continue  # the union's type row lists every tag
        rows = [line for line in text.splitlines() if line.startswith(f"| `{path}` |")]
        assert rows, path
        help_text = " ".join(field.metadata["help"].split()).replace("|", "\\|")
        assert any(help_text in row for row in rows), path
    assert "| `optimizer.type` | `adamw` \\| `adamw_8bit` \\| `lion`" in text
    assert "\n### `optimizer.type: sophia_g`\n" in text


def test_one_table_per_section_with_defaults():
    text = render_reference()
    for heading in ("## `run`", "## `optimizer`", "### `data.synthetic`", "### `data.tokenizer`"):
        assert f"\n{heading}\n" in text
    assert "| `optimizer.betas` | [float, float] | `[0.965, 0.99]` |" in text  # sophia_g's
    assert (
        "| `scheduler.type` | `cosine` \\| `constant` \\| `cosine_restarts` \\| `linear` \\| "
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
    for path, field in _leaf_fields(Config):
        domain = domain_of(field)
        if domain is None:
            continue
        rows = [line for line in text.splitlines() if line.startswith(f"| `{path}` |")]
        assert any(f" | {domain.describe()} | " in row for row in rows), path
        shown += 1
    assert shown >= 40  # the run's numeric keys (optimizer and scheduler records add theirs)
    assert "| `train.keep_last` | int | `2` | >= 1, or 0: keep all |" in text
