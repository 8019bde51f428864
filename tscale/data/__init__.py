"""Data: synthetic tasks, loading and validating records, prompt templates, length budgets,
tokenizing, packing and batching.

The path the trainer uses today: ``synthetic.make_splits`` (or JSON-lines files) →
``load_records`` → ``Encoder.encode_batch`` → ``BatchLoader`` (training) / ``batch_iter`` (eval).
The prompt engine (``render``, ``tokenize_rendered``), length manager (``fit_record``) and packer
(``pack_examples``, ``StreamingPacker``, ``collate_packed``) are library pieces, tested, and not
yet selectable from YAML (see docs/data.md).
"""

from tscale.data.length import LengthReport, allocate_budget, fit_record, fit_records, truncate_text
from tscale.data.load import LoadReport, load_records, validate_record, write_quarantine
from tscale.data.loader import BatchLoader, batch_iter
from tscale.data.pack import (
    PackReport,
    StreamingPacker,
    collate_packed,
    cu_seqlens_from_doc_ids,
    pack_examples,
)
from tscale.data.prompt import (
    LOSS_MODES,
    TEMPLATE_NAMES,
    ChatTemplate,
    RenderedSample,
    get_template,
    make_sample_counter,
    normalize_sharegpt,
    render,
    render_messages,
    template_from_tokenizer_config,
    to_messages,
    tokenize_rendered,
)
from tscale.data.synthetic import TASKS, generate, make_splits, write_jsonl
from tscale.data.tokenize import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    Encoder,
    load_or_train_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSS_MODES",
    "SPECIAL_TOKENS",
    "TASKS",
    "TEMPLATE_NAMES",
    "BatchLoader",
    "ChatTemplate",
    "Encoder",
    "LengthReport",
    "LoadReport",
    "PackReport",
    "RenderedSample",
    "StreamingPacker",
    "allocate_budget",
    "batch_iter",
    "collate_packed",
    "cu_seqlens_from_doc_ids",
    "fit_record",
    "fit_records",
    "generate",
    "get_template",
    "load_or_train_tokenizer",
    "load_records",
    "load_tokenizer",
    "make_sample_counter",
    "make_splits",
    "normalize_sharegpt",
    "pack_examples",
    "render",
    "render_messages",
    "template_from_tokenizer_config",
    "to_messages",
    "tokenize_rendered",
    "train_tokenizer",
    "truncate_text",
    "validate_record",
    "write_jsonl",
    "write_quarantine",
]
