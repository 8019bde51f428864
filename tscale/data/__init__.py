"""Data: built-in synthetic tasks, loading and validating records, tokenizing, batching.

The simple path: ``synthetic.make_splits`` (or JSON-lines files) → ``load_records`` →
``Encoder.encode_batch`` → ``BatchLoader`` (training) / ``batch_iter`` (eval).
"""

from tscale.data.load import LoadReport, load_records, validate_record, write_quarantine
from tscale.data.loader import BatchLoader, batch_iter
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
    "SPECIAL_TOKENS",
    "TASKS",
    "BatchLoader",
    "Encoder",
    "LoadReport",
    "batch_iter",
    "generate",
    "load_or_train_tokenizer",
    "load_records",
    "load_tokenizer",
    "make_splits",
    "train_tokenizer",
    "validate_record",
    "write_jsonl",
    "write_quarantine",
]
