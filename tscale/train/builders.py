"""Builders: the one place where the YAML config turns into library objects (house rule 2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import torch

from tscale.config.schema import Config
from tscale.core.result import Err, Ok
from tscale.data import load as data_load
from tscale.data import synthetic
from tscale.data.loader import BatchLoader
from tscale.data.tokenize import Encoder, load_or_train_tokenizer
from tscale.errors import ConfigError, DataError
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import alias, schedules
from tscale.optim.base import GradientTransformation

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express; raises ConfigError naming the keys."""
    if cfg.data.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be a multiple of train.microbatches "
            f"({cfg.train.microbatches})"
        )
    for key, value in (
        ("train.max_steps", cfg.train.max_steps),
        ("data.batch_size", cfg.data.batch_size),
        ("train.microbatches", cfg.train.microbatches),
        ("train.log_every", cfg.train.log_every),
        ("data.max_length", cfg.data.max_length),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.model.hidden_size % cfg.model.num_heads and cfg.model.head_dim is None:
        raise ConfigError(
            f"model.hidden_size ({cfg.model.hidden_size}) must be divisible by model.num_heads "
            f"({cfg.model.num_heads}), or set model.head_dim"
        )
    if cfg.scheduler.warmup_steps > cfg.train.max_steps:
        raise ConfigError(
            f"scheduler.warmup_steps ({cfg.scheduler.warmup_steps}) exceeds train.max_steps "
            f"({cfg.train.max_steps})"
        )
    if cfg.data.max_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds model.max_position_embeddings "
            f"({cfg.model.max_position_embeddings})"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not a torch device (cpu, cuda, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no CUDA device is available; use cpu")
    return dev


@attrs.frozen(kw_only=True)
class DataBundle:
    """Everything data the trainer needs."""

    encoder: Encoder
    tokenizer_file: Path
    loader: BatchLoader
    train_examples: list[dict]
    eval_examples: list[dict]
    eval_records: list[dict]
    report: dict[str, Any]


def _encode_all(
    encoder: Encoder, records: list[dict], max_length: int, name: str, quarantine: Path
) -> tuple[list[dict], Counter]:
    where = [f"{name} record {i}" for i in range(len(records))]
    results = encoder.encode_batch(records, max_length=max_length, where=where)
    ok, errors = [], Counter()
    bad = []
    for res in results:
        if isinstance(res, Ok):
            ok.append(res.value)
        else:
            assert isinstance(res, Err)
            errors[res.reason.split(":")[0]] += 1
            bad.append(res)
    if bad:
        data_load.write_quarantine(bad, quarantine)
    return ok, errors


def build_data(cfg: Config, run_dir: Path) -> DataBundle:
    """Generate or load the data, train or load the tokenizer, tokenize, and make the loader."""
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    quarantine = data_dir / "quarantine.jsonl"
    d = cfg.data
    if d.train_files:
        train_files = [Path(p) for p in d.train_files]
        eval_files = [Path(p) for p in d.eval_files]
    else:
        s = d.synthetic
        train, held_out = synthetic.make_splits(
            list(s.tasks),
            s.num_train,
            s.num_eval,
            seed=cfg.run.seed,
            min_items=s.min_items,
            max_items=s.max_items,
        )
        train_files, eval_files = [data_dir / "train.jsonl"], [data_dir / "eval.jsonl"]
        synthetic.write_jsonl(train, train_files[0])
        synthetic.write_jsonl(held_out, eval_files[0])
    hf_cache = data_dir / "hf-cache"
    train_records, train_report = data_load.load_records(
        train_files, quarantine=quarantine, cache_dir=hf_cache
    )
    eval_records: list[dict] = []
    if eval_files:
        eval_records, _ = data_load.load_records(
            eval_files, quarantine=quarantine, cache_dir=hf_cache
        )
    tokenizer = load_or_train_tokenizer(
        d.tokenizer.path, train_files, d.tokenizer.vocab_size, cache_dir=data_dir
    )
    tokenizer_file = data_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    encoder = Encoder.from_tokenizer(tokenizer)
    train_examples, train_errors = _encode_all(
        encoder, train_records, d.max_length, "train", quarantine
    )
    eval_examples, eval_errors = _encode_all(
        encoder, eval_records, d.max_length, "eval", quarantine
    )
    if not train_examples:
        raise DataError(f"no usable training example; see {quarantine} for the reasons")
    loader = BatchLoader(
        train_examples, d.batch_size, seed=cfg.run.seed, shuffle=d.shuffle, pad_id=encoder.pad_id
    )
    report = {
        "train_records": len(train_records),
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "load_errors": dict(train_report.errors),
        "train_encode_errors": dict(train_errors),
        "eval_encode_errors": dict(eval_errors),
        "quarantine": str(quarantine) if quarantine.exists() else None,
    }
    return DataBundle(
        encoder=encoder,
        tokenizer_file=tokenizer_file,
        loader=loader,
        train_examples=train_examples,
        eval_examples=eval_examples,
        eval_records=eval_records,
        report=report,
    )


def build_model(cfg: Config, vocab_size: int) -> Transformer:
    """The model of ``cfg.model``; ``vocab_size`` comes from the tokenizer unless set."""
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's ({vocab_size})"
        )
    return Transformer(
        TransformerConfig(
            vocab_size=m.vocab_size or vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.max_position_embeddings,
            rope_theta=m.rope_theta,
            rms_norm_eps=m.rms_norm_eps,
            tie_word_embeddings=m.tie_word_embeddings,
            init_std=m.init_std,
            dtype=_DTYPES[m.dtype],
        )
    )


def build_schedule(cfg: Config) -> schedules.Schedule:
    """The learning-rate schedule of ``cfg.scheduler`` over ``train.max_steps``."""
    s = cfg.scheduler
    return schedules.build_schedule(
        s.type,
        peak=cfg.optimizer.lr,
        warmup_steps=s.warmup_steps,
        total_steps=cfg.train.max_steps,
        min_lr_ratio=s.min_lr_ratio,
    )


def build_optimizer(cfg: Config, schedule: schedules.Schedule) -> GradientTransformation:
    """The optimizer of ``cfg.optimizer`` driven by ``schedule``."""
    o = cfg.optimizer
    return alias.build_optimizer(
        o.type,
        learning_rate=schedule,
        b1=o.betas[0],
        b2=o.betas[1],
        eps=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
    )
