"""The run's tokenizer and chat template, and the generation prompt of an eval record.

Configs stop here (house rule 2): :func:`build_encoder` and :func:`select_template` read the
``data.tokenizer`` / ``model.path`` / ``data.template`` keys and name them in errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from tscale.config.schema import Config
from tscale.core.result import Ok
from tscale.data.hf_tokenizer import add_tokens
from tscale.data.prompt import (
    BUILTIN_TEMPLATES,
    TEMPLATE_NAMES,
    ChatTemplate,
    render_messages,
    to_messages,
)
from tscale.data.tokenize import Encoder
from tscale.errors import ConfigError, DataError

CHAT_KEYS = ("messages", "conversations")
PLAIN_SOURCE = BUILTIN_TEMPLATES["plain"].source
"""The ``plain`` template's source: a run with it exports no chat template."""


@attrs.frozen
class SelectedTemplate:
    """The template the data is rendered with; ``plain_only``: ``data.template: auto`` fell back
    to ``plain`` (no chat_template in the tokenizer), so chat records are an error."""

    template: ChatTemplate
    plain_only: bool = False

    def check(self, records: Sequence[dict], encoder: Encoder) -> None:
        if self.plain_only and any(k in r for r in records for k in CHAT_KEYS):
            where = f" ({encoder.source})" if encoder.source else " (trained by tscale)"
            names = ", ".join(n for n in TEMPLATE_NAMES if n != "plain")
            raise DataError(
                f"data.template: auto, but the tokenizer{where} has no chat_template and the "
                "data is chat (messages): plain would glue the turns together; set "
                f"data.template to a built-in ({names}), "
                "a .jinja file or a Jinja2 string, or use a tokenizer folder with a chat template"
            )


def select_template(cfg: Config, encoder: Encoder) -> SelectedTemplate:
    """The template of ``data.template`` with the tokenizer's bos/eos strings and
    ``data.template_date`` bound (see docs/data.md, templates).

    Raises:
        ConfigError: an unknown name, a missing ``.jinja`` file or invalid Jinja2.
    """
    d = cfg.data
    spec = d.template

    def bind(tpl: ChatTemplate) -> ChatTemplate:
        try:
            return tpl.with_tokens(
                bos_token=encoder.bos_token or "",
                eos_token=encoder.eos_token or "",
                date=d.template_date,
            )
        except DataError as e:
            raise ConfigError(str(e)) from None

    def compile_source(source: str, name: str) -> ChatTemplate:
        try:
            return ChatTemplate.from_jinja(source, name=name)
        except DataError as e:
            raise ConfigError(f"data.template: {e}") from None

    if spec == "auto":
        if encoder.chat_template is not None:
            return SelectedTemplate(bind(compile_source(encoder.chat_template, "tokenizer")))
        return SelectedTemplate(bind(BUILTIN_TEMPLATES["plain"]), plain_only=True)
    if spec in BUILTIN_TEMPLATES:
        return SelectedTemplate(bind(BUILTIN_TEMPLATES[spec]))
    if "{%" in spec or "{{" in spec:
        return SelectedTemplate(bind(compile_source(spec, "data.template")))
    path = Path(spec)
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"data.template: template file {spec} not found")
        return SelectedTemplate(bind(compile_source(path.read_text(encoding="utf-8"), path.name)))
    raise ConfigError(
        f"data.template: unknown template {spec!r}; use auto (the tokenizer's chat_template), "
        f"a built-in ({', '.join(TEMPLATE_NAMES)}), a path to a .jinja file or a Jinja2 string"
    )


def prompt_encoder(
    cfg: Config, encoder: Encoder, template: ChatTemplate | None = None
) -> Callable[[dict], list[int]]:
    """``record -> ids`` of the generation prompt: the template's rendering of every message but
    the last (the answer), with the generation prompt added, encoded without special tokens;
    BOS first when the tokenizer adds one and the template did not write it (never twice)."""
    d = cfg.data
    tpl = template if template is not None else select_template(cfg, encoder).template
    plain = tpl.source == PLAIN_SOURCE
    bos = [encoder.bos_id] if encoder.adds_bos and encoder.bos_id is not None else []

    def encode(record: dict) -> list[int]:
        if plain and "prompt" in record:
            return encoder.encode_prompt(record["prompt"])
        messages = to_messages(record, system=d.system_prompt)
        if not isinstance(messages, Ok):
            raise DataError(f"eval record cannot be rendered: {messages.reason}")
        text = render_messages(tpl, messages.value[:-1], add_generation_prompt=True)
        ids = encoder.tokenizer.encode(text, add_special_tokens=False).ids
        return ids if not bos or ids[:1] == bos else [*bos, *ids]

    return encode


def build_encoder(cfg: Config, trained: Callable[[], Any]) -> Encoder:
    """The run's tokenizer (see docs/data.md, tokenizers): ``data.tokenizer.path`` (an HF
    folder or a tokenizer.json), else ``model.path``'s folder, else tscale's BPE trained by
    ``trained()``; with ``data.tokenizer.add_tokens`` added."""
    d, m = cfg.data, cfg.model
    if d.tokenizer.path is not None:
        encoder = Encoder.from_path(d.tokenizer.path, key="data.tokenizer.path")
    elif m.path is not None:
        if not Path(m.path).is_dir():
            raise ConfigError(
                f"model.path: {m.path} not found; give a local HF model folder (config.json, "
                "safetensors weights, tokenizer files)"
            )
        if not (Path(m.path) / "tokenizer.json").is_file():
            raise ConfigError(
                f"model.path {m.path} has no tokenizer.json: set data.tokenizer.path to the "
                "model's HF tokenizer folder (a tokenizer trained here would not match the "
                "pretrained embeddings)"
            )
        encoder = Encoder.from_path(m.path, key="model.path")
    else:
        encoder = Encoder.from_tokenizer(trained())
    if d.tokenizer.add_tokens:
        encoder = add_tokens(encoder, d.tokenizer.add_tokens)
    return encoder  # a missing pad (pad_is_eos) is said once, in the data report


def tokenizer_summary(encoder: Encoder, template: ChatTemplate) -> dict[str, Any]:
    """The tokenizer and template of a run, for its data report."""
    return {
        "source": encoder.source or "trained (tscale BPE)",
        "vocab_size": encoder.vocab_size,
        **encoder.special_tokens,
        "adds_bos": encoder.adds_bos,
        "pad_is_eos": encoder.pad_is_eos,
        "template": template.name,
        "template_date": template.date,
    }
