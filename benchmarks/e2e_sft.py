"""End-to-end SFT: ``tscale train`` against TRL's ``SFTTrainer`` on the same model folder and rows.

Both frameworks get the same HF model folder (a Qwen2-style model made with ``transformers`` by
``tscale.testing.hf_folders.make_model_folder``: random weights, a byte-level BPE tokenizer trained
on the rows, ChatML special tokens, no BOS), the same alpaca-style rows as prompt/completion JSON
lines (``benchmarks/data_pipeline.make_rows``: log-normal lengths, the Stanford Alpaca prompt; rows
longer than ``--max-length`` tokens are left out so neither framework truncates), the same max
length, 8 examples per optimizer step, AdamW (lr 2e-5, betas 0.9/0.999, eps 1e-8, no weight decay,
clipping at 1.0, linear decay, no warmup), fp32, activation checkpointing off, the same seed and
threads. Each run is a whole process (``tscale train CFG`` / ``python trl_worker.py``): imports,
data preparation and one epoch of training, timed from the outside with ``time.perf_counter``.

Variants (every setting that is not the framework's default is recorded in the JSON):

- (a) defaults: TRL's ``SFTConfig`` defaults (no packing, padding to the batch's longest, its
  metrics) and tscale's defaults for a ``model.path`` run.
- (b) fastest per epoch: for each framework, the fastest of the settings tried (listed in the
  JSON with their times): TRL's ``padding_free`` and ``packing`` (BFD); tscale's packing, and
  for reference its random batches (``data.group_by_length: false``) and its LM head at every
  position (``loss.trained_positions_only: false``).

Common settings that are not a framework's default: TRL ``use_cpu``, ``bf16: false``,
``gradient_checkpointing: false``, one epoch, batch 8, lr 2e-5, no saving, no reporting, seed 0;
tscale ``data.template: plain`` (TRL does not template prompt/completion strings), batch 8,
the optimizer and schedule above, ``eval.num_samples: 0``. All are in the JSON.

The trained-token count of one epoch (tokens that carry loss: the completions and their EOS) is
read from each run (tscale: the sum of ``tokens`` in metrics.jsonl; TRL: the sum of its
targets in the prepared dataset's ``labels``) and asserted equal, so the frameworks do the same
work (the row count is cut to whole batches of 8; tscale's packed epoch ends with a batch of packs
completed with its first packs, so that run's count is at least the others', recorded).
Writes ``benchmarks/results/e2e_sft.json`` and prints one summary line.

Usage: python benchmarks/e2e_sft.py [--rows 1200] [--max-length 512] [--hidden 192] [--layers 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _smoke import add_smoke_flag, parse_args

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "e2e_sft.json"
TRL_VERSION = "1.16.0"
BAR_DEFAULTS = 0.5
BAR_FASTEST = 0.45
BATCH = 8
LR = 2e-5
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly:
# both frameworks' default variant on a tiny model, the work folder beside --out
SMOKE = {
    "rows": 48,
    "max_length": 256,
    "vocab": 512,
    "hidden": 64,
    "layers": 1,
    "threads": 1,
    "only": "trl:defaults,tscale:defaults",
}

# The TRL run: a whole process, as a user's script would be.
TRL_WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
ds = load_dataset("json", data_files=args["data"], split="train")
tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
config = SFTConfig(output_dir=args["out"], **args["settings"])
trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
prepared = trainer.train_dataset
# TRL folds the completion mask into "labels" (-100 elsewhere); the model shifts them, so the
# first position of a sequence is never a target.
trained = sum(sum(1 for x in labels[1:] if x != -100) for labels in prepared["labels"])
t_train = time.perf_counter()
out = trainer.train()
t_end = time.perf_counter()
json.dump(
    {
        "trained_tokens": int(trained),
        "steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "in_process_s": t_end - t0,
        "train_s": t_end - t_train,
        "prepared_rows": len(prepared),
    },
    open(args["result"], "w"),
)
"""

# Settings every TRL run shares (the comparison's common ground); the rest are TRL's defaults.
TRL_COMMON: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,  # fp32 (TRL asks for it on a CPU without bf16 anyway)
    "gradient_checkpointing": False,  # TRL's default is on; off for both
    "num_train_epochs": 1,
    "per_device_train_batch_size": BATCH,
    "learning_rate": LR,
    "save_strategy": "no",
    "report_to": [],
    "seed": 0,
    "dataloader_drop_last": False,
}


def _make_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The rows (prompt/completion JSONL) and the model folder; rows over the max length out."""
    sys.path.insert(0, str(HERE))
    from data_pipeline import alpaca_prompt, make_rows

    from tscale.testing.hf_folders import make_model_folder, write_jsonl

    rows = [
        {"prompt": alpaca_prompt(r), "completion": r["output"]}
        for r in make_rows(args.rows, seed=args.seed)
    ]
    folder = make_model_folder(
        work / "model",
        "qwen2",
        texts=[r["prompt"] + r["completion"] for r in rows],
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(1024, args.max_length),
        seed=args.seed,
    )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lengths = [
        len(e.ids) + 1  # + EOS
        for e in tok.encode_batch([r["prompt"] + r["completion"] for r in rows])
    ]
    fits = [(r, n) for r, n in zip(rows, lengths, strict=True) if n <= args.max_length]
    fits = fits[: len(fits) // BATCH * BATCH]  # whole batches: no framework drops or repeats
    kept = [r for r, _ in fits]
    kept_lengths = sorted(n for _, n in fits)
    data = write_jsonl(kept, work / "rows.jsonl")
    info = {
        "rows_generated": len(rows),
        "rows": len(kept),
        "rows_left_out": len(rows) - len(kept),
        "why_left_out": "over --max-length tokens, then the last rows to make whole batches of 8",
        "tokens_per_row": {
            "p50": kept_lengths[len(kept_lengths) // 2],
            "p90": kept_lengths[int(len(kept_lengths) * 0.9)],
            "max": kept_lengths[-1],
            "mean": sum(kept_lengths) / len(kept_lengths),
        },
    }
    return data, folder, info


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} … failed ({proc.returncode}); see {log}")
    return seconds


def run_trl(name: str, settings: dict[str, Any], data: Path, model: Path, work: Path, threads: int):
    """One TRL process; returns its record."""
    out = work / f"trl-{name}"
    worker = work / "trl_worker.py"
    worker.write_text(TRL_WORKER)
    result = out / "result.json"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "data": str(data),
        "model": str(model),
        "out": str(out),
        "result": str(result),
        "threads": threads,
        "settings": {**TRL_COMMON, **settings},
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "true"}
    seconds = _timed([sys.executable, str(worker), json.dumps(payload)], env, out / "log.txt")
    got = json.loads(result.read_text())
    return {"framework": "trl", "variant": name, "settings": settings, "wall_s": seconds, **got}


def tscale_config(
    name: str, settings: dict[str, Any], data: Path, model: Path, work: Path, threads: int
) -> dict[str, Any]:
    """The YAML of one tscale run: the common ground plus ``settings`` (dotted keys)."""
    cfg: dict[str, Any] = {
        "run": {
            "name": name,
            "output_dir": str(work / f"tscale-{name}"),
            "seed": 0,
            "threads": threads,
        },
        "model": {"path": str(model)},
        # TRL trains prompt/completion strings as plain text (no chat template): so does tscale
        "data": {"train_files": [str(data)], "batch_size": BATCH, "template": "plain"},
        "optimizer": {
            "type": "adamw",
            "lr": LR,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
        "scheduler": {"type": "linear", "warmup_steps": 0},
        "train": {"epochs": 1, "progress": False},
        "eval": {"num_samples": 0},
    }
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def run_tscale(
    name: str,
    settings: dict[str, Any],
    data: Path,
    model: Path,
    work: Path,
    threads: int,
    max_length: int,
):
    """One ``tscale train`` process; returns its record."""
    cfg = tscale_config(
        name, {"data.max_length": max_length, **settings}, data, model, work, threads
    )
    path = work / f"tscale-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = Path(cfg["run"]["output_dir"])
    exe = Path(sys.executable).with_name("tscale")
    seconds = _timed(
        [str(exe), "train", str(path), "--overwrite"], dict(os.environ), work / f"tscale-{name}.log"
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "tokens" in r]
    return {
        "framework": "tscale",
        "variant": name,
        "settings": settings,
        "wall_s": seconds,
        "trained_tokens": sum(r["tokens"] for r in steps),
        "steps": len(steps),
        "train_loss": sum(r["loss"] for r in steps) / max(len(steps), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma list of variant names to run (smoke runs)")
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)

    import tokenizers
    import torch
    import transformers
    import trl

    import tscale

    if trl.__version__ != TRL_VERSION:
        print(f"note: TRL {trl.__version__} here; the recorded figures used {TRL_VERSION}")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tscale-e2e-"))
    if args.smoke:  # beside --out, not left in the system's temp folder
        work = args.out.resolve().parent / "e2e-sft-work"
        work.mkdir(parents=True, exist_ok=True)
    data, model, data_info = _make_data(args, work)
    L = args.max_length
    trl_variants: dict[str, dict[str, Any]] = {
        "defaults": {"max_length": L},
        "padding_free": {"max_length": None, "padding_free": True},  # rows fit already
        "packing": {"max_length": L, "packing": True},
    }
    tscale_variants: dict[str, dict[str, Any]] = {
        "defaults": {},  # group_by_length, LM head on trained positions only
        "packing": {"data.packing.enabled": True},
        "random_batches": {"data.group_by_length": False},
        "all_positions": {"loss.trained_positions_only": False},
    }
    only = set(filter(None, args.only.split(",")))
    runs: list[dict[str, Any]] = []
    # Interleave the frameworks so that machine load hits both alike.
    names = list(dict.fromkeys([*trl_variants, *tscale_variants]))
    # (TRL's 3 and tscale's 4 variants alternate: defaults, then the others)
    for name in names:
        if name in trl_variants and (not only or f"trl:{name}" in only):
            runs.append(run_trl(name, trl_variants[name], data, model, work, args.threads))
            print(f"trl {name}: {runs[-1]['wall_s']:.1f} s", flush=True)
        if name in tscale_variants and (not only or f"tscale:{name}" in only):
            runs.append(run_tscale(name, tscale_variants[name], data, model, work, args.threads, L))
            print(f"tscale {name}: {runs[-1]['wall_s']:.1f} s", flush=True)
    # Every run trains every row once, so the trained-token counts are equal; except that a
    # tscale epoch of packs ends with a last batch completed with the epoch's first packs
    # (data.drop_last false), which trains those packs' tokens a second time.
    detail = {f"{r['framework']}:{r['variant']}": r["trained_tokens"] for r in runs}
    exact = {r["trained_tokens"] for r in runs if r["variant"] != "packing"}
    packed = [r["trained_tokens"] for r in runs if r["variant"] == "packing"]
    if len(exact) != 1 or any(n < min(exact) for n in packed):
        raise SystemExit(f"trained-token counts differ: {detail}")

    def pick(fw: str, variant: str | None = None) -> dict[str, Any] | None:
        mine = [r for r in runs if r["framework"] == fw]
        if variant is not None:
            mine = [r for r in mine if r["variant"] == variant]
        return min(mine, key=lambda r: r["wall_s"]) if mine else None

    result: dict[str, Any] = {
        "benchmark": "e2e_sft",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "versions": {
            "tscale": tscale.__version__ if hasattr(tscale, "__version__") else "dev",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "setup": {
            **vars(args),
            "out": str(args.out),
            "batch_examples": BATCH,
            "lr": LR,
            "trl_common": TRL_COMMON,
            "data": data_info,
        },
        "runs": runs,
        "trained_tokens": detail,
    }
    if args.smoke:
        result["smoke"] = True
    a_trl, a_ts = pick("trl", "defaults"), pick("tscale", "defaults")
    b_trl, b_ts = pick("trl"), pick("tscale")
    if a_trl and a_ts and b_trl and b_ts:
        result["ratio_defaults"] = a_ts["wall_s"] / a_trl["wall_s"]
        result["ratio_fastest"] = b_ts["wall_s"] / b_trl["wall_s"]
        result["fastest"] = {"trl": b_trl["variant"], "tscale": b_ts["variant"]}
        result["bars"] = {"defaults": BAR_DEFAULTS, "fastest": BAR_FASTEST}
        result["pass"] = (
            result["ratio_defaults"] <= BAR_DEFAULTS and result["ratio_fastest"] <= BAR_FASTEST
        )
        print(
            f"e2e_sft: tscale/TRL wall time per epoch (a) defaults {result['ratio_defaults']:.3f}x "
            f"(bar {BAR_DEFAULTS}), (b) fastest {result['ratio_fastest']:.3f}x "
            f"({b_ts['variant']} vs {b_trl['variant']}, bar {BAR_FASTEST}); "
            f"{runs[0]['trained_tokens']} trained tokens each"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
