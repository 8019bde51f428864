"""Tiny pretrained-style Hugging Face folders and chat data, made on the spot for tests.

A user's model folder holds ``config.json``, safetensors weights and an HF tokenizer
(``tokenizer.json`` with added special tokens, ``tokenizer_config.json``, a chat template). No hub
is reachable here, so :func:`make_model_folder` builds such a folder with ``transformers`` itself
(random weights, a byte-level BPE trained with ``tokenizers`` on the given texts) in one of two
styles that cover what real folders do differently:

- ``"qwen2"``: a Qwen2 model with a ChatML tokenizer (``<|im_start|>``, ``<|im_end|>``,
  ``<|endoftext|>`` added), no BOS, eos ``<|im_end|>``, **no pad token**, Qwen2.5's chat
  template, and an embedding larger than the tokenizer (as Qwen2's 151,936 rows).
- ``"llama3"``: a Llama model whose tokenizer **adds BOS** itself (a post-processor), header tokens
  ``<|start_header_id|>``/``<|end_header_id|>``, eos ``<|eot_id|>``, no pad, and a Llama-3.1-style
  template that writes its own BOS and a date through ``strftime_now``.

``QWEN3_TEMPLATE`` is a Qwen3-style template for the ``qwen2`` folder's tokens: it drops the
``<think>`` block of every assistant turn but the last (so it rewrites earlier turns) and marks
the trained text with ``{% generation %}`` blocks.

``transformers`` is imported lazily (a test-only dependency of tscale).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

Style = Literal["qwen2", "llama3"]
STYLES: tuple[str, ...] = ("qwen2", "llama3")

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen3's way with reasoning, in small: an assistant turn's ``<think>…</think>`` block is kept in
# the last message only and stripped from earlier turns (the template rewrites earlier turns, so
# prefix rendering cannot find their spans); ``{% generation %}`` blocks mark what is trained.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if loop.last %}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPECIALS: dict[str, dict[str, Any]] = {
    "qwen2": {
        "added": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "template": QWEN2_TEMPLATE,
    },
    "llama3": {
        "added": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "template": LLAMA3_TEMPLATE,
    },
}

_WORD_TEXT = (
    "the cat dog bird tree river stone cloud light night sun moon rain wind road house garden "
    "red blue green small large quick slow old new bright dark warm cold happy quiet loud "
    "runs sees finds makes takes gives holds keeps reads writes sings walks jumps sleeps "
    "and but or so then because while after before with without over under near far"
)
_WORDS = tuple(_WORD_TEXT.split())


def chat_records(
    n: int, *, seed: int = 0, max_turns: int = 3, system_every: int = 3
) -> list[dict[str, Any]]:
    """``n`` multi-turn chat records ``{"messages": [...]}`` of varied length.

    Every record alternates user/assistant turns (1 to ``max_turns`` exchanges) and every
    ``system_every``-th one starts with a system message. Replies follow simple rules of the
    question (reverse the words, count them, repeat the first), so a model can learn something.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages: list[dict[str, str]] = []
        if system_every and i % system_every == 0:
            messages.append({"role": "system", "content": "Answer in few words."})
        for _ in range(rng.randint(1, max_turns)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 12))]
            kind = rng.choice(("reverse", "count", "first"))
            question = f"{kind}: {' '.join(words)}"
            if kind == "reverse":
                answer = " ".join(reversed(words))
            elif kind == "count":
                answer = str(len(words))
            else:
                answer = words[0]
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        out.append({"messages": messages})
    return out


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``records`` as JSON lines to ``path`` (parents created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return out


def _texts(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m["content"] for r in records for m in r.get("messages", [])] + list(_WORDS)


def make_tokenizer(style: Style, texts: Iterable[str], *, vocab_size: int = 400) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``style`` trained on ``texts``, with the
    style's special tokens added (and, for ``llama3``, a post-processor that adds BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = _SPECIALS[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec["added"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if style == "llama3":
        bos = spec["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    return tok


def make_model_folder(
    path: str | Path,
    style: Style,
    *,
    texts: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 400,
    extra_vocab: int = 24,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny pretrained-style HF model folder of ``style`` (see the module doc) to ``path``.

    The model has random weights from ``seed``; its embedding has ``extra_vocab`` rows more than
    the tokenizer has tokens. ``texts`` train the tokenizer (default: :func:`chat_records`' words)
    to ``vocab_size`` tokens.

    Returns:
        The folder, which ``AutoModelForCausalLM``/``AutoTokenizer`` and ``tscale`` load.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if style not in _SPECIALS:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    spec = _SPECIALS[style]
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    corpus = list(texts) if texts is not None else _texts(chat_records(200, seed=seed))
    tok = make_tokenizer(style, corpus, vocab_size=vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        chat_template=spec["template"],
        model_max_length=max_position_embeddings,
    )
    if style == "qwen2":  # Qwen2 tokenizers have no BOS at all; keep the header token text
        hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf_tok.save_pretrained(root)

    vocab = tok.get_vocab_size(with_added_tokens=True) + extra_vocab
    eos_id = tok.token_to_id(spec["eos_token"])
    bos_id = tok.token_to_id(spec["bos_token"]) if spec["bos_token"] else None
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    if style == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id)
    model.save_pretrained(root)
    return root


__all__ = [
    "LLAMA3_TEMPLATE",
    "QWEN2_TEMPLATE",
    "QWEN3_TEMPLATE",
    "STYLES",
    "chat_records",
    "make_model_folder",
    "make_tokenizer",
    "write_jsonl",
]
