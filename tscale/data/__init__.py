"""Data: synthetic tasks, loading and validating records, prompt templates, length budgets,
tokenizing, packing and batching.

The path the trainer uses (``tscale.train.data_build.build_data``): JSON-lines files
(``load_records``) or ``data.sources`` read through ``load_source``, their format detected
(``inspect_source``/``detect_format``, ``data.column_map``) and rows canonicalized, mixed by
weight (``mix_sources``) → ``prepare_examples`` (length budget ``fit_record`` via
``LengthBudget``, template ``render``, ``tokenize_encoded``, every text encoded once in a batch)
→ ``pack_examples`` → ``BatchLoader``; or, with ``data.streaming``, the same stages on the fly
in a ``StreamingBatchLoader`` (``StreamingPacker``, cursor with the stream position). Preference
rows (prompt/chosen/rejected; KTO's prompt/completion/label) go through
``encode_preferences`` instead (``preference_examples``, the preference tasks' stage).
"""

from tscale.data.groups import GROUP_FIELDS, group_document, single_document_row
from tscale.data.hf_tokenizer import add_tokens, load_encoder, save_tokenizer_folder
from tscale.data.introspect import (
    FORMATS,
    SYNONYMS,
    SourceInfo,
    canonicalize,
    detect_format,
    inspect_source,
    iter_canonical,
    length_histogram,
    make_eval_split,
)
from tscale.data.length import (
    TEXT_COLUMNS,
    LengthBudget,
    LengthReport,
    allocate_budget,
    fit_record,
    fit_records,
    text_columns,
    truncate_text,
)
from tscale.data.load import LoadReport, load_records, validate_record, write_quarantine
from tscale.data.loader import BatchLoader, batch_iter, with_logits_index
from tscale.data.pack import (
    PackReport,
    StreamingPacker,
    collate_packed,
    cu_seqlens_from_doc_ids,
    pack_examples,
)
from tscale.data.preference import (
    PreferenceLimits,
    encode_preferences,
    preference_examples,
    preference_kind,
    split_implicit_prompt,
)
from tscale.data.prepare import prepare_examples
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
    tokenize_encoded,
    tokenize_rendered,
)
from tscale.data.sources import cached_map, fingerprint, load_source, mix_sources, resolve_source
from tscale.data.stream import StreamingBatchLoader
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
    "FORMATS",
    "GROUP_FIELDS",
    "IGNORE_INDEX",
    "LOSS_MODES",
    "SPECIAL_TOKENS",
    "SYNONYMS",
    "TASKS",
    "TEMPLATE_NAMES",
    "TEXT_COLUMNS",
    "BatchLoader",
    "ChatTemplate",
    "Encoder",
    "LengthBudget",
    "LengthReport",
    "LoadReport",
    "PackReport",
    "PreferenceLimits",
    "RenderedSample",
    "SourceInfo",
    "StreamingBatchLoader",
    "StreamingPacker",
    "add_tokens",
    "allocate_budget",
    "batch_iter",
    "cached_map",
    "canonicalize",
    "collate_packed",
    "cu_seqlens_from_doc_ids",
    "detect_format",
    "encode_preferences",
    "fingerprint",
    "fit_record",
    "fit_records",
    "generate",
    "get_template",
    "group_document",
    "inspect_source",
    "iter_canonical",
    "length_histogram",
    "load_encoder",
    "load_or_train_tokenizer",
    "load_records",
    "load_source",
    "load_tokenizer",
    "make_eval_split",
    "make_sample_counter",
    "make_splits",
    "mix_sources",
    "normalize_sharegpt",
    "pack_examples",
    "preference_examples",
    "preference_kind",
    "prepare_examples",
    "render",
    "render_messages",
    "resolve_source",
    "save_tokenizer_folder",
    "single_document_row",
    "split_implicit_prompt",
    "template_from_tokenizer_config",
    "text_columns",
    "to_messages",
    "tokenize_encoded",
    "tokenize_rendered",
    "train_tokenizer",
    "truncate_text",
    "validate_record",
    "with_logits_index",
    "write_jsonl",
    "write_quarantine",
]
