"""Data pipeline: tscale's fit → render → tokenize → pack against TRL's SFT preparation.

Same rows, same tokenizer, same process, one run. The rows are generated alpaca records
(``instruction``, ``input`` (often empty), ``output``) with log-normal word counts (median
rendered sample ~150 tokens, a long tail past ``--max-length`` so some rows must be truncated).
A byte-level BPE (``tscale.data.tokenize.train_tokenizer``, vocab 8192) is trained on the rows;
TRL gets the very same ``tokenizers.Tokenizer`` inside a ``PreTrainedTokenizerFast``.

Methods (each timed once on all rows with ``time.perf_counter``, after a warm-up on 500 rows):

- **tscale**: ``prepare_examples`` (what ``build_data`` runs): every row rendered once (built-in
  ``alpaca``, ``completion_only``), the texts encoded once with ``encode_batch`` in chunks of
  2048, the length budget (``LengthBudget(max_total_length=max_length)``, ``smart`` strategy,
  proportional over the three columns) checked on that encoding, rows over it fitted by
  ``fit_record`` with ``make_sample_counter`` and re-rendered; loss masks from the offsets; BOS +
  EOS → ``pack_examples`` (best-fit decreasing, rows of ``max_length``). ``encode_batch`` uses
  the ``tokenizers`` Rust thread pool (``TOKENIZERS_PARALLELISM`` default): wall time and CPU
  time are both reported.
- **pad-to-longest**: tscale's tokenized examples, unpacked, in a seeded shuffled order, in
  batches of 8 padded to the batch's longest: fill = tokens / (rows × padded length).
- **TRL pack_dataset**: ``trl.data_utils.pack_dataset(ds, max_length, strategy="bfd")`` on
  tscale's tokenized examples (the same token lists): fill = tokens / (packs × max_length).
- **TRL SFT preparation**: ``SFTTrainer._prepare_dataset`` itself (the method ``SFTTrainer``
  calls from ``__init__``), called unbound on a stub that carries the three attributes it reads
  (``_tokenizer``, ``chat_template``, ``completion_only_loss``), so no model is loaded. TRL has no
  alpaca formatter: the records are first turned into ``prompt``/``completion`` with the
  Stanford Alpaca prompt (a ``Dataset.map``, timed, the text checked equal to tscale's render),
  then ``_prepare_dataset`` adds EOS, tokenizes prompt and prompt+completion, builds
  completion-only labels and packs with BFD, truncating over-long sequences at ``max_length``
  (TRL's truncation when packing). ``dataset_num_proc=None``: one process, as tscale.

Writes ``benchmarks/results/data_pipeline.json`` and prints one summary line. When tscale misses
its time bar, a cProfile of the tscale pipeline on ``--profile-rows`` rows is added to the JSON.

Usage: python benchmarks/data_pipeline.py [--rows 50000] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import logging
import os
import platform
import pstats
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import add_smoke_flag, parse_args

import tscale
from tscale.core.result import Ok
from tscale.data.length import LengthBudget
from tscale.data.pack import pack_examples
from tscale.data.prepare import prepare_examples
from tscale.data.prompt import get_template, render
from tscale.data.tokenize import Encoder, train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "data_pipeline.json"
COLUMNS = ("instruction", "input", "output")
FILL_BAR = 0.98
TIME_BAR = 0.67
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {"rows": 200, "max_length": 256, "vocab": 512, "warmup_rows": 20, "profile_rows": 40}

# Stanford Alpaca's PROMPT_DICT (what tscale's built-in ``alpaca`` template renders).
_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# ------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an"]
    words = set()
    while len(words) < size:
        k = int(rng.integers(1, 5))
        words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), k)))
    return sorted(words)


def _text(rng: np.random.Generator, vocab: list[str], probs: np.ndarray, n_words: int) -> str:
    """``n_words`` Zipf-distributed words in sentences of 4-24 words, paragraphs now and then."""
    idx = rng.choice(len(vocab), size=n_words, p=probs)
    out: list[str] = []
    i = 0
    while i < n_words:
        k = int(rng.integers(4, 25))
        words = [vocab[j] for j in idx[i : i + k]]
        words[0] = words[0].capitalize()
        if len(words) > 6 and rng.random() < 0.3:
            words[len(words) // 2] += ","
        end = "?" if rng.random() < 0.1 else "."
        out.append(" ".join(words) + end)
        out.append("\n\n" if rng.random() < 0.15 else " ")
        i += k
    return "".join(out[:-1]) if out else ""


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` alpaca rows with log-normal word counts (input empty for 60% of rows)."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 20000)
    ranks = np.arange(1, len(vocab) + 1)
    probs = 1.0 / ranks**1.07
    probs /= probs.sum()
    rows = []
    for _ in range(n):
        n_ins = max(3, int(rng.lognormal(np.log(14), 0.5)))
        n_inp = 0 if rng.random() < 0.6 else max(2, int(rng.lognormal(np.log(30), 1.0)))
        n_out = max(1, int(rng.lognormal(np.log(55), 1.05)))
        rows.append(
            {
                "instruction": _text(rng, vocab, probs, n_ins),
                "input": _text(rng, vocab, probs, n_inp),
                "output": _text(rng, vocab, probs, n_out),
            }
        )
    return rows


def alpaca_prompt(row: dict[str, str]) -> str:
    return (_WITH_INPUT if row.get("input") else _NO_INPUT).format(**row)


# ------------------------------------------------------------------------------------------
# tscale
# ------------------------------------------------------------------------------------------


def tscale_prepare(rows: list[dict], encoder: Encoder, max_length: int) -> dict[str, Any]:
    """prepare_examples (fit → render → tokenize, batched) then pack_examples; stage times."""
    template = get_template("alpaca")
    budget = LengthBudget(max_total_length=max_length, strategy="smart")
    clock = time.perf_counter
    c0, t0 = time.process_time(), clock()
    results, length_report = prepare_examples(
        rows,
        template,
        encoder,
        add_bos=True,
        add_eos=True,
        loss_mode="completion_only",
        max_length=max_length,
        budget=budget,
        where=[f"row {i}" for i in range(len(rows))],
    )
    examples: list[dict] = []
    errors: dict[str, int] = {}
    for res in results:
        if isinstance(res, Ok):
            examples.append(res.value)
        else:
            key = res.reason.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    t1 = clock()
    packs, report = pack_examples(examples, max_length)
    t2 = clock()
    return {
        "examples": examples,
        "packs": packs,
        "report": report,
        "length_report": length_report,
        "errors": errors,
        "truncated_rows": length_report.truncated_records,
        "per_row_s": t1 - t0,
        "stages_s": {"fit_render_tokenize": t1 - t0, "pack": t2 - t1},
        "pack_s": t2 - t1,
        "total_s": t2 - t0,
        "cpu_s": time.process_time() - c0,
    }


def pad_to_longest_fill(examples: list[dict], batch_size: int, seed: int) -> float:
    lengths = [len(e["input_ids"]) for e in examples]
    random.Random(seed).shuffle(lengths)
    tokens = slots = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i : i + batch_size]
        tokens += sum(batch)
        slots += len(batch) * max(batch)
    return tokens / slots


# ------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------


def hf_tokenizer(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def trl_pack_fill(examples: list[dict], max_length: int, **map_kwargs: Any) -> dict[str, Any]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    )
    t0 = time.perf_counter()
    packed = pack_dataset(ds, max_length, strategy="bfd", map_kwargs=map_kwargs or None)
    seconds = time.perf_counter() - t0
    lengths = [len(x) for x in packed["input_ids"]]
    return {
        "fill_rate": sum(lengths) / (len(lengths) * max_length),
        "rows": len(lengths),
        "tokens": sum(lengths),
        "pack_s": seconds,
    }


def trl_prepare(rows: list[dict], hf_tok: Any, max_length: int, out_dir: str) -> dict[str, Any]:
    """alpaca → prompt/completion (Dataset.map) → SFTTrainer._prepare_dataset(packing=True)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=out_dir,
        max_length=max_length,
        packing=True,
        packing_strategy="bfd",
        dataset_num_proc=None,
        report_to=[],
        bf16=False,
        use_cpu=True,  # no model here; TrainingArguments would refuse bf16 without a GPU
    )
    stub = SFTTrainer.__new__(SFTTrainer)  # _prepare_dataset reads only these attributes
    stub._tokenizer = hf_tok
    stub.chat_template = None
    stub.completion_only_loss = True  # what SFTTrainer picks for a prompt/completion dataset
    t0 = time.perf_counter()
    ds = Dataset.from_list(rows)
    c1, t1 = time.process_time(), time.perf_counter()
    ds = ds.map(
        lambda r: {"prompt": alpaca_prompt(r), "completion": r["output"]},
        remove_columns=list(COLUMNS),
    )
    t2 = time.perf_counter()
    packed = SFTTrainer._prepare_dataset(
        stub, ds, hf_tok, args, packing=True, formatting_func=None, dataset_name="train"
    )
    t3, c3 = time.perf_counter(), time.process_time()
    lengths = [len(x) for x in packed["input_ids"]]
    return {
        "fill_rate": sum(lengths) / (len(lengths) * max_length),
        "rows": len(lengths),
        "tokens": sum(lengths),
        "from_list_s": t1 - t0,
        "format_s": t2 - t1,
        "prepare_dataset_s": t3 - t2,
        "total_s": t3 - t1,
        "cpu_s": c3 - c1,
    }


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def _percentiles(values: list[int]) -> dict[str, float]:
    a = np.asarray(values)
    out = {f"p{q}": float(np.percentile(a, q)) for q in (1, 10, 25, 50, 75, 90, 99, 99.9)}
    out.update(min=int(a.min()), max=int(a.max()), mean=float(a.mean()))
    return out


def _profile(rows: list[dict], encoder: Encoder, max_length: int, top: int) -> dict[str, Any]:
    prof = cProfile.Profile()
    prof.enable()
    tscale_prepare(rows, encoder, max_length)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = stats.total_tt  # type: ignore[attr-defined]  # set by Stats
    entries = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append(
            {
                "function": func,
                "where": f"{file.split('site-packages/')[-1].split('/work/main/')[-1]}:{line}",
                "calls": ncalls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
                "tottime_share": round(tottime / total, 3) if total else 0.0,
                "cumtime_share": round(cumtime / total, 3) if total else 0.0,
            }
        )
    encode_calls = sum(
        e["calls"]
        for e in entries
        if e["function"] == "<method 'encode' of 'tokenizers.Tokenizer' objects>"
    )
    tscale_fns = sorted(
        (e for e in entries if e["where"].startswith("tscale/")), key=lambda e: -e["cumtime_s"]
    )
    by_tottime = sorted(entries, key=lambda e: -e["tottime_s"])[:top]
    hot = [
        f"{e['function']} ({e['where']}): {e[k]:.2f}s {kind} = {e[k] / total:.0%} of the profile"
        for e, k, kind in [(e, "cumtime_s", "cumulative") for e in tscale_fns[:8]]
        + [(e, "tottime_s", "own") for e in by_tottime[:4]]
    ]
    return {
        "hot_spots": hot,
        "rows": len(rows),
        "profiled_s": round(total, 3),
        "tokenizer_encode_calls_per_row": encode_calls / len(rows),
        "top_by_tottime": by_tottime,
        "tscale_by_cumtime": tscale_fns[:top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--warmup-rows", type=int, default=500)
    ap.add_argument("--profile-rows", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    L = args.max_length
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel probe, via trl

    import datasets
    import tokenizers
    import transformers
    import trl

    datasets.disable_progress_bars()
    datasets.disable_caching()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)

    t = time.perf_counter()
    rows = make_rows(args.rows, args.seed)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    # Trained on the rendered samples, as a real tokenizer knows the template's English.
    texts = [alpaca_prompt(r) + r["output"] for r in rows]
    tok = train_tokenizer(texts, args.vocab)
    tok_s = time.perf_counter() - t
    encoder = Encoder.from_tokenizer(tok)
    hf_tok = hf_tokenizer(tok)

    # Same text for both: TRL's prompt + completion is exactly tscale's alpaca render.
    for r in rows[: min(200, len(rows))]:
        got = render(r, "alpaca", loss_mode="completion_only")
        assert isinstance(got, Ok) and got.value.text == alpaca_prompt(r) + r["output"], r
    # Length of every untruncated sample: BOS + rendered text + EOS.
    raw_lengths = [len(e.ids) + 2 for e in tok.encode_batch(texts, add_special_tokens=False)]
    over = sum(n > L for n in raw_lengths)
    checked = min(200, len(rows))

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up (imports, jinja compile, datasets/arrow paths), untimed in the results.
        warm = rows[: args.warmup_rows]
        tscale_prepare(warm, encoder, L)
        trl_prepare(warm, hf_tok, L, tmp)
        trl_pack_fill(tscale_prepare(warm, encoder, L)["examples"], L)

        ts = tscale_prepare(rows, encoder, L)
        tr = trl_prepare(rows, hf_tok, L, tmp)
        same = trl_pack_fill(ts["examples"], L)
        same_global = trl_pack_fill(ts["examples"], L, batch_size=None)
    load_after = os.getloadavg()

    rep = ts["report"]
    examples = ts["examples"]
    pad_fill = pad_to_longest_fill(examples, 8, args.seed)
    ratio = ts["total_s"] / tr["total_s"]
    bars = {
        f"tscale_fill_rate>={FILL_BAR}": rep.fill_rate >= FILL_BAR,
        f"tscale_time<={TIME_BAR}x_trl": ratio <= TIME_BAR,
    }
    profile = None
    if not bars[f"tscale_time<={TIME_BAR}x_trl"]:
        profile = {
            "note": "cProfile of tscale_prepare (fit → render → tokenize → pack) on the first "
            "rows; times are inflated by the profiler, shares are what matter",
            **_profile(rows[: args.profile_rows], encoder, L, top=15),
        }

    result = {
        "benchmark": "data_pipeline",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}), "
        f"{os.cpu_count()} cores visible (shared), single process",
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "versions": {
            "python": platform.python_version(),
            "tscale": getattr(tscale, "__version__", "unknown"),
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "rows": len(rows),
        "max_length": L,
        "tokenizer": {
            "kind": "tscale byte-level BPE",
            "vocab_size": encoder.vocab_size,
            "train_s": tok_s,
        },
        "generate_rows_s": gen_s,
        "sample_tokens_untruncated": _percentiles(raw_lengths),
        "rows_over_max_length": over,
        "same_text_checked_rows": checked,
        "tscale": {
            "fill_rate": rep.fill_rate,
            "packed_rows": rep.sequences,
            "documents": rep.documents,
            "tokens": rep.tokens,
            "trained_tokens": rep.trained_tokens,
            "truncated_records": ts["truncated_rows"],
            "errors": ts["errors"],
            "time_s": ts["total_s"],
            "cpu_s": ts["cpu_s"],
            "stages_s": ts["stages_s"],
            "pack_s": ts["pack_s"],
            "rows_per_s": len(rows) / ts["total_s"],
            "timed": "prepare_examples over all rows (render once with alpaca/completion_only, "
            "encode_batch in chunks of 2048 with offsets, LengthBudget(max_total_length="
            "max_length, smart, proportional) checked on that encoding and rows over it fitted "
            "by fit_record + make_sample_counter, loss masks from offsets, BOS + EOS, "
            "max_length); then pack_examples(max_length) over all examples. encode_batch runs "
            "on the tokenizers thread pool: cpu_s counts all threads",
        },
        "pad_to_longest": {
            "fill_rate": pad_fill,
            "batch_size": 8,
            "order": "seeded shuffle of tscale's tokenized examples (unpacked)",
            "padded_rows": len(examples),
        },
        "trl_pack_dataset_same_examples": {
            **same,
            "timed": "trl.data_utils.pack_dataset(strategy='bfd') on tscale's tokenized examples "
            "(Dataset.map batched, default batch_size 1000: BFD runs per 1000 examples)",
        },
        "trl_pack_dataset_same_examples_one_batch": {
            **same_global,
            "timed": "as above with map_kwargs batch_size=None (one BFD over all examples; not "
            "what SFTTrainer does)",
        },
        "trl_sft": {
            "fill_rate": tr["fill_rate"],
            "packed_rows": tr["rows"],
            "tokens": tr["tokens"],
            "time_s": tr["total_s"],
            "format_s": tr["format_s"],
            "prepare_dataset_s": tr["prepare_dataset_s"],
            "cpu_s": tr["cpu_s"],
            "dataset_from_list_s_not_counted": tr["from_list_s"],
            "rows_per_s": len(rows) / tr["total_s"],
            "timed": "Dataset.map alpaca -> prompt/completion (Stanford Alpaca prompt, same text "
            "as tscale's render) + SFTTrainer._prepare_dataset(packing=True, strategy bfd, "
            "max_length, dataset_num_proc=None, completion_only_loss=True): add EOS, tokenize "
            "prompt and prompt+completion, completion-only labels, select columns, pack_dataset "
            "bfd (over-long sequences truncated at max_length, keep start). Dataset.from_list "
            "is reported but not counted. In-memory dataset, datasets caching disabled.",
            "differences": "TRL adds EOS only (no BOS: the tokenizer has no post-processor); "
            "TRL truncates by cutting tokens at max_length in the packer, tscale fits text to "
            "the budget at sentence/word boundaries before tokenizing",
        },
        "ratios": {
            "tscale_time_over_trl": ratio,
            "tscale_cpu_time_over_trl": ts["cpu_s"] / tr["cpu_s"],
            "tscale_fill_over_pad_to_longest": rep.fill_rate / pad_fill,
            "tscale_fill_minus_trl_sft_fill": rep.fill_rate - tr["fill_rate"],
        },
        "bars": bars,
        "profile": profile,
    }
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    med = statistics.median(raw_lengths)
    print(
        f"data_pipeline: {len(rows)} rows (median {med:.0f} tok, {over} > {L}): "
        f"tscale fill {rep.fill_rate:.2%} in {ts['total_s']:.1f}s | pad-to-longest "
        f"{pad_fill:.2%} | TRL pack_dataset {same['fill_rate']:.2%} | TRL SFT fill "
        f"{tr['fill_rate']:.2%} in {tr['total_s']:.1f}s | time ratio {ratio:.2f} "
        f"(bar {TIME_BAR}) | bars {'met' if all(bars.values()) else 'NOT met'}: {bars}"
    )


if __name__ == "__main__":
    main()
