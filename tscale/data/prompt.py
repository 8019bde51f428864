"""Prompt engine: canonical records → chat messages → template text with trained character spans.

Records come in three shapes (see :func:`to_messages`): ``{"prompt", "completion"}``, alpaca
``{"instruction", "input", "output"}`` and chat ``{"messages": [{"role", "content"}, ...]}``
(ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` is normalised by
:func:`normalize_sharegpt`). Every
record becomes a list of messages, and every template is a Jinja2 source rendering ``messages`` and
``add_generation_prompt`` exactly like a Hugging Face ``chat_template``.

Where the loss is trained is found from the template's ``{% generation %}`` blocks when it has
them (as ``transformers``' ``return_assistant_tokens_mask``: each block's output is a trained
span, found by rendering the conversation once), else by **rendering prefixes**: assistant
turn ``i`` starts where ``render(messages[:i], add_generation_prompt=True)`` ends and ends where
``render(messages[:i + 1])`` ends (trailing whitespace after the turn excluded). Both renders must
be prefixes of the full render; a template for which they are not (one that rewrites earlier turns)
gives an ``Err`` instead of a wrong mask (with generation blocks such a template trains
correctly). :func:`tokenize_rendered` maps the character spans to
tokens through the tokenizer's offsets and builds pre-shifted labels; a sample with no trained token
is an ``Err`` (a template without a usable assistant turn would otherwise train on nothing).

No I/O here: templates are strings, tokenizers are objects the caller loaded.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tscale.core.result import Err, Ok
from tscale.data.tokenize import IGNORE_INDEX, Encoder
from tscale.errors import DataError

LossMode = Literal["completion_only", "assistant_only", "last_turn_only"]
LOSS_MODES: tuple[str, ...] = ("completion_only", "assistant_only", "last_turn_only")
"""``completion_only``: the one assistant reply of a prompt/completion or alpaca record (a chat
record qualifies when it has exactly one assistant message and it is last). ``assistant_only``:
every assistant turn, each with its end-of-turn text. ``last_turn_only``: the last assistant
turn."""

Span = tuple[int, int]
"""A half-open character range ``[start, end)`` of the rendered text."""

# --------------------------------------------------------------------------------------------
# Built-in templates. Each reproduces the official chat template of its family for string
# contents (tests compare against hand-written strings and against transformers' renderer).
# --------------------------------------------------------------------------------------------

_PLAIN = "{%- for message in messages -%}{{- message['content'] -}}{%- endfor -%}"

_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
# Stanford Alpaca's PROMPT_DICT, turned into a chat template: a system message replaces the
# preamble; later user turns follow the previous response after a blank line.
_ALPACA = (
    r"""{%- if messages and messages[0]['role'] == 'system' -%}
{%- set preamble = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- if loop_messages and loop_messages[0].get('input') -%}
{%- set preamble = '"""
    + _ALPACA_INPUT
    + r"""' -%}
{%- else -%}
{%- set preamble = '"""
    + _ALPACA_NO_INPUT
    + r"""' -%}
{%- endif -%}
{%- endif -%}
{{- preamble + '\n\n' -}}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{%- if not loop.first -%}{{- '\n\n' -}}{%- endif -%}
{{- '### Instruction:\n' + message.get('instruction', message['content']) + '\n\n' -}}
{%- if message.get('input') -%}{{- '### Input:\n' + message['input'] + '\n\n' -}}{%- endif -%}
{%- elif message['role'] == 'assistant' -%}
{{- '### Response:\n' + message['content'] + eos_token -}}
{%- else -%}
{{- raise_exception('the alpaca template supports system, user and assistant messages only') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"""
)

# teknium/OpenHermes-2.5-Mistral-7B's ChatML template, verbatim.
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct, verbatim.
_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2, verbatim (no system role: a system message is an error).
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# google/gemma-3 instruct, the string-content part (a system message prefixes the first user turn).
_GEMMA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Qwen/Qwen2.5-*-Instruct without tools (its default system prompt included); other roles raise.
_QWEN = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif not (message.role == "system" and loop.first) %}
        {{- raise_exception("tscale's qwen template covers system, user and assistant messages; use the tokenizer's own chat_template for " + message.role + " messages") }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501  (the template's lines are kept as Qwen wrote them)


DEFAULT_TEMPLATE_DATE = "2026-01-01"
"""The date ``strftime_now`` formats unless ``data.template_date`` says otherwise."""


def parse_date(date: str) -> datetime.date:
    """``YYYY-MM-DD`` as a date. Raises DataError naming ``data.template_date``."""
    try:
        return datetime.date.fromisoformat(date)
    except (TypeError, ValueError):
        raise DataError(
            f"data.template_date: {date!r} is not a date; write it as YYYY-MM-DD"
        ) from None


@attrs.frozen
class ChatTemplate:
    """A Jinja2 chat template and the ``bos_token``/``eos_token`` strings it renders.

    The source sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
    ``raise_exception`` and ``strftime_now`` as in ``transformers``; ``strftime_now(fmt)``
    formats the fixed ``date`` (``YYYY-MM-DD``), not today, so rendering stays a pure function of
    the record and the config. ``{% generation %}`` blocks mark the trained spans (see
    :func:`render`).
    """

    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    date: str = DEFAULT_TEMPLATE_DATE

    @classmethod
    def from_jinja(
        cls, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "custom"
    ) -> ChatTemplate:
        """A template from a Jinja2 source (e.g. a tokenizer's ``chat_template``), compiled now.

        Raises:
            DataError: the source is not valid Jinja2.
        """
        _compile(source, name)
        return cls(name=name, source=source, bos_token=bos_token, eos_token=eos_token)

    def with_tokens(
        self,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        date: str | None = None,
    ) -> ChatTemplate:
        """The same template rendering other special-token strings (e.g. tscale's ``<|eos|>``)
        or another ``strftime_now`` date."""
        if date is not None:
            parse_date(date)
        return attrs.evolve(
            self,
            bos_token=self.bos_token if bos_token is None else bos_token,
            eos_token=self.eos_token if eos_token is None else eos_token,
            date=self.date if date is None else date,
        )

    @property
    def has_generation_blocks(self) -> bool:
        """Whether the source has ``{% generation %}`` blocks (they then define the spans)."""
        return _has_generation(self.source)


BUILTIN_TEMPLATES: Mapping[str, ChatTemplate] = {
    "plain": ChatTemplate("plain", _PLAIN),
    "alpaca": ChatTemplate("alpaca", _ALPACA),
    "chatml": ChatTemplate("chatml", _CHATML, eos_token="<|im_end|>"),
    "llama-3": ChatTemplate("llama-3", _LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ChatTemplate("mistral", _MISTRAL, "<s>", "</s>"),
    "gemma": ChatTemplate("gemma", _GEMMA, "<bos>", "<eos>"),
    "qwen": ChatTemplate("qwen", _QWEN, eos_token="<|im_end|>"),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(BUILTIN_TEMPLATES)
"""Names of the built-in templates."""


# Markers around a generation block's output while spans are recorded: Unicode noncharacters,
# which no text is meant to contain (a record that does is an Err, never a wrong mask).
_GEN_START, _GEN_END = "\ufdd0", "\ufdd1"
_GEN_VAR = "tscale_generation_markers"


class _GenerationTag(Extension):
    """Parses HF's ``{% generation %}…{% endgeneration %}``; renders its body unchanged, or
    between markers when the render passes ``tscale_generation_markers`` (span recording)."""

    tags = {"generation"}  # noqa: RUF012  (jinja2's Extension API declares tags as a class set)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        markers = nodes.Name(_GEN_VAR, "load")
        return nodes.CallBlock(self.call_method("_body", [markers]), [], [], body).set_lineno(
            lineno
        )

    def _body(self, markers: Any, caller: Callable[[], str]) -> str:
        if isinstance(markers, tuple):
            return markers[0] + caller() + markers[1]
        return caller()


@functools.lru_cache(maxsize=64)
def _has_generation(source: str) -> bool:
    """Whether ``source`` has a ``{% generation %}`` tag (a quick lexical check)."""
    try:
        tokens = _environment().lex(source)
    except jinja2.exceptions.TemplateSyntaxError:
        return False
    previous = ""
    for _, kind, value in tokens:
        if kind == "name" and value == "generation" and previous == "block_begin":
            return True
        if kind != "whitespace":
            previous = kind
    return False


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As transformers: jinja's own tojson escapes HTML characters, which chat templates must not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # The settings of transformers' chat-template environment: templates come from the Hub and are
    # untrusted code, hence the (immutable) sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str, name: str = "custom") -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template {name!r} is not valid Jinja2: {e} (line {e.lineno})") from e


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """A :class:`ChatTemplate` from a built-in name, a Jinja2 source, or a template itself.

    A string with ``{%`` or ``{{`` in it is a Jinja2 source; any other string must be a built-in
    name.

    Raises:
        DataError: an unknown name or an invalid Jinja2 source.
    """
    if isinstance(template, ChatTemplate):
        return template
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{%" in template or "{{" in template:
        return ChatTemplate.from_jinja(template)
    raise DataError(
        f"unknown chat template {template!r}; use one of {list(TEMPLATE_NAMES)} or a Jinja2 "
        "template string"
    )


def token_string(value: Any) -> str | None:
    """A special token of a ``tokenizer_config.json``: a string, an ``AddedToken`` dict, or
    None."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise DataError(f"cannot read a special token from {value!r}")


def config_chat_template(
    config: Mapping[str, Any], *, where: str = "tokenizer config", key: str | None = None
) -> str | None:
    """The ``chat_template`` source of a parsed ``tokenizer_config.json``: a string, or the entry
    named ``default`` of a ``[{"name", "template"}]`` list; None when there is none.

    Raises:
        DataError: a list without ``default``, or a value that is not a string (the message starts
            with ``key`` when given).
    """
    prefix = f"{key}: " if key else ""
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
        if source is None:
            raise DataError(
                f"{prefix}{where} has chat templates {sorted(map(str, named))} but none named "
                "'default'; choose the one you want (data.template: a .jinja file)"
            )
    if source is not None and not isinstance(source, str):
        raise DataError(f"{prefix}chat_template of {where} is not a string")
    return source or None


def template_from_tokenizer_config(
    config: Mapping[str, Any], *, name: str = "tokenizer"
) -> ChatTemplate:
    """The chat template of a parsed ``tokenizer_config.json`` (a dict; the caller reads the file)
    with its bos/eos strings (see :func:`config_chat_template`).

    Raises:
        DataError: no usable ``chat_template``, or invalid Jinja2.
    """
    source = config_chat_template(config)
    if source is None:
        raise DataError(
            "tokenizer config has no chat_template; choose a built-in template "
            f"({list(TEMPLATE_NAMES)}) or give a Jinja2 template"
        )
    return ChatTemplate.from_jinja(
        source,
        bos_token=token_string(config.get("bos_token")) or "",
        eos_token=token_string(config.get("eos_token")) or "",
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Records → messages
# --------------------------------------------------------------------------------------------

SHAREGPT_ROLES: Mapping[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function_call": "tool_call",
    "observation": "tool",
}
"""ShareGPT ``from`` values and the roles they become."""


def normalize_sharegpt(
    record: Mapping[str, Any],
    *,
    key: str = "conversations",
    roles: Mapping[str, str] = SHAREGPT_ROLES,
    where: str | None = None,
) -> Ok[dict] | Err:
    """A ShareGPT record (``{key: [{"from", "value"}, ...]}``) as ``{"messages": [...]}``.

    Other fields of the record are kept; ``key`` is replaced by ``messages``.
    """
    turns = record.get(key)
    if not isinstance(turns, list):
        return Err(f"sharegpt: {key!r} missing or not a list", record, where)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return Err(f"sharegpt: turn {i} is not an object", record, where)
        who, value = turn.get("from"), turn.get("value")
        if who not in roles:
            return Err(f"sharegpt: turn {i} has unknown 'from' {who!r}", record, where)
        if not isinstance(value, str):
            return Err(f"sharegpt: turn {i} 'value' is not a string", record, where)
        messages.append({"role": roles[who], "content": value})
    out = {k: v for k, v in record.items() if k != key}
    out["messages"] = messages
    return Ok(out)


def _check_str(record: Mapping[str, Any], name: str, where: str | None) -> Err | None:
    if not isinstance(record.get(name), str):
        what = "missing" if record.get(name) is None else "not a string"
        return Err(f"{name} {what}", record, where)
    return None


def to_messages(
    record: Mapping[str, Any], *, system: str | None = None, where: str | None = None
) -> Ok[list[dict]] | Err:
    """The chat messages of a canonical record.

    - ``{"messages": [{"role", "content"}]}``: as given (items with ``from``/``value`` are
      ShareGPT and normalised); ``{"conversations": [...]}`` is ShareGPT.
    - ``{"instruction", "input"?, "output"}``: a user message whose content is the instruction
      (plus a blank line and the input, when there is one) and which keeps ``instruction`` and
      ``input`` for the alpaca template; then the assistant's output.
    - ``{"prompt", "completion"}``: a user and an assistant message.

    ``system`` is prepended as a system message unless the record already starts with one (the
    record's own system prompt wins). A prompt/completion or alpaca record's own ``system``
    field (a non-empty string) is its system message.
    """
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        sharegpt = (
            isinstance(turns, list)
            and turns
            and isinstance(turns[0], Mapping)
            and "from" in turns[0]
            and "role" not in turns[0]
        )
        if sharegpt:
            norm = normalize_sharegpt(record, key=key, where=where)
            if isinstance(norm, Err):
                return norm
            turns = norm.value["messages"]
        if not isinstance(turns, list) or not turns:
            return Err(f"{key} missing, empty or not a list", record, where)
        messages = []
        for i, m in enumerate(turns):
            if not isinstance(m, Mapping):
                return Err(f"message {i} is not an object", record, where)
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str):
                return Err(f"message {i} has no string 'role'", record, where)
            if not isinstance(content, str):
                return Err(f"message {i} content is not a string", record, where)
            messages.append({"role": role, "content": content})
    elif "instruction" in record or "output" in record:
        for name in ("instruction", "output"):
            if (err := _check_str(record, name, where)) is not None:
                return err
        inp = record.get("input") or ""
        if not isinstance(inp, str):
            return Err("input not a string", record, where)
        ins = record["instruction"]
        user = {
            "role": "user",
            "content": f"{ins}\n\n{inp}" if inp else ins,
            "instruction": ins,
            "input": inp,
        }
        messages = [user, {"role": "assistant", "content": record["output"]}]
    elif "prompt" in record or "completion" in record:
        for name in ("prompt", "completion"):
            if (err := _check_str(record, name, where)) is not None:
                return err
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        return Err(
            f"unknown record format (keys {sorted(map(str, record))}); expected prompt/completion, "
            "instruction/input/output, messages or conversations",
            record,
            where,
        )
    chat = "messages" in record or "conversations" in record
    own = None if chat else record.get("system")
    if isinstance(own, str) and own and messages[0]["role"] != "system":
        # a prompt/completion or alpaca record's own system column (e.g. from data.sources)
        messages.insert(0, {"role": "system", "content": own})
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Ok(messages)


# --------------------------------------------------------------------------------------------
# Rendering with trained spans
# --------------------------------------------------------------------------------------------


@attrs.frozen
class RenderedSample:
    """The rendered text of one record and the character spans the loss trains on.

    ``trained_spans`` are sorted, disjoint ``[start, end)`` ranges of ``text``: each covers one
    assistant turn's content and its end-of-turn text (``<|im_end|>``, ``<|eot_id|>``, ``</s>``…),
    not the whitespace a template writes after it.
    """

    text: str
    trained_spans: tuple[Span, ...]
    loss_mode: str
    num_assistant_turns: int


@functools.lru_cache(maxsize=8)
def _strftime_now(date: str) -> Callable[[str], str]:
    day = parse_date(date)
    return lambda fmt: day.strftime(fmt)


def render_messages(
    template: str | ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    **extra: Any,
) -> str:
    """The template's text for ``messages`` (raises jinja2's errors; :func:`render` catches).
    ``extra`` are more template variables (as ``apply_chat_template``'s keyword arguments)."""
    tpl = get_template(template)
    variables = {
        "tools": None,  # as transformers: defined (None), so `tools is not none` reads the same
        "documents": None,
        "bos_token": tpl.bos_token,
        "eos_token": tpl.eos_token,
        "strftime_now": _strftime_now(tpl.date),
        **extra,
    }
    return _compile(tpl.source, tpl.name).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


def _generation_spans(
    tpl: ChatTemplate, messages: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Span]] | str:
    """The text and the output spans of every ``{% generation %}`` block, from one render with
    markers; or the reason they cannot be found."""
    for m in messages:
        if any(c in str(m.get("content", "")) for c in (_GEN_START, _GEN_END)):
            return "a message contains a Unicode noncharacter U+FDD0/U+FDD1"
    marked = render_messages(tpl, messages, **{_GEN_VAR: (_GEN_START, _GEN_END)})
    text: list[str] = []
    spans: list[Span] = []
    pos, start = 0, None
    for piece in re.split(f"([{_GEN_START}{_GEN_END}])", marked):
        if piece == _GEN_START:
            if start is not None:
                return "nested {% generation %} blocks"
            start = pos
        elif piece == _GEN_END:
            if start is None:  # unreachable: the extension writes the markers in pairs
                return "unbalanced {% generation %} markers"
            spans.append((start, pos))
            start = None
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), spans


def _not_prefix(tpl: ChatTemplate, i: int, what: str) -> str:
    return (
        f"template {tpl.name!r} is not prefix-stable at message {i}: rendering messages[:{i}]"
        f"{what} is not a prefix of the whole conversation (the template rewrites earlier turns), "
        "so the trained span cannot be found; drop the system prompt, use another template, or "
        "use loss_mode last_turn_only when only earlier turns are rewritten"
    )


def render(
    record: Mapping[str, Any],
    template: str | ChatTemplate,
    *,
    system: str | None = None,
    loss_mode: str = "assistant_only",
    where: str | None = None,
) -> Ok[RenderedSample] | Err:
    """Render a record and find the character spans of its trained text (see the module doc).

    Args:
        record: a canonical record (see :func:`to_messages`).
        template: a built-in name, a Jinja2 source or a :class:`ChatTemplate`.
        system: a default system prompt, used when the record has none.
        loss_mode: one of :data:`LOSS_MODES`.
        where: the record's place (``"file.jsonl:row 3"``) for the ``Err``.

    Returns:
        ``Ok(RenderedSample)``, or ``Err`` for a malformed record, a template error (e.g. roles
        that do not alternate) or a template that is not prefix-stable for this conversation.

    Raises:
        DataError: an unknown template or loss mode (a configuration mistake, not a record's).
    """
    tpl = get_template(template)
    if loss_mode not in LOSS_MODES:
        raise DataError(f"unknown loss_mode {loss_mode!r}; use one of {list(LOSS_MODES)}")
    got = to_messages(record, system=system, where=where)
    if isinstance(got, Err):
        return got
    messages = got.value
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_mode == "completion_only" and (len(turns) != 1 or turns[0] != len(messages) - 1):
        return Err(
            f"completion_only needs exactly one assistant message, the last; this record has "
            f"{len(turns)} among {len(messages)} messages (use assistant_only or last_turn_only)",
            record,
            where,
        )
    targets = turns if loss_mode == "assistant_only" else turns[-1:]
    try:
        if tpl.has_generation_blocks:
            got_spans = _generation_spans(tpl, messages)
            if isinstance(got_spans, str):
                return Err(f"template {tpl.name!r}: {got_spans}", record, where)
            text, blocks = got_spans
            spans = blocks if loss_mode == "assistant_only" else blocks[-1:]
            return Ok(RenderedSample(text, tuple(spans), loss_mode, len(turns)))
        text = render_messages(tpl, messages)
        spans = []
        for i in targets:
            before = render_messages(tpl, messages[:i], add_generation_prompt=True)
            # The last turn's prefix is the whole conversation: no need to render it twice.
            upto = text if i + 1 == len(messages) else render_messages(tpl, messages[: i + 1])
            if not text.startswith(before):
                return Err(_not_prefix(tpl, i, " with add_generation_prompt"), record, where)
            if not text.startswith(upto):
                return Err(_not_prefix(tpl, i + 1, ""), record, where)
            start = len(before)
            end = max(start, len(upto.rstrip()))
            if spans and start < spans[-1][1]:
                return Err(_not_prefix(tpl, i, " with add_generation_prompt"), record, where)
            spans.append((start, end))
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names, security
        return Err(f"template {tpl.name!r} failed: {e}", record, where)
    except (TypeError, ValueError, KeyError, IndexError) as e:  # e.g. None + str in a template
        return Err(f"template {tpl.name!r} failed: {type(e).__name__}: {e}", record, where)
    return Ok(RenderedSample(text, tuple(spans), loss_mode, len(turns)))


# --------------------------------------------------------------------------------------------
# Tokenization: character spans → token labels
# --------------------------------------------------------------------------------------------


def _resolve(
    tokenizer: Tokenizer | Encoder, bos_id: int | None, eos_id: int | None
) -> tuple[Tokenizer, int | None, int | None]:
    if isinstance(tokenizer, Encoder):
        bos = tokenizer.bos_id if bos_id is None else bos_id
        eos = tokenizer.eos_id if eos_id is None else eos_id
        return tokenizer.tokenizer, bos, eos
    return tokenizer, bos_id, eos_id


def _trained_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Span], n_chars: int
) -> np.ndarray:
    """Whether each token overlaps a trained span, as a bool array. A token straddling a span's
    border is trained: the model must emit it to produce the trained text. A zero-width token
    counts as covering the character at its place. O(tokens · spans), vectorised."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = off[:, 0], off[:, 1]
    end = np.where(end <= start, np.minimum(start + 1, n_chars), end)
    out = np.zeros(len(off), dtype=bool)
    for a, b in spans:
        if b > a:  # an empty span trains no character
            out |= (start < b) & (end > a) & (end > start)
    return out


def _special_ids(add_bos: bool, add_eos: bool, bos_id: int | None, eos_id: int | None) -> None:
    if add_bos and bos_id is None:
        raise DataError("add_bos needs bos_id (or pass an Encoder, which knows it)")
    if add_eos and eos_id is None:
        raise DataError("add_eos needs eos_id (or pass an Encoder, which knows it)")


def tokenize_rendered(
    sample: RenderedSample,
    tokenizer: Tokenizer | Encoder,
    *,
    add_bos: bool,
    add_eos: bool,
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_length: int | None = None,
    where: str | None = None,
) -> Ok[dict] | Err:
    """``Ok({"input_ids", "labels"})`` for a rendered sample, labels pre-shifted.

    The text is encoded without the tokenizer's own special tokens. A token is trained when any
    of its characters lies in a trained span. ``labels[t]`` is ``input_ids[t + 1]`` when that token
    is trained, else -100; the last label is always -100.

    ``add_bos`` prepends ``bos_id`` unless the text already starts with it (templates such as
    llama-3 write their BOS; it is never doubled). ``add_eos`` appends ``eos_id`` unless the text
    already has it (a template that writes the tokenizer's EOS, e.g. ChatML's ``<|im_end|>``,
    owns it, as in ``transformers``' ``apply_chat_template``); the appended EOS is a trained
    target exactly when nothing but whitespace follows the last trained span (the sample ends
    with a trained turn). The builders pass ``add_bos=encoder.adds_bos, add_eos=True``: the one
    BOS/EOS rule of docs/data.md.

    Returns:
        ``Err("no trained tokens: ...")`` when every label is -100, ``Err("too long: ...")`` when
        ``max_length`` is given and exceeded; the caller decides to raise or quarantine.

    Raises:
        DataError: ``add_bos``/``add_eos`` without the id (and no Encoder to take it from).
    """
    tok, bos, eos = _resolve(tokenizer, bos_id, eos_id)
    _special_ids(add_bos, add_eos, bos, eos)
    enc = tok.encode(sample.text, add_special_tokens=False)
    return tokenize_encoded(
        sample,
        enc.ids,
        enc.offsets,
        add_bos=add_bos,
        add_eos=add_eos,
        bos_id=bos,
        eos_id=eos,
        max_length=max_length,
        where=where,
    )


def sample_length(
    ids: Sequence[int], *, add_bos: bool, add_eos: bool, bos_id: int | None, eos_id: int | None
) -> int:
    """The number of ``input_ids`` a sample encoded as ``ids`` gets (BOS/EOS added if missing)."""
    n = len(ids)
    if add_bos and not (n and ids[0] == bos_id):
        n += 1
    if add_eos and eos_id not in ids:
        n += 1
    return n


def tokenize_encoded(
    sample: RenderedSample,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    *,
    add_bos: bool,
    add_eos: bool,
    bos_id: int | None,
    eos_id: int | None,
    max_length: int | None = None,
    where: str | None = None,
) -> Ok[dict] | Err:
    """:func:`tokenize_rendered` for a sample already encoded (``ids`` and character
    ``offsets`` of ``sample.text``, encoded without special tokens), e.g. by ``encode_batch``."""
    _special_ids(add_bos, add_eos, bos_id, eos_id)
    trained = _trained_tokens(offsets, sample.trained_spans, len(sample.text))
    ids = list(ids)
    if add_bos and not (ids and ids[0] == bos_id):
        ids.insert(0, bos_id)  # type: ignore[arg-type]  # checked by _special_ids
        trained = np.concatenate([[False], trained])
    if add_eos and eos_id not in ids:
        ends = [e for s, e in sample.trained_spans if e > s]
        ids.append(eos_id)  # type: ignore[arg-type]
        eos_trained = bool(ends) and not sample.text[ends[-1] :].strip()
        trained = np.concatenate([trained, [eos_trained]])
    # labels[t] = ids[t + 1] where that token is trained; the last label is always -100.
    shifted = np.asarray(ids[1:], dtype=np.int64)
    labels = np.where(trained[1:], shifted, IGNORE_INDEX).tolist()
    labels.append(IGNORE_INDEX)
    if not trained[1:].any():
        if sample.num_assistant_turns == 0:
            why = "the conversation has no assistant message"
        elif not any(e > s for s, e in sample.trained_spans):
            why = f"the trained assistant turn(s) render as empty text ({sample.loss_mode})"
        else:
            why = f"no token of the trained span(s) follows another token ({sample.loss_mode})"
        return Err(f"no trained tokens: {why}", sample.text, where)
    if max_length is not None and len(ids) > max_length:
        return Err(f"too long: {len(ids)} tokens > max_length {max_length}", sample.text, where)
    return Ok({"input_ids": ids, "labels": labels})


def make_sample_counter(
    template: str | ChatTemplate,
    tokenizer: Tokenizer | Encoder,
    *,
    add_bos: bool,
    add_eos: bool,
    system: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> Callable[[Mapping[str, Any]], int]:
    """``count(record)``: the number of ``input_ids`` :func:`tokenize_rendered` would give it.

    That is template text + contents + the BOS/EOS it adds: what ``max_total_length`` counts when
    this is passed to :func:`tscale.data.length.fit_record` as ``count_total``. The counter raises
    ``DataError`` for a record that cannot be rendered (``fit_record`` turns it into an ``Err``).
    """
    tpl = get_template(template)
    tok, bos, eos = _resolve(tokenizer, bos_id, eos_id)
    _special_ids(add_bos, add_eos, bos, eos)

    def count(record: Mapping[str, Any]) -> int:
        got = to_messages(record, system=system)
        if isinstance(got, Err):
            raise DataError(got.reason)
        try:
            text = render_messages(tpl, got.value)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError) as e:
            raise DataError(f"template {tpl.name!r} failed: {e}") from e
        ids = tok.encode(text, add_special_tokens=False).ids
        return sample_length(ids, add_bos=add_bos, add_eos=add_eos, bos_id=bos, eos_id=eos)

    return count
