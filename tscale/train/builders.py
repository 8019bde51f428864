"""Builders: the one place where the YAML config turns into library objects (house rule 2)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from tensordict import TensorDictBase

from tscale.checkpoint.hf import from_pretrained
from tscale.config import rules
from tscale.config.schema import Config, DataConfig, model_max_positions, resolve_defaults
from tscale.core import tree as T
from tscale.core.result import Err, Ok
from tscale.core.state import TrainState
from tscale.data import load as data_load
from tscale.data import synthetic
from tscale.data.hf_tokenizer import add_tokens, save_tokenizer_folder
from tscale.data.length import Dropped, LengthBudget, LengthReport
from tscale.data.loader import BatchLoader
from tscale.data.pack import pack_examples
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import (
    BUILTIN_TEMPLATES,
    TEMPLATE_NAMES,
    ChatTemplate,
    render_messages,
    to_messages,
)
from tscale.data.sources import fingerprint
from tscale.data.stream import StreamingBatchLoader
from tscale.data.tokenize import Encoder, load_or_train_tokenizer
from tscale.errors import ConfigError, DataError, ShapeError
from tscale.models.lora import Base, LoraConfig, with_dropout_keys
from tscale.models.protocol import LanguageModel
from tscale.models.quant import quantize_params
from tscale.models.stack import stack_model
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.base import GradientTransformation, Schedule
from tscale.optim.record import CONFIG_MASK, check_fields
from tscale.optim.transforms import MaskFn, NormFn
from tscale.step.compile import compile_step
from tscale.step.compose import StepFn, make_train_step
from tscale.step.sophia import make_hessian_estimate
from tscale.train import data_report, data_sources

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def validate(cfg: Config) -> None:
    """:func:`tscale.config.rules.check` on the resolved values, with ``model.path``'s max
    positions read here; raises ConfigError naming the keys."""
    positions = model_max_positions(cfg.model.path) if cfg.model.path is not None else None
    rules.check(resolve_defaults(cfg, max_positions=positions), checkpoint_positions=positions)


validate_steps = rules.check_steps


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


_CHAT_KEYS = ("messages", "conversations")
_PLAIN_SOURCE = BUILTIN_TEMPLATES["plain"].source


@attrs.frozen
class SelectedTemplate:
    """The template the data is rendered with; ``plain_only``: ``data.template: auto`` fell back
    to ``plain`` (no chat_template in the tokenizer), so chat records are an error."""

    template: ChatTemplate
    plain_only: bool = False

    def check(self, records: Sequence[dict], encoder: Encoder) -> None:
        if self.plain_only and any(k in r for r in records for k in _CHAT_KEYS):
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


def _prepare(
    cfg: Config,
    encoder: Encoder,
    records: list[dict],
    name: str,
    quarantine: Path,
    *,
    max_length: int | None,
    where: list[str] | None = None,
    budget: LengthBudget | None = None,
    template: SelectedTemplate | None = None,
) -> tuple[list[dict], Counter, Counter, LengthReport]:
    """Fit each record to the length budget, render it with the template and tokenize it with its
    loss mask (batched, each text encoded once). A malformed record (an ``Err``) goes to the
    quarantine file, a record the length policy leaves out (:class:`Dropped`) to the dropped-rows
    file beside it, each with the original record.

    Returns:
        ``(examples, quarantined by reason, dropped by reason, length report)``.
    """
    d = cfg.data
    places = where if where is not None else [f"{name} record {i}" for i in range(len(records))]
    template = template if template is not None else select_template(cfg, encoder)
    template.check(records, encoder)
    results, length_report = prepare_examples(
        records,
        template.template,
        encoder,
        add_bos=encoder.adds_bos,  # the BOS/EOS rule of docs/data.md
        add_eos=True,
        system=d.system_prompt,
        loss_mode=d.loss_mode,
        max_length=max_length,
        budget=budget,
        where=places,
    )
    ok: list[dict] = []
    errors: Counter = Counter()
    dropped: Counter = Counter()
    bad: list[Err] = []
    left_out: list[Err] = []
    for record, res in zip(records, results, strict=True):
        if isinstance(res, Ok):
            ok.append(res.value)
        elif isinstance(res, Dropped):
            dropped[data_report.reason_key(res.reason)] += 1
            left_out.append(attrs.evolve(res, record=record))
        else:
            errors[data_report.reason_key(res.reason)] += 1
            bad.append(attrs.evolve(res, record=record))
    data_load.write_quarantine(bad, quarantine)
    data_load.write_quarantine(left_out, quarantine.with_name(data_sources.DROPPED_FILE))
    return ok, errors, dropped, length_report


def question_and_answer(record: dict) -> tuple[str, str]:
    """The prompt text and the expected answer of an eval record: ``prompt``/``completion``, or
    for chat records the last user turn before the final turn and that final turn."""
    if "completion" in record:
        return str(record.get("prompt", "")), str(record["completion"])
    if "output" in record:  # alpaca
        inp = record.get("input") or ""
        instruction = str(record.get("instruction", ""))
        return (f"{instruction}\n\n{inp}" if inp else instruction), str(record["output"])
    turns = record.get("messages") or record.get("conversations") or []
    text = [str(t.get("content", t.get("value", ""))) for t in turns if isinstance(t, dict)]
    return (text[-2] if len(text) > 1 else ""), (text[-1] if text else "")


def prompt_encoder(
    cfg: Config, encoder: Encoder, template: ChatTemplate | None = None
) -> Callable[[dict], list[int]]:
    """``record -> ids`` of the generation prompt: the template's rendering of every message but
    the last (the answer), with the generation prompt added, encoded without special tokens;
    BOS first when the tokenizer adds one and the template did not write it (never twice)."""
    d = cfg.data
    tpl = template if template is not None else select_template(cfg, encoder).template
    plain = tpl.source == _PLAIN_SOURCE
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


def build_data(cfg: Config, run_dir: Path, *, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Generate or load the data, train or load the tokenizer, fit, template, tokenize and pack
    it (or read it back from the processed-data cache), and make the loader (which yields this
    rank's share of every global batch).

    Raises:
        ConfigError: data keys that contradict each other or name unknown columns.
        DataError: unreadable data, no usable example, or more quarantined rows than
            ``data.max_error_rate`` allows.
    """
    cfg = resolve_defaults(cfg)  # null/auto keys (data.max_length, data.loss_mode)
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
    budget = data_sources.length_budget(d)
    eval_budget = data_sources.length_budget(d, packed=False)
    error_budget = data_sources.ErrorBudget(d.max_error_rate, quarantine)
    if d.train_files or d.sources:
        train_files = [Path(p) for p in d.train_files]
        eval_files = [Path(p) for p in d.eval_files]
        for key, files in (("data.train_files", train_files), ("data.eval_files", eval_files)):
            for i, f in enumerate(files):
                if not f.exists():
                    raise ConfigError(f"{key}[{i}]: {f} not found")
        synthetic_files = False
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
        synthetic_files = True
    hf_cache = data_dir / "hf-cache"
    via_sources = data_sources.uses_sources(d)
    sources = data_sources.train_sources(d, train_files) if via_sources else []
    eval_source = data_sources.eval_source(d, eval_files) if via_sources else None
    if synthetic_files:
        input_files: list[Path] = []  # generated from the config and seed, both fingerprinted
    elif via_sources:
        input_files = data_sources.source_files([*sources, *([eval_source] if eval_source else [])])
    else:
        input_files = [*train_files, *eval_files]

    # Records are read lazily: a cache hit (or a cached tokenizer) never reads them.
    read: dict[str, Any] = {}

    def train_records() -> dict[str, Any]:
        if not read:
            read.update(_read_train(cfg, sources, train_files, quarantine, hf_cache))
        return read

    def trained() -> Any:  # tscale's BPE, trained on the training data (cached)
        if not via_sources:
            return load_or_train_tokenizer(
                None, train_files, d.tokenizer.vocab_size, cache_dir=data_dir
            )
        key = fingerprint(
            {"vocab_size": d.tokenizer.vocab_size, "sources": [attrs.asdict(s) for s in sources]},
            input_files,
        )
        cached = data_dir / f"tokenizer-{key[:32]}.json"
        texts = [] if cached.is_file() else _tokenizer_records(d, sources, train_records, hf_cache)
        return data_sources.train_tokenizer_on(texts, d.tokenizer.vocab_size, cached)

    encoder = build_encoder(cfg, trained)
    template = select_template(cfg, encoder)
    tpl = template.template
    # The exported folder carries the template training used (none for plain).
    trained_template = None if tpl.source == _PLAIN_SOURCE else tpl.source
    encoder = attrs.evolve(encoder, chat_template=trained_template)
    tokenizer = encoder.tokenizer
    tokenizer_files = save_tokenizer_folder(encoder, data_dir / "tokenizer")
    packing = d.packing.enabled
    eval_records: list[dict] = []
    eval_places: list[str] | None = None
    eval_read = {"rows": 0, "load_errors": Counter()}  # rows read and quarantined on loading
    if eval_source is not None:
        eval_records, eval_places, eval_bad, eval_rows = data_sources.read_source(
            eval_source, cache_dir=hf_cache
        )
        data_load.write_quarantine(eval_bad, quarantine)
        eval_read = {
            "rows": eval_rows,
            "load_errors": Counter(data_report.reason_key(e.reason) for e in eval_bad),
        }
    elif eval_files:
        eval_records, eval_load = data_load.load_records(
            eval_files, quarantine=quarantine, cache_dir=hf_cache
        )
        eval_read = {"rows": eval_load.total, "load_errors": _by_kind(eval_load.errors)}
    if d.streaming:
        return _streaming_bundle(
            cfg,
            sources,
            encoder,
            tokenizer_files,
            template,
            eval_records,
            eval_places,
            quarantine,
            error_budget,
            budget,
            hf_cache,
            eval_read,
            eval_budget,
            rank=rank,
            world_size=world_size,
        )

    cache_root = Path(d.cache_dir) if d.cache_dir is not None else data_dir / "cache"
    folder = cache_root / (
        "processed-"
        + data_sources.processed_fingerprint(
            cfg, tokenizer.to_str(), input_files, template=tpl, encoder=encoder
        )[:32]
    )
    cached_data = data_sources.load_processed(folder, quarantine) if d.cache else None
    if cached_data is not None:
        train_examples, eval_examples, meta = cached_data
        report = {**meta["report"], "cache": "hit", "cache_path": str(folder)}
        report["quarantine"] = str(quarantine) if quarantine.exists() else None
        report["dropped_file"] = _if_exists(quarantine.with_name(data_sources.DROPPED_FILE))
        example_lengths = list(meta["example_lengths"])
    else:
        got = train_records()
        train_errors, train_dropped, length_report = Counter(), Counter(), LengthReport()
        parts = []
        for records, places in got["parts"]:
            examples, errors, dropped, rep = _prepare(
                cfg,
                encoder,
                records,
                "train",
                quarantine,
                max_length=None if packing else d.max_length,
                where=places,
                budget=budget,
                template=template,
            )
            parts.append(examples)
            train_errors += errors
            train_dropped += dropped
            length_report = length_report + rep
        if len(parts) == 1:
            train_examples = parts[0]
        else:
            order = data_sources.mixed_order(
                [len(p) for p in parts], [s.weight for s in sources], cfg.run.seed
            )
            train_examples = [parts[i][j] for i, j in order]
        eval_examples, eval_errors, eval_dropped, eval_length = _prepare(
            cfg,
            encoder,
            eval_records,
            "eval",
            quarantine,
            max_length=d.max_length,
            where=eval_places,
            budget=eval_budget,
            template=template,
        )
        rows, load_errors = got["rows"], _by_kind(got["load_errors"])
        bad = load_errors + train_errors
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
            "eval": _eval_counts(eval_read, eval_examples, eval_dropped, eval_errors, eval_length),
            "limit": _limit_name(budget),
            "dropped_file": _if_exists(quarantine.with_name(data_sources.DROPPED_FILE)),
            "max_error_rate": d.max_error_rate,
            "complete": True,
        }
        if d.cache and train_examples:
            data_sources.save_processed(
                folder,
                train=train_examples,
                eval_examples=eval_examples,
                meta={"report": report, "example_lengths": example_lengths},
                quarantine=quarantine,
            )
        report = {**report, "cache": "miss" if d.cache else "off", "cache_path": str(folder)}
    report = {**report, "tokenizer": tokenizer_summary(encoder, tpl)}
    if not train_examples:
        raise DataError(
            f"no usable training example; see {quarantine} and "
            f"{quarantine.with_name(data_sources.DROPPED_FILE)} for the reasons"
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


def _eval_counts(
    read: dict[str, Any],
    examples: list[dict],
    dropped: Counter,
    errors: Counter,
    length: LengthReport,
) -> dict[str, Any]:
    """The data report's ``eval`` entry: eval rows read = kept + dropped + quarantined."""
    return data_report.split_counts(
        rows_read=read["rows"],
        kept=len(examples),
        kept_name="kept",
        dropped=dropped,
        quarantined=read["load_errors"] + errors,
        truncated=length.truncated_examples,
        examples=len(examples),
    )


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


def _read_train(
    cfg: Config,
    sources: list[data_sources.Source],
    train_files: list[Path],
    quarantine: Path,
    hf_cache: Path,
) -> dict[str, Any]:
    """Every training source read and canonicalized (or the JSON-lines files loaded), its bad
    rows quarantined: ``parts`` (records and places per source), counts, source summaries."""
    if not sources:
        records, report = data_load.load_records(
            train_files, quarantine=quarantine, cache_dir=hf_cache
        )
        return {
            "parts": [(records, [f"train record {i}" for i in range(len(records))])],
            "records": len(records),
            "rows": report.total,
            "load_errors": dict(report.errors),
            "sources": None,
        }
    parts, errors, summaries, rows_total, kept = [], Counter(), [], 0, 0
    for s in sources:
        records, places, bad, rows = data_sources.read_source(s, cache_dir=hf_cache)
        data_load.write_quarantine(bad, quarantine)
        errors.update(e.reason.split(" (column")[0] for e in bad)
        parts.append((records, places))
        rows_total += rows
        kept += len(records)
        summaries.append(
            {"source": s.name, "key": s.key, "rows": rows, "kept": len(records), "weight": s.weight}
        )
    return {
        "parts": parts,
        "records": kept,
        "rows": rows_total,
        "load_errors": dict(errors),
        "sources": summaries,
    }


_TOKENIZER_STREAM_ROWS = 50000  # streamed rows a tokenizer is trained on (no tokenizer.path)


def _tokenizer_records(
    d: DataConfig,
    sources: list[data_sources.Source],
    train_records: Callable[[], dict[str, Any]],
    hf_cache: Path,
) -> list[dict]:
    """Canonical training records to train a tokenizer on (the first rows when streaming)."""
    if not d.streaming:
        return [r for records, _ in train_records()["parts"] for r in records]
    rows = data_sources.open_stream(sources, seed=0, cache_dir=hf_cache)
    out = []
    for res, _ in itertools.islice(rows, _TOKENIZER_STREAM_ROWS):
        if isinstance(res, Ok):
            out.append(res.value)
    return out


def _streaming_bundle(
    cfg: Config,
    sources: list[data_sources.Source],
    encoder: Encoder,
    tokenizer_files: dict[str, Path],
    template: SelectedTemplate,
    eval_records: list[dict],
    eval_places: list[str] | None,
    quarantine: Path,
    error_budget: data_sources.ErrorBudget,
    budget: LengthBudget | None,
    hf_cache: Path,
    eval_read: dict[str, Any],
    eval_budget: LengthBudget | None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """The bundle of ``data.streaming``: a loader that reads, prepares and packs on the fly
    (every rank the same global batches, keeping its rows; rank 0 writes the quarantine).
    ``report["train"]`` counts the rows read so far (``complete`` stays False); rank 0 rewrites
    ``<run>/data_report.json`` with every chunk read."""
    d = cfg.data
    packing = d.packing.enabled
    report: dict[str, Any] = {
        "streaming": True,
        "train_rows": 0,
        "quarantined_rows": 0,
        "error_rate": 0.0,
        "quarantine": str(quarantine),
        "cache": "off (streaming)",
        "sources": [{"source": s.name, "key": s.key, "weight": s.weight} for s in sources],
        "train": data_report.split_counts(
            rows_read=0, kept=0, dropped={}, quarantined={}, truncated=0, split=None
        ),
        "limit": _limit_name(budget),
        "dropped_file": str(quarantine.with_name(data_sources.DROPPED_FILE)),
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
        template.check(records, encoder)
        results, length_report = prepare_examples(
            records,
            template.template,
            encoder,
            add_bos=encoder.adds_bos,  # the BOS/EOS rule of docs/data.md
            add_eos=True,
            system=d.system_prompt,
            loss_mode=d.loss_mode,
            max_length=None if packing else d.max_length,
            budget=budget,
            where=places,
        )
        seen["truncated"] += length_report.truncated_examples
        return [
            attrs.evolve(r, record=rec) if isinstance(r, Err) else r
            for r, rec in zip(results, records, strict=True)
        ]

    def on_errors(errors: list[Err], rows: int) -> None:
        bad = [e for e in errors if not isinstance(e, Dropped)]
        left_out = [e for e in errors if isinstance(e, Dropped)]
        if rank == 0:  # every rank reads the same rows: one copy of each bad one
            data_load.write_quarantine(bad, quarantine)
            data_load.write_quarantine(left_out, quarantine.with_name(data_sources.DROPPED_FILE))
        reasons = Counter(data_report.reason_key(e.reason) for e in bad)
        seen["quarantined"].update(reasons)
        seen["dropped"].update(data_report.reason_key(e.reason) for e in left_out)
        error_budget.add(rows, len(bad), reasons)
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
        return data_sources.open_stream(sources, seed=cfg.run.seed + epoch, cache_dir=hf_cache)

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
    )
    eval_examples, eval_errors, eval_dropped, eval_length = _prepare(
        cfg,
        encoder,
        eval_records,
        "eval",
        quarantine,
        max_length=d.max_length,
        where=eval_places,
        budget=eval_budget,
        template=template,
    )
    report["eval_examples"] = len(eval_examples)
    report["eval_encode_errors"] = dict(eval_errors)
    report["eval"] = _eval_counts(eval_read, eval_examples, eval_dropped, eval_errors, eval_length)
    report["tokenizer"] = tokenizer_summary(encoder, template.template)
    return DataBundle(
        encoder=encoder,
        tokenizer_files=tokenizer_files,
        loader=loader,
        train_examples=[],
        eval_examples=eval_examples,
        eval_records=eval_records,
        report=report,
        encode_prompt=prompt_encoder(cfg, encoder, template.template),
        template=template.template,
    )


_NOT_ARCHITECTURE = ("path", "dtype", "attention_backend", "norm_backend", "checkpoint_layers")


def build_model(
    cfg: Config, vocab_size: int, key: torch.Tensor
) -> tuple[Transformer, TensorDictBase]:
    """The model of ``cfg.model`` and its initial params: loaded from ``model.path`` (an HF
    checkpoint), else initialised at random from ``key`` with ``vocab_size`` from the tokenizer
    unless ``model.vocab_size`` is set."""
    m = cfg.model
    if m.path is None:
        model = _random_model(cfg, vocab_size)
        return model, model.init(key)
    default = type(m)()
    for f in attrs.fields(type(m)):
        if f.name not in _NOT_ARCHITECTURE and getattr(m, f.name) != getattr(default, f.name):
            raise ConfigError(
                f"model.{f.name} conflicts with model.path: the checkpoint's config.json sets "
                "the architecture; remove model." + f.name
            )
    loaded = from_pretrained(m.path, dtype=_DTYPES[m.dtype])
    config, params = loaded.config, loaded.params
    rows = config.vocab_size
    if rows < vocab_size:
        added = len(cfg.data.tokenizer.add_tokens)
        if not added or vocab_size - added > rows:
            tok = cfg.data.tokenizer.path
            where = f"data.tokenizer.path {tok}" if tok is not None else f"model.path {m.path}'s"
            raise ConfigError(
                f"{where} tokenizer has token ids up to {vocab_size - 1}, but the embedding of "
                f"model.path {m.path} has {rows} rows: use the model's own tokenizer, or list "
                "new tokens in data.tokenizer.add_tokens to grow the embedding"
            )
        config, params = resize_vocab(config, params, vocab_size)
    config = attrs.evolve(
        config,
        attention_backend=m.attention_backend,
        norm_backend=m.norm_backend,
        checkpoint_layers=m.checkpoint_layers,
    )
    return Transformer(config), params


def resize_vocab(
    config: TransformerConfig, params: TensorDictBase, vocab_size: int
) -> tuple[TransformerConfig, TensorDictBase]:
    """``config`` and ``params`` with the embedding (and an untied head) grown to ``vocab_size``
    rows; each new row is the mean of the old rows (a deterministic start that keeps the new
    tokens' logits near the average, as transformers' ``resize_token_embeddings``)."""
    flat = dict(T.flatten(params))
    names = ["model.embed_tokens.weight"]
    if not config.tie_word_embeddings and "lm_head.weight" in flat:
        names.append("lm_head.weight")
    for name in names:
        old = flat[name]
        mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)
        flat[name] = torch.cat([old, mean.expand(vocab_size - old.shape[0], -1)]).contiguous()
    return attrs.evolve(config, vocab_size=vocab_size), T.unflatten(flat)


def _random_model(cfg: Config, vocab_size: int) -> Transformer:
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
            attention_backend=m.attention_backend,
            norm_backend=m.norm_backend,
            checkpoint_layers=m.checkpoint_layers,
        )
    )


def build_schedule(cfg: Config) -> Schedule:
    """The learning-rate schedule of ``cfg.scheduler`` (its record builds it) from
    ``optimizer.lr`` over ``train.max_steps``.

    Raises:
        ConfigError: a value the schedule rejects (the message names the config key).
    """
    cfg = resolve_defaults(cfg)
    if cfg.train.max_steps is None:
        raise ConfigError(
            "train.max_steps is null: train.epochs sets it once the data is read (the trainer "
            "does); set train.max_steps to build the schedule without the data"
        )
    try:
        check_fields(cfg.optimizer)  # the peak is optimizer.lr
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None
    try:
        return cfg.scheduler.build(cfg.optimizer.lr, cfg.train.max_steps)
    except ValueError as err:
        raise ConfigError(f"scheduler.{err}") from None


def decay_mask(cfg: Config) -> MaskFn | None:
    """Which params the configured optimizer decays: ``optimizer.no_decay`` as a mask, else the
    default (not norms, biases, embeddings)."""
    try:
        return cfg.optimizer.decay_mask()
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None


def build_optimizer(
    cfg: Config,
    schedule: Schedule,
    *,
    norm_fn: NormFn | None = None,
    mask: MaskFn | str | None = "config",
    clip: bool = True,
) -> GradientTransformation:
    """The optimizer of ``cfg.optimizer`` (its record builds it) driven by ``schedule``:
    ``skip_nonfinite?(chain(clip_by_global_norm(max_grad_norm)?, optimizer))``.

    ``mask`` other than ``"config"`` replaces the decay mask (None: decay every param) and
    ``clip=False`` leaves clipping out: DeepSpeed splits params into decay groups and clips
    across its partitions itself. An optimizer that replaces the schedule (schedule-free) takes
    ``optimizer.lr`` and ``scheduler.warmup_steps`` instead, with ``scheduler.type: constant``.

    Raises:
        ConfigError: a value the optimizer rejects, or a package it needs is missing (the
            message names the config key).
    """
    cfg = resolve_defaults(cfg)
    o = cfg.optimizer
    lr: float | Schedule = schedule
    warmup_steps = 0
    if o.capabilities.replaces_schedule:
        # Schedule-free replaces the decay schedule (Defazio et al. 2024): constant lr, own warmup.
        if cfg.scheduler.type != "constant":
            raise ConfigError(
                f"optimizer.type={o.type} needs no decay schedule: set "
                "scheduler.type: constant (scheduler.warmup_steps becomes its warmup)"
            )
        lr, warmup_steps = o.lr, cfg.scheduler.warmup_steps
    try:
        return o.build(
            lr,
            warmup_steps=warmup_steps,
            mask=CONFIG_MASK if mask == "config" else mask,
            norm_fn=norm_fn,
            clip=clip,
        )
    except ValueError as err:
        raise ConfigError(f"optimizer.{err}") from None
    except ImportError as err:
        raise ConfigError(f"optimizer.type={o.type}: {err}") from None


def build_step(
    cfg: Config,
    loss_fn: Callable,
    tx: GradientTransformation,
    *,
    apply_fn: Callable,
    **parallel: Any,
) -> StepFn:
    """The train step the config implies: ``make_train_step`` over the task's ``loss_fn``, with
    the Hessian estimate as the optimizer's extra argument when it needs the objective
    (Sophia-G); LoRA dropout draws its keys from the state's rng and step; ``train.compile``
    wraps the whole in ``torch.compile``. ``parallel``: ``grad_sync`` / ``grad_norm`` /
    ``metric_sync`` of a data-parallel run (see :mod:`tscale.train.distributed`)."""
    t = cfg.train
    if cfg.optimizer.capabilities.needs_objective:
        parallel["update_extra"] = make_hessian_estimate(apply_fn, microbatches=t.microbatches)
    step = make_train_step(loss_fn, tx, microbatches=t.microbatches, donate=t.donate, **parallel)
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        step = with_dropout_keys(step)
    if t.compile:
        step = compile_step(step, backend=t.compile_backend)
    return step


def build_lora_model(
    cfg: Config, model: Transformer, params: TensorDictBase
) -> tuple[LanguageModel, Base]:
    """The LoRA (or QLoRA) stack over ``model`` and its frozen base: ``params``, or with
    ``lora.qlora`` their NF4-quantised targets. The returned model holds no base: every call
    gets it as ``frozen["base"]`` (the train state's frozen tree, checkpointed by folder)."""
    lc = cfg.lora
    try:
        config = LoraConfig(
            rank=lc.rank,
            alpha=lc.alpha,
            dropout=lc.dropout,
            use_dora=lc.use_dora,
            use_rslora=lc.use_rslora,
            **({"targets": tuple(lc.targets)} if lc.targets is not None else {}),
        )
        base: Base = params
        if lc.qlora:
            base = quantize_params(params, config.targets, block_size=lc.qlora_block_size)
        stacked = stack_model(model, lora=config, base=base)  # checks the targets against it
    except (ValueError, ShapeError) as err:
        raise ConfigError(f"lora: {str(err).replace('LoraConfig.', 'lora.')}") from None
    except ImportError as err:
        raise ConfigError(
            f"lora.qlora needs bitsandbytes (pip install 'tscale[bnb]'): {err}"
        ) from None
    return attrs.evolve(stacked, base=None), base


def build_eval_params(cfg: Config) -> Callable[[TrainState], TensorDictBase]:
    """What to evaluate: the params, or what the optimizer says (schedule-free AdamW: its
    averaged iterate ``x``; training runs on ``y``, Defazio et al. 2024 evaluate ``x``)."""
    o = cfg.optimizer
    if o.capabilities.eval_params:
        return lambda state: o.params_to_evaluate(state.params, state.opt_state)
    return lambda state: state.params
