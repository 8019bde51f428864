"""Dataset sources: load local files or hub datasets through ``datasets``, mix, fingerprint, cache.

A *spec* names where the data is:

- a file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``, ``.txt``);
- a directory of such files, all of one format (splits are inferred from file names as
  ``datasets`` does: ``train*``, ``validation*``/``dev*``, ``test*``/``eval*``; otherwise every
  file is ``train``), or a directory written by ``Dataset.save_to_disk``;
- a list of files and directories (all ``train``) or a mapping ``{split: files}``;
- anything else that looks like ``name`` or ``owner/name``: a Hugging Face hub dataset.

Every failure a user can fix is a :class:`~tscale.errors.DataError` that names the file (and the
line, when one line is at fault) and says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from tscale.core.result import Err
from tscale.data.load import READERS, dir_files, read_file, supported
from tscale.errors import DataError

if TYPE_CHECKING:
    import datasets

SpecLike = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any]

BUILDERS: Mapping[str, str] = READERS
"""File extension → the ``datasets`` builder that reads it (``tscale.data.load.READERS``)."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MIB = 1 << 20


@attrs.frozen
class ResolvedSource:
    """Where a spec's data is: ``kind`` is ``"files"``, ``"saved"`` (``save_to_disk``) or ``"hub"``.

    ``data_files`` maps split → files (``"files"`` only); ``builder`` is the ``datasets`` builder
    for them (None when the files mix formats); ``path`` is the saved directory or ``None``;
    ``name`` is the spec as text.
    """

    kind: str
    name: str
    builder: str | None = None
    data_files: Mapping[str, tuple[Path, ...]] = attrs.field(factory=dict)
    path: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every data file, split by split (for :func:`fingerprint`)."""
        return tuple(f for fs in self.data_files.values() for f in fs)


# --------------------------------------------------------------------------------------------
# Resolving a spec
# --------------------------------------------------------------------------------------------


_supported = supported
_dir_files = dir_files


def _is_saved(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _dir_splits(path: Path) -> dict[str, list[Path]]:
    """Split → files of a directory, with the split names ``datasets`` infers from file names."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = _dir_files(path)
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(
            f"directory {path} has no data files ({', '.join(sorted(BUILDERS))}); found {found}. "
            "Put the data files there or pass the files themselves"
        )
    patterns = get_data_patterns(str(path))
    resolved = DataFilesDict.from_patterns(patterns, base_path=str(path))
    keep = {p.resolve() for p in files}
    out: dict[str, list[Path]] = {}
    for split, names in resolved.items():
        chosen = [Path(n) for n in names if Path(n).resolve() in keep]
        if chosen:
            out[str(split)] = chosen
    if not out:
        return {"train": files}
    assigned = {f.resolve() for fs in out.values() for f in fs}
    stray = [str(f) for f in files if f.resolve() not in assigned]
    if stray:  # datasets would skip them silently
        raise DataError(
            f"directory {path} names splits ({', '.join(out)}) by file name, but {stray[:5]} "
            "match no split; rename them (train*, validation*/dev*, test*/eval*) or pass "
            "{split: files} explicitly"
        )
    return out


def _expand(item: str | os.PathLike) -> list[Path]:
    path = Path(item).expanduser()
    if path.is_dir():
        return _dir_files(path)
    if not path.exists():
        raise DataError(
            f"data file not found: {path} (check the path; relative paths start from the "
            f"current directory {Path.cwd()})"
        )
    if not _supported(path):
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of "
            f"{sorted(BUILDERS)} (convert it, or rename a JSON-lines file to .jsonl)"
        )
    return [path]


def _one_builder(name: str, splits: Mapping[str, Sequence[Path]]) -> str:
    """The single ``datasets`` builder for all files (``load_source`` needs one); mixed formats
    are an error naming one file of each. The training pipeline reads each file with its own
    reader (:func:`tscale.data.load.read_file`), so mixed files are fine there."""
    by_builder: dict[str, Path] = {}
    for files in splits.values():
        for f in files:
            by_builder.setdefault(BUILDERS[f.suffix.lower()], f)
    if len(by_builder) > 1:
        shown = ", ".join(f"{b}: {f}" for b, f in sorted(by_builder.items()))
        raise DataError(
            f"{name} mixes file formats ({shown}); datasets reads one format at a time. Split "
            "it into one source per format, or train on it (tscale reads each file by its type)"
        )
    return next(iter(by_builder))


def is_hub_name(spec: str) -> bool:
    """Whether ``spec`` reads as a hub dataset name (``name`` or ``owner/name``, no extension)."""
    return (
        bool(_HUB_NAME.match(spec))
        and Path(spec).suffix.lower() not in BUILDERS
        and not spec.startswith((".", "~"))
    )


def resolve_source(spec: SpecLike) -> ResolvedSource:
    """Find the files (or the hub dataset) a spec names; see the module doc for the forms.

    Raises:
        DataError: a missing file, an unsupported extension, an empty directory, or a source
            that mixes formats.
    """
    if isinstance(spec, Mapping):
        splits = {
            str(k): [f for item in _as_list(v) for f in _expand(item)] for k, v in spec.items()
        }
        name = ", ".join(f"{k}: {list(map(str, v))}" for k, v in splits.items())
    elif isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if _is_saved(path):
            return ResolvedSource("saved", text, path=path)
        if path.is_dir():
            splits = _dir_splits(path)
        elif path.exists() or not is_hub_name(text):
            splits = {"train": _expand(path)}
        else:
            return ResolvedSource("hub", text)
        name = text
    else:
        splits = {"train": [f for item in spec for f in _expand(item)]}
        name = str([os.fspath(s) for s in spec])
    if not any(splits.values()):
        raise DataError(f"{name}: no data files found; pass at least one data file")
    mixed = len({BUILDERS[f.suffix.lower()] for fs in splits.values() for f in fs}) > 1
    builder = None if mixed else _one_builder(name, splits)  # None: one reader per file
    data_files = {k: tuple(v) for k, v in splits.items() if v}
    return ResolvedSource("files", name, builder=builder, data_files=data_files)


def _as_list(v: Any) -> list:
    return [v] if isinstance(v, str | os.PathLike) else list(v)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars and warnings for the duration; restore them after."""
    import datasets

    bars = datasets.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # The JSON builder logs a parse error with its traceback before raising it; the error is
    # turned into one line (file:line) by the caller, so the log would only repeat it badly.
    parser = logging.getLogger("datasets.packaged_modules.json.json")
    parser_level = parser.level
    parser.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        parser.setLevel(parser_level)
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def root_cause(exc: BaseException) -> str:
    """The innermost explicit cause of an exception (``datasets`` wraps the parser's error)."""
    cur = exc
    while cur.__cause__ is not None and cur.__cause__ is not cur:
        cur = cur.__cause__
    return f"{type(cur).__name__}: {cur}" if str(cur) else type(cur).__name__


def diagnose_file(path: Path, builder: str) -> str | None:
    """The first bad row of a text data file as ``"file:line N: reason"`` (what the one reader,
    :func:`tscale.data.load.read_file`, finds), or None if every row reads."""
    if builder not in ("json", "csv", "text"):
        return None
    try:
        for row, where in read_file(path):
            if isinstance(row, Err):
                return (
                    f"{where}: {row.reason}; fix that row (training quarantines it and trains "
                    "the rest)"
                )
    except DataError as e:
        return str(e)
    return None


def _load_error(source: ResolvedSource, exc: BaseException) -> DataError:
    """A DataError for a failed local load: the first file and line at fault when one is found."""
    assert source.builder is not None
    for f in source.files:
        problem = diagnose_file(f, source.builder)
        if problem is not None:
            return DataError(problem)
    files = ", ".join(map(str, source.files[:5])) + (" …" if len(source.files) > 5 else "")
    return DataError(
        f"cannot read {files} with the datasets {source.builder!r} builder ({root_cause(exc)}); "
        f"check that the file(s) are valid {source.builder} files"
    )


def hub_error(name: str, exc: BaseException) -> DataError:
    """A DataError for a failed hub access: unreachable hub, or no such dataset."""
    cause = root_cause(exc)
    text = f"{type(exc).__name__}: {exc} {cause}"
    if "DatasetNotFound" in text or "doesn't exist on the Hub" in text:
        return DataError(
            f"no dataset {name!r} on the Hugging Face Hub ({cause}); check the name, or pass "
            "local files if you meant a path"
        )
    if isinstance(exc, ConnectionError | OSError | TimeoutError) or "Offline" in text:
        return DataError(
            f"the Hugging Face Hub is unreachable, so the dataset {name!r} cannot be read "
            f"({cause}). Pass local files instead (json, jsonl, csv, parquet, arrow, txt, or a "
            "directory of them), or download the dataset where the hub is reachable; if "
            f"{name!r} was meant as a local path, it does not exist"
        )
    return DataError(f"cannot read the hub dataset {name!r}: {cause}")


def _split_base(split: str) -> str:
    """``"train[:10%]"`` → ``"train"`` (``datasets`` split slicing is passed through)."""
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def load_source(
    spec: SpecLike,
    *,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    config: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a source as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Args:
        spec: a file, a directory, a list of them, ``{split: files}``, or a hub name.
        split: the split to load; ``datasets`` slicing (``"train[:100]"``) is allowed.
        streaming: read lazily; file errors then surface while iterating, so validate with
            :func:`tscale.data.introspect.inspect_source` first.
        cache_dir: the ``datasets`` cache (default: its usual one).
        config: the hub dataset's configuration (subset), when it has several.

    Raises:
        DataError: a missing or unreadable file (naming file and line), mixed formats, an
            unknown split, or an unreachable hub.
    """
    import datasets

    source = resolve_source(spec)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    with quiet_datasets():
        if source.kind == "hub":
            try:
                return datasets.load_dataset(
                    source.name, config, split=split, streaming=streaming, cache_dir=cache
                )
            except DataError:
                raise
            except Exception as e:  # hub and builder errors come in many types
                raise hub_error(source.name, e) from e
        if source.kind == "saved":
            return _load_saved(source, split, streaming)
        base = _split_base(split)
        if base not in source.data_files:
            raise DataError(
                f"{source.name} has no split {base!r}; its splits are {sorted(source.data_files)} "
                "(file names starting with train/validation/test name the split)"
            )
        if source.builder is None:
            _one_builder(source.name, source.data_files)  # raises: datasets reads one format
        data_files = {base: [os.fspath(f) for f in source.data_files[base]]}
        for f in data_files[base]:
            if Path(f).stat().st_size == 0:
                raise DataError(f"{f} is empty; it needs at least one row")
        try:
            ds = datasets.load_dataset(
                source.builder, data_files=data_files, split=split, streaming=streaming,
                cache_dir=cache,
            )  # fmt: skip
            if isinstance(ds, datasets.Dataset) and source.builder in ("json", "csv", "text"):
                # pyarrow's readers keep invalid UTF-8 bytes and fail only when a row is read
                ds.data.table.validate(full=True)
        except Exception as e:  # parser errors arrive wrapped in several types
            raise _load_error(source, e) from e
        return ds


def _load_saved(
    source: ResolvedSource, split: str, streaming: bool
) -> datasets.Dataset | datasets.IterableDataset:
    import datasets

    assert source.path is not None
    try:
        loaded = datasets.load_from_disk(os.fspath(source.path))
    except Exception as e:
        raise DataError(f"cannot read the saved dataset {source.path} ({root_cause(e)})") from e
    if isinstance(loaded, datasets.DatasetDict):
        base = _split_base(split)
        if base not in loaded:
            raise DataError(f"{source.path} has no split {base!r}; its splits are {list(loaded)}")
        loaded = loaded[base]
    elif _split_base(split) != "train":
        raise DataError(f"{source.path} holds one dataset (split 'train'), not {split!r}")
    return loaded.to_iterable_dataset() if streaming else loaded


# --------------------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------------------


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights as probabilities summing to 1; each must be finite and positive."""
    if not weights:
        raise DataError("a mixture needs at least one source")
    for i, w in enumerate(weights):
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
            raise DataError(f"mixture weight #{i} is {w!r}; weights must be positive numbers")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def mix_sources(
    datasets_and_weights: Sequence[tuple[datasets.Dataset | datasets.IterableDataset, float]],
    *,
    seed: int,
    streaming: bool,
) -> datasets.Dataset | datasets.IterableDataset:
    """A weighted mixture: each example comes from source ``i`` with probability ``w_i / sum(w)``.

    Sources are interleaved by ``datasets.interleave_datasets`` with
    ``stopping_strategy="all_exhausted"`` (smaller sources are repeated until every source has
    been seen whole). With ``streaming``, map-style sources are made iterable.

    Raises:
        DataError: no sources, a weight that is not a positive number, an iterable source
            without ``streaming``, or sources whose columns differ (canonicalize them first).
    """
    import datasets

    probs = normalize_weights([w for _, w in datasets_and_weights])
    parts = []
    for i, (ds, _) in enumerate(datasets_and_weights):
        if isinstance(ds, datasets.IterableDataset):
            if not streaming:
                raise DataError(
                    f"mixture source #{i} is streaming (IterableDataset) but streaming=False; "
                    "load every source the same way or set streaming: true"
                )
            parts.append(ds)
        elif isinstance(ds, datasets.Dataset):
            parts.append(ds.to_iterable_dataset() if streaming else ds)
        else:
            raise DataError(f"mixture source #{i} is a {type(ds).__name__}, not a Dataset")
    columns = [p.column_names for p in parts]
    if any(c is not None and c != columns[0] for c in columns):
        shown = "; ".join(f"#{i}: {c}" for i, c in enumerate(columns))
        raise DataError(
            f"mixture sources have different columns ({shown}); canonicalize each source first "
            "(tscale.data.introspect.canonicalize) so they share one schema"
        )
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.interleave_datasets(
            parts, probabilities=probs, seed=seed, stopping_strategy="all_exhausted"
        )
    except ValueError as e:  # features that cannot be aligned
        raise DataError(
            f"mixture sources cannot be interleaved ({e}); canonicalize each source first so "
            "they share one schema"
        ) from e


# --------------------------------------------------------------------------------------------
# Fingerprint and cache
# --------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> dict[str, Any]:
    """Size, mtime and a hash of the first and last MiB: fast for big files."""
    try:
        st = path.stat()
        h = hashlib.sha256()
        with path.open("rb") as f:
            h.update(f.read(_MIB))
            if st.st_size > _MIB:
                f.seek(max(_MIB, st.st_size - _MIB))
                h.update(f.read(_MIB))
    except OSError as e:
        raise DataError(f"cannot fingerprint {path}: {e}") from e
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail": h.hexdigest()}  # fmt: skip


def fingerprint(spec_parts: Mapping[str, Any], files: Sequence[str | os.PathLike]) -> str:
    """A sha256 hex digest of a processing config and its input files.

    ``spec_parts`` (what the processing depends on: template, lengths, tokenizer hash …) is
    JSON-dumped with sorted keys; each file adds its path, size, mtime and a hash of its first and
    last MiB, so a changed file gives a new fingerprint without reading it whole.
    """
    try:
        config = json.dumps(spec_parts, sort_keys=True, default=str)
    except (TypeError, ValueError) as e:
        raise DataError(f"fingerprint: spec_parts is not JSON-able ({e})") from e
    h = hashlib.sha256(config.encode("utf-8"))
    for f in files:
        h.update(json.dumps(_file_digest(Path(f)), sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _slug(desc: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", desc).strip("-")[:40] or "map"


def cached_map(
    dataset: datasets.Dataset,
    fn: Callable[[dict], dict],
    *,
    cache_dir: str | os.PathLike,
    fingerprint: str,
    desc: str,
    remove_columns: Sequence[str] | None = None,
) -> datasets.Dataset:
    """``dataset.map(fn)``, stored under ``cache_dir/<desc>-<fingerprint>``; a hit skips ``fn``.

    The result is written by ``map(cache_file_name=...)`` to a temporary name, renamed, then
    marked complete (``done.json``), so an interrupted run never leaves a cache that is read back.

    Args:
        fingerprint: from :func:`fingerprint`; it must change whenever ``fn``'s inputs or
            behaviour do (put the config that drives ``fn`` in its ``spec_parts``).
        desc: a short name for logs and the cache directory.
        remove_columns: columns to drop from the output (e.g. all the source columns).

    Raises:
        DataError: an iterable (streaming) dataset, or a fingerprint that is not a hex digest.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"cached_map needs a map-style Dataset, got {type(dataset).__name__}; streaming "
            "data is processed on the fly and not cached"
        )
    if not re.fullmatch(r"[0-9a-f]{16,64}", fingerprint):
        raise DataError(f"fingerprint {fingerprint!r} is not a hex digest; use fingerprint()")
    folder = Path(cache_dir) / f"{_slug(desc)}-{fingerprint[:32]}"
    data, done = folder / "data.arrow", folder / "done.json"
    if done.is_file() and data.is_file():
        return datasets.Dataset.from_file(os.fspath(data))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"data.{os.getpid()}.tmp.arrow"
    with quiet_datasets():
        dataset.map(
            fn,
            cache_file_name=os.fspath(tmp),
            load_from_cache_file=False,
            new_fingerprint=fingerprint[:64],
            remove_columns=list(remove_columns) if remove_columns is not None else None,
            desc=desc,
        )
    os.replace(tmp, data)
    marker = folder / f"done.{os.getpid()}.tmp"
    marker.write_text(json.dumps({"fingerprint": fingerprint, "desc": desc}) + "\n")
    os.replace(marker, done)
    return datasets.Dataset.from_file(os.fspath(data))
