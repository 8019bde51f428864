"""The data section built into what the trainer needs: tokenizer, template, examples, loader.

One pipeline, in memory or streaming::

    read (tscale.data.load: one reader, bad rows are Err with file:line)
      → records (validated or canonicalized, each row in its own shape)
      → example stage (records → Ok(example) | Err | Dropped; SFT's by default)
      → sort (Err → quarantine.jsonl, Dropped → dropped.jsonl, counted)
      → pack (pack_examples, or StreamingPacker on the fly) → loader

:func:`build_data` runs it on the whole data (or reads the result back from the processed-data
cache); with ``data.streaming`` the same stages run chunk by chunk inside a
:class:`~tscale.data.stream.StreamingBatchLoader`. The eval set is made the same way in both.
The example stage is a parameter (``make_examples``): a task passes its own (preference pairs
…); :func:`sft_examples` is the default.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from tscale.config.schema import Config, resolve_defaults
from tscale.core.result import Err, Ok
from tscale.data import load as data_load
from tscale.data import synthetic
from tscale.data.hf_tokenizer import save_tokenizer_folder
from tscale.data.length import Dropped, LengthBudget, LengthReport
from tscale.data.loader import BatchLoader
from tscale.data.pack import pack_examples
from tscale.data.prompt import ChatTemplate
from tscale.data.sources import fingerprint
from tscale.data.stream import StreamingBatchLoader
from tscale.data.tokenize import Encoder
from tscale.data.tokenize import _fingerprint as files_fingerprint
from tscale.errors import ConfigError, DataError
from tscale.tasks.sft import sft_examples
from tscale.train import data_report, data_sources
from tscale.train.data_template import (
    PLAIN_SOURCE,
    SelectedTemplate,
    build_encoder,
    prompt_encoder,
    select_template,
    tokenizer_summary,
)

_TOKENIZER_STREAM_ROWS = 50000  # streamed rows a tokenizer is trained on (no tokenizer.path)


@attrs.frozen(kw_only=True)
class DataBundle:
    """Everything data the trainer needs."""

    encoder: Encoder
    tokenizer_files: dict[str, Path]
    """The run's tokenizer as a complete HF folder (``<run>/data/tokenizer/``): target file name
    → path, copied into every checkpoint."""
    loader: BatchLoader | StreamingBatchLoader
    train_examples: list[dict]
    eval_examples: list[dict]
    eval_records: list[dict]
    report: dict[str, Any]
    encode_prompt: Callable[[dict], list[int]]
    example_lengths: list[int] = attrs.field(factory=list)
    """Tokens of each training example before packing (for ``tscale data inspect``)."""
    template: ChatTemplate | None = None
    """The chat template the data was rendered with (special tokens and date bound)."""

    @property
    def tokenizer_file(self) -> Path:
        """The folder's ``tokenizer.json``."""
        return self.tokenizer_files["tokenizer.json"]


# --------------------------------------------------------------------------------------------
# The example stage and the sorting of its results
# --------------------------------------------------------------------------------------------


class ExampleStage(Protocol):
    """``records, places → ([Ok(example) | Err | Dropped, one per record], length report)``.

    ``budget`` is the length budget to fit records to (None: none) and ``max_length`` the cap
    of an unpacked example (None when the packer holds the limit)."""

    def __call__(
        self,
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: LengthBudget | None,
        max_length: int | None,
    ) -> tuple[list[Ok[dict] | Err], LengthReport]: ...


MakeExamples = Callable[[Config, Encoder, SelectedTemplate], ExampleStage]
"""Builds a run's example stage from its config, tokenizer and template."""


def run_stage(
    stage: ExampleStage,
    records: Sequence[dict],
    places: Sequence[str],
    *,
    budget: LengthBudget | None,
    max_length: int | None,
) -> tuple[list[Ok[dict] | Err], LengthReport]:
    """The stage's results, each ``Err``/``Dropped`` carrying the original record."""
    results, report = stage(records, places, budget=budget, max_length=max_length)
    out = [
        attrs.evolve(r, record=rec) if isinstance(r, Err) else r
        for r, rec in zip(results, records, strict=True)
    ]
    return out, report


@attrs.frozen
class Sink:
    """Where the rows that do not become examples go: ``Err`` to the quarantine file,
    :class:`Dropped` to the dropped-rows file beside it (``write``: False on ranks > 0)."""

    quarantine: Path
    write: bool = True

    @property
    def dropped_file(self) -> Path:
        return self.quarantine.with_name(data_sources.DROPPED_FILE)

    def sort(self, results: Sequence[Ok[dict] | Err]) -> tuple[list[dict], Counter, Counter]:
        """``(examples, quarantined by reason, dropped by reason)``; writes the bad rows."""
        ok: list[dict] = []
        errors: Counter = Counter()
        dropped: Counter = Counter()
        bad: list[Err] = []
        left_out: list[Err] = []
        for res in results:
            if isinstance(res, Ok):
                ok.append(res.value)
            elif isinstance(res, Dropped):
                dropped[data_report.reason_key(res.reason)] += 1
                left_out.append(res)
            else:
                errors[data_report.reason_key(res.reason)] += 1
                bad.append(res)
        if self.write:
            data_load.write_quarantine(bad, self.quarantine)
            data_load.write_quarantine(left_out, self.dropped_file)
        return ok, errors, dropped


def examples_of(
    stage: ExampleStage,
    sink: Sink,
    records: Sequence[dict],
    places: Sequence[str],
    *,
    budget: LengthBudget | None,
    max_length: int | None,
) -> tuple[list[dict], Counter, Counter, LengthReport]:
    """Records through the stage and the sink: ``(examples, quarantined, dropped, lengths)``."""
    results, length_report = run_stage(stage, records, places, budget=budget, max_length=max_length)
    ok, errors, dropped = sink.sort(results)
    return ok, errors, dropped, length_report


# --------------------------------------------------------------------------------------------
# The run's data: set-up shared by the in-memory and the streaming pipeline
# --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Plan:
    """What both pipelines start from: the files or sources, the budgets, the quarantine."""

    cfg: Config
    data_dir: Path
    sink: Sink
    budget: LengthBudget | None
    eval_budget: LengthBudget | None
    error_budget: data_sources.ErrorBudget
    train_files: list[Path]
    eval_files: list[Path]
    sources: list[data_sources.Source]
    eval_source: data_sources.Source | None
    input_files: list[Path]
    hf_cache: Path

    @property
    def quarantine(self) -> Path:
        return self.sink.quarantine


def write_synthetic(cfg: Config, data_dir: Path) -> tuple[Path, Path]:
    """Generate ``data.synthetic``'s train and held-out records (of its ``kind``) into
    ``data_dir/train.jsonl`` and ``data_dir/eval.jsonl``; returns the two paths."""
    s = cfg.data.synthetic
    train, held_out = synthetic.make_splits(
        list(s.tasks),
        s.num_train,
        s.num_eval,
        seed=cfg.run.seed,
        min_items=s.min_items,
        max_items=s.max_items,
    )
    return (
        synthetic.write_jsonl(
            synthetic.as_kind(train, s.kind, seed=cfg.run.seed), data_dir / "train.jsonl"
        ),
        synthetic.write_jsonl(
            synthetic.as_kind(held_out, s.kind, seed=cfg.run.seed), data_dir / "eval.jsonl"
        ),
    )


def _plan(cfg: Config, run_dir: Path, rank: int) -> _Plan:
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    quarantine = data_dir / "quarantine.jsonl"
    d = cfg.data
    if d.sources and d.train_files:
        raise ConfigError(
            "data.sources and data.train_files exclude each other; list every training file "
            "under data.sources (with its weight)"
        )
    if not d.streaming:
        quarantine.unlink(missing_ok=True)  # rebuilt below (or restored from the cache)
        quarantine.with_name(data_sources.DROPPED_FILE).unlink(missing_ok=True)
    if d.train_files or d.sources:
        train_files = [Path(p) for p in d.train_files]
        eval_files = [Path(p) for p in d.eval_files]
        for key, files in (("data.train_files", train_files), ("data.eval_files", eval_files)):
            for i, f in enumerate(files):
                if not f.exists():
                    raise ConfigError(f"{key}[{i}]: {f} not found")
            data_load.expand_files(files, key=key)  # a directory without data files is named
        synthetic_files = False
    else:
        train_file, eval_file = write_synthetic(cfg, data_dir)
        train_files, eval_files = [train_file], [eval_file]
        synthetic_files = True
    via_sources = data_sources.uses_sources(d)
    sources = data_sources.train_sources(d, train_files) if via_sources else []
    eval_source = data_sources.eval_source(d, eval_files) if via_sources else None
    if synthetic_files:
        input_files: list[Path] = []  # generated from the config and seed, both fingerprinted
    elif via_sources:
        input_files = data_sources.source_files([*sources, *([eval_source] if eval_source else [])])
    else:
        input_files = data_load.expand_files([*train_files, *eval_files])
    return _Plan(
        cfg=cfg,
        data_dir=data_dir,
        sink=Sink(quarantine, write=rank == 0 or not d.streaming),
        budget=data_sources.length_budget(d),
        eval_budget=data_sources.length_budget(d, packed=False),
        error_budget=data_sources.ErrorBudget(d.max_error_rate, quarantine),
        train_files=train_files,
        eval_files=eval_files,
        sources=sources,
        eval_source=eval_source,
        input_files=input_files,
        hf_cache=data_dir / "hf-cache",
    )


def _read_train(plan: _Plan) -> dict[str, Any]:
    """Every training source read (the one reader) and made records, its bad rows
    quarantined: ``parts`` (records and places per source), counts, source summaries.
    ``data.train_files`` are one source; without ``data.sources``/``format``/``column_map``
    their rows in tscale's own shapes are kept as they are (``own_shapes``)."""
    parts, errors, summaries, rows_total, kept = [], Counter(), [], 0, 0
    shapes: Counter = Counter()
    for s in plan.sources or [data_sources.train_sources(plan.cfg.data, plan.train_files)[0]]:
        got = data_sources.read_source(
            s, cache_dir=plan.hf_cache, quarantine=plan.quarantine, own_shapes=not plan.sources
        )
        errors.update(data_load.reason_head(e.reason) for e in got.errors)
        parts.append((got.records, got.places))
        rows_total += got.rows
        kept += len(got.records)
        shapes.update(got.shapes)
        summaries.append(
            {"source": s.name, "key": s.key, "rows": got.rows, "kept": len(got.records),
             "weight": s.weight}
        )  # fmt: skip
    return {
        "parts": parts,
        "records": kept,
        "rows": rows_total,
        "load_errors": dict(errors),
        "sources": summaries if plan.sources else None,
        "shapes": dict(shapes),
    }


def _read_eval(plan: _Plan) -> tuple[list[dict], list[str] | None, dict[str, Any]]:
    """The eval records (read like the training data), their places, and ``{"rows",
    "load_errors"}`` (bad rows quarantined)."""
    source = plan.eval_source or data_sources.eval_source(plan.cfg.data, plan.eval_files)
    if source is None:
        return [], None, {"rows": 0, "load_errors": Counter()}
    got = data_sources.read_source(
        source, cache_dir=plan.hf_cache, quarantine=plan.quarantine, own_shapes=not plan.sources
    )
    reasons = Counter(data_report.reason_key(e.reason) for e in got.errors)
    return got.records, got.places, {"rows": got.rows, "load_errors": reasons}


def _eval_set(
    plan: _Plan,
    stage: ExampleStage,
    records: list[dict],
    places: list[str] | None,
    read: dict[str, Any],
) -> tuple[list[dict], Counter, dict[str, Any]]:
    """The eval examples (never packed), their errors and the data report's ``eval`` entry."""
    where = places if places is not None else [f"eval record {i}" for i in range(len(records))]
    examples, errors, dropped, length = examples_of(
        stage,
        plan.sink,
        records,
        where,
        budget=plan.eval_budget,
        max_length=plan.cfg.data.max_length,
    )
    counts = data_report.split_counts(
        rows_read=read["rows"],
        kept=len(examples),
        kept_name="kept",
        dropped=dropped,
        quarantined=read["load_errors"] + errors,
        truncated=length.truncated_examples,
        examples=len(examples),
    )
    return examples, errors, counts


def _trained_tokenizer(plan: _Plan, train_records: Callable[[], dict[str, Any]]) -> Any:
    """tscale's BPE trained on the training records (cached in the run's data folder)."""
    d = plan.cfg.data
    if not plan.sources:
        files = data_load.expand_files(plan.train_files)
        cached = (
            plan.data_dir / f"tokenizer-{files_fingerprint(files, d.tokenizer.vocab_size)}.json"
        )
        what = ", ".join(map(str, plan.train_files))
    else:
        key = fingerprint(
            {"vocab_size": d.tokenizer.vocab_size,
             "sources": [attrs.asdict(s) for s in plan.sources]},
            plan.input_files,
        )  # fmt: skip
        cached = plan.data_dir / f"tokenizer-{key[:32]}.json"
        what = ", ".join(f"{s.key} ({s.name})" for s in plan.sources)
    records: list[dict] = []
    if not cached.is_file():
        if d.streaming:
            rows = data_sources.open_stream(
                plan.sources,
                seed=0,
                cache_dir=plan.hf_cache,
                quarantine=plan.quarantine if plan.sink.write else None,
            )
            heads = itertools.islice(rows, _TOKENIZER_STREAM_ROWS)
            records = [res.value for res, _ in heads if isinstance(res, Ok)]
        else:
            records = [r for part, _ in train_records()["parts"] for r in part]
    return data_sources.train_tokenizer_on(
        records, d.tokenizer.vocab_size, cached, what=what, quarantine=plan.quarantine
    )


def build_data(
    cfg: Config,
    run_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    make_examples: MakeExamples = sft_examples,
) -> DataBundle:
    """Generate or read the data, train or load the tokenizer, run every record through the
    example stage (``make_examples``; SFT's by default) and pack it (or read it back from the
    processed-data cache), and make the loader (which yields this rank's share of every global
    batch). With ``data.streaming`` the same stages run on the fly.

    Raises:
        ConfigError: data keys that contradict each other or name unknown columns.
        DataError: unreadable data, no usable example, or more quarantined rows than
            ``data.max_error_rate`` allows.
    """
    cfg = resolve_defaults(cfg)  # null/auto keys (data.max_length, data.loss_mode)
    plan = _plan(cfg, run_dir, rank)
    d = cfg.data

    # Records are read lazily: a cache hit (or a cached tokenizer) never reads them.
    read: dict[str, Any] = {}

    def train_records() -> dict[str, Any]:
        if not read:
            read.update(_read_train(plan))
        return read

    encoder = build_encoder(cfg, lambda: _trained_tokenizer(plan, train_records))
    template = select_template(cfg, encoder)
    tpl = template.template
    # The exported folder carries the template training used (none for plain).
    trained_template = None if tpl.source == PLAIN_SOURCE else tpl.source
    encoder = attrs.evolve(encoder, chat_template=trained_template)
    tokenizer_files = save_tokenizer_folder(encoder, plan.data_dir / "tokenizer")
    stage = make_examples(cfg, encoder, template)
    eval_records, eval_places, eval_read = _read_eval(plan)
    if d.streaming:
        loader, train_examples, example_lengths, report = _streaming(
            plan, stage, encoder, rank=rank, world_size=world_size
        )
        eval_examples, eval_errors, eval_counts = _eval_set(
            plan, stage, eval_records, eval_places, eval_read
        )
        report["eval_examples"] = len(eval_examples)
        report["eval_encode_errors"] = dict(eval_errors)
        report["eval"] = eval_counts
        report["tokenizer"] = tokenizer_summary(encoder, tpl)
    else:
        train_examples, eval_examples, example_lengths, report = _in_memory(
            plan, stage, encoder, tpl, train_records, eval_records, eval_places, eval_read
        )
        report = {**report, "tokenizer": tokenizer_summary(encoder, tpl)}
        if not train_examples:
            raise DataError(_nothing_to_train(report, plan))
        if d.max_tokens is None and d.batch_size > len(train_examples):
            raise DataError(
                f"data.batch_size ({d.batch_size}) is larger than the {len(train_examples)} "
                "training examples; lower data.batch_size or add training data"
            )
        loader = BatchLoader(
            train_examples,
            d.batch_size,
            seed=cfg.run.seed,
            shuffle=d.shuffle,
            pad_id=encoder.pad_id,
            group_by_length=d.group_by_length,
            longest_first=d.longest_first,
            max_tokens=d.max_tokens,
            rank=rank,
            world_size=world_size,
            drop_last=d.drop_last is not False,
        )
    return DataBundle(
        encoder=encoder,
        tokenizer_files=tokenizer_files,
        loader=loader,
        train_examples=train_examples,
        eval_examples=eval_examples,
        eval_records=eval_records,
        report=report,
        encode_prompt=prompt_encoder(cfg, encoder, tpl),
        example_lengths=example_lengths,
        template=tpl,
    )


def _in_memory(
    plan: _Plan,
    stage: ExampleStage,
    encoder: Encoder,
    tpl: ChatTemplate,
    train_records: Callable[[], dict[str, Any]],
    eval_records: list[dict],
    eval_places: list[str] | None,
    eval_read: dict[str, Any],
) -> tuple[list[dict], list[dict], list[int], dict[str, Any]]:
    """The whole data through the pipeline at once (or read back from the processed-data
    cache): ``(train examples, packed when packing; eval examples; lengths; report)``."""
    cfg, d = plan.cfg, plan.cfg.data
    quarantine, budget = plan.quarantine, plan.budget
    cache_root = Path(d.cache_dir) if d.cache_dir is not None else plan.data_dir / "cache"
    folder = cache_root / (
        "processed-"
        + data_sources.processed_fingerprint(
            cfg, encoder.tokenizer.to_str(), plan.input_files, template=tpl, encoder=encoder
        )[:32]
    )
    cached_data = data_sources.load_processed(folder, quarantine) if d.cache else None
    if cached_data is not None:
        train_examples, eval_examples, meta = cached_data
        report = {**meta["report"], "cache": "hit", "cache_path": str(folder)}
        report["quarantine"] = str(quarantine) if quarantine.exists() else None
        report["dropped_file"] = _if_exists(plan.sink.dropped_file)
        return train_examples, eval_examples, list(meta["example_lengths"]), report
    got = train_records()
    train_errors, train_dropped, length_report = Counter(), Counter(), LengthReport()
    parts = []
    packing = d.packing.enabled
    for records, places in got["parts"]:
        examples, errors, dropped, rep = examples_of(
            stage,
            plan.sink,
            records,
            places,
            budget=budget,
            max_length=None if packing else d.max_length,
        )
        parts.append(examples)
        train_errors += errors
        train_dropped += dropped
        length_report = length_report + rep
    if len(parts) == 1:
        train_examples = parts[0]
    else:
        order = data_sources.mixed_order(
            [len(p) for p in parts], [s.weight for s in plan.sources], cfg.run.seed
        )
        train_examples = [parts[i][j] for i, j in order]
    eval_examples, eval_errors, eval_counts = _eval_set(
        plan, stage, eval_records, eval_places, eval_read
    )
    rows, load_errors = got["rows"], _by_kind(got["load_errors"])
    bad = load_errors + train_errors
    error_budget = plan.error_budget
    error_budget.add(rows, bad.total(), bad)
    error_budget.check(final=True)
    example_lengths = [len(e["input_ids"]) for e in train_examples]
    pack_report = None
    if packing and train_examples:
        train_examples, pack_report = pack_examples(
            train_examples, d.max_length, split_overflow=d.packing.split_overflow
        )
    packer_dropped = pack_report.dropped_too_long if pack_report is not None else 0
    if packer_dropped:  # not expected: the length budget fits every example first
        train_dropped["too long (packer)"] += packer_dropped
    report = {
        "train_records": got["records"],
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "load_errors": got["load_errors"],
        "train_encode_errors": dict(train_errors),
        "eval_encode_errors": dict(eval_errors),
        "quarantine": str(quarantine) if quarantine.exists() else None,
        "packing": pack_report.summary() if pack_report is not None else None,
        "train_rows": rows,
        "quarantined_rows": error_budget.bad,
        "error_rate": error_budget.bad / rows if rows else 0.0,
        "length": _length_summary(length_report) if budget is not None else None,
        "sources": got["sources"],
        "streaming": False,
        "train": data_report.split_counts(
            rows_read=rows,
            kept=sum(len(p) for p in parts) - packer_dropped,
            dropped=train_dropped,
            quarantined=load_errors + train_errors,
            truncated=length_report.truncated_examples,
            split=pack_report.split_documents if pack_report is not None else 0,
            examples=len(train_examples),
            **data_report.token_counts(train_examples, pack_report),
        ),
        "eval": eval_counts,
        "limit": _limit_name(budget),
        "dropped_file": _if_exists(plan.sink.dropped_file),
        "max_error_rate": d.max_error_rate,
        "complete": True,
    }
    if len(got["shapes"]) > 1:  # a file (or mixture) of several shapes: say so
        report["shapes"] = dict(got["shapes"])
    if d.cache and train_examples:
        data_sources.save_processed(
            folder,
            train=train_examples,
            eval_examples=eval_examples,
            meta={"report": report, "example_lengths": example_lengths},
            quarantine=quarantine,
        )
    report = {**report, "cache": "miss" if d.cache else "off", "cache_path": str(folder)}
    return train_examples, eval_examples, example_lengths, report


def _streaming(
    plan: _Plan,
    stage: ExampleStage,
    encoder: Encoder,
    *,
    rank: int,
    world_size: int,
) -> tuple[StreamingBatchLoader, list[dict], list[int], dict[str, Any]]:
    """The loader of ``data.streaming``: it reads, runs the stage and packs on the fly (every
    rank the same global batches, keeping its rows; rank 0 writes the quarantine).
    ``report["train"]`` counts the rows read so far (``complete`` stays False); rank 0 rewrites
    ``<run>/data_report.json`` with every chunk read."""
    cfg, d = plan.cfg, plan.cfg.data
    packing, quarantine, error_budget = d.packing.enabled, plan.quarantine, plan.error_budget
    report: dict[str, Any] = {
        "streaming": True,
        "train_rows": 0,
        "quarantined_rows": 0,
        "error_rate": 0.0,
        "quarantine": str(quarantine),
        "cache": "off (streaming)",
        "sources": [{"source": s.name, "key": s.key, "weight": s.weight} for s in plan.sources],
        "train": data_report.split_counts(
            rows_read=0, kept=0, dropped={}, quarantined={}, truncated=0, split=None
        ),
        "limit": _limit_name(plan.budget),
        "dropped_file": str(plan.sink.dropped_file),
        "max_error_rate": d.max_error_rate,
        "complete": False,
    }
    seen = {"dropped": Counter(), "quarantined": Counter(), "truncated": 0}
    if d.packing.buffer_size < 1:
        raise ConfigError(f"data.packing.buffer_size must be >= 1, got {d.packing.buffer_size}")
    if d.group_by_length or d.max_tokens is not None:
        raise ConfigError(
            "data.streaming reads in order and batches data.batch_size rows: data.group_by_length "
            "and data.max_tokens are for in-memory data; remove them or set data.streaming: false"
        )

    def prepare(records: Sequence[dict], places: Sequence[str]) -> list[Ok[dict] | Err]:
        results, length_report = run_stage(
            stage,
            records,
            places,
            budget=plan.budget,
            max_length=None if packing else d.max_length,
        )
        seen["truncated"] += length_report.truncated_examples
        return results

    def on_errors(errors: list[Err], rows: int) -> None:
        _, quarantined, dropped = plan.sink.sort(errors)  # rank 0 writes (every rank reads all)
        seen["quarantined"].update(quarantined)
        seen["dropped"].update(dropped)
        error_budget.add(rows, quarantined.total(), quarantined)
        report.update(
            train_rows=error_budget.rows,
            quarantined_rows=error_budget.bad,
            error_rate=error_budget.bad / error_budget.rows if error_budget.rows else 0.0,
            train=data_report.split_counts(
                rows_read=error_budget.rows,
                kept=error_budget.rows - seen["dropped"].total() - seen["quarantined"].total(),
                dropped=seen["dropped"],
                quarantined=seen["quarantined"],
                truncated=seen["truncated"],
                split=None,
            ),
        )
        if rank == 0:  # <run>/data_report.json follows the stream (quarantine is <run>/data/…)
            data_report.write_report(quarantine.parent.parent, report)
        error_budget.check(final=False)

    def stream(epoch: int) -> Iterator[tuple[Ok[dict] | Err, str]]:
        return data_sources.open_stream(
            plan.sources,
            seed=cfg.run.seed + epoch,
            cache_dir=plan.hf_cache,
            quarantine=plan.quarantine if rank == 0 else None,
        )

    loader = StreamingBatchLoader(
        stream,
        prepare,
        batch_size=d.batch_size,
        pad_id=encoder.pad_id,
        packing=packing,
        max_length=d.max_length,
        buffer_size=d.packing.buffer_size,
        split_overflow=d.packing.split_overflow,
        on_errors=on_errors,
        rank=rank,
        world_size=world_size,
        empty_hint=f"the rows and reasons are in {quarantine} and {plan.sink.dropped_file}",
    )
    return loader, [], [], report


# --------------------------------------------------------------------------------------------
# Report helpers
# --------------------------------------------------------------------------------------------


def _nothing_to_train(report: dict[str, Any], plan: _Plan) -> str:
    """Why no example is left: the counts, the top reasons, the files that hold the rows."""
    train = report.get("train") or {}
    why = [
        f"{train.get(kind, 0)} {kind} ({', '.join(f'{r}: {n}' for r, n in list(rs.items())[:2])})"
        for kind, rs in (
            ("dropped", train.get("dropped_reasons") or {}),
            ("quarantined", train.get("quarantined_reasons") or {}),
        )
        if train.get(kind)
    ]
    return (
        f"no usable training example: {train.get('rows_read', 0)} rows read, "
        f"{', '.join(why) or 'none kept'}; the rows are in {plan.quarantine} and "
        f"{plan.sink.dropped_file} (data.max_length {plan.cfg.data.max_length} counts the "
        "template's tokens too)"
    )


def _by_kind(reasons: dict[str, int]) -> Counter:
    """Counts by reason, merged by :func:`data_report.reason_key`."""
    out: Counter = Counter()
    for reason, n in reasons.items():
        out[data_report.reason_key(reason)] += n
    return out


def _limit_name(budget: LengthBudget | None) -> str | None:
    """What the length budget fits examples to, for the data report."""
    if budget is None:
        return None
    if budget.per_column_limits:
        limit = f" and {budget.limit_name}" if budget.max_total_length is not None else ""
        return f"data.length.per_column_limits{limit}"
    return budget.limit_name


def _if_exists(path: Path) -> str | None:
    return str(path) if path.exists() else None


def _length_summary(report: LengthReport) -> dict[str, Any]:
    """The length budget's counts for the end-of-run report."""
    return {
        "records": report.records,
        "kept": report.kept,
        "truncated_records": report.truncated_records,
        "truncated_examples": report.truncated_examples,
        "truncated_columns": {c: dict(r) for c, r in report.truncated.items()},
        "dropped": dict(report.dropped),
        "summary": report.summary(),
    }
