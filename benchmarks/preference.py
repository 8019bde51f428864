"""Preference optimisation on the CPU: tscale DPO against TRL's ``DPOTrainer`` (issue 14).

1. **base**: ``configs/quickstart.yaml`` with ``train.max_steps=300 scheduler.warmup_steps=50``
   (deterministic), exported as an HF folder (``tscale export``), cached in the work folder under
   the fingerprint of its resolved config (a second run reuses it; a changed config is a
   miss). Its held-out exact match (overall, reverse, sort) is measured twice: by tscale's
   evaluation, loading the export through ``model.path`` as a fine-tuning run does, and by
   :func:`evaluate_policy` (``transformers`` greedy decoding), which also scores every policy
   below, so that the figures compare.
2. **pairs**: the quickstart's problems (its tasks, item bounds and seed; the held-out set is
   its held-out set) as preference pairs: chosen the correct answer, rejected the answer with one
   corrupted item (``tscale.data.synthetic.preference_records``), written as JSONL; both
   frameworks train on the same file.
3. **TRL**: ``DPOTrainer`` on the exported folder, the reference a frozen copy of it (TRL's
   default), sigmoid loss, β 0.1, AdamW (lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay,
   clipping at 1.0, linear decay, no warmup), batch 16, one epoch, fp32, CPU, 2 threads, one
   whole process per seed (imports, tokenizing, training, saving), timed from outside, its peak
   RSS read from ``wait4`` (this child only). The loss of every step is logged; the first one
   should be ln 2 (policy == reference). Seeds 0, 1, 2 give TRL's own seed-to-seed spread: the
   mean ± 2 std per step, which the tscale curve must stay within.
4. **tscale**: ``tscale train`` with a DPO config (:func:`tscale_dpo_config`) on the same folder,
   pairs, geometry and optimizer (16 pairs per step), the reference a frozen copy run every
   step as TRL's (not precomputed), no end-of-run plot (``log.plot: false``: TRL draws none),
   with the prompt shared by both completions (``task.share_prompt: true``) and plain padded
   pairs (false).
5. **after training**, for every run: held-out pairwise accuracy of the implicit reward
   (β·(log π − log π_ref) of chosen vs rejected), its mean margin, and greedy exact match.

Writes ``benchmarks/results/preference.json``; ``--smoke`` runs the same path at tiny sizes
(the work folder beside ``--out``).

Usage: python benchmarks/preference.py [--pairs 2000] [--seeds 3] [--sides trl,tscale]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag, parse_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "preference.json"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
WORK = ROOT / "runs" / "bench-preference"
TRL_VERSION = "1.16.0"
BASE_OVERRIDES = ("train.max_steps=300", "scheduler.warmup_steps=50")
BATCH = 16
BETA = 0.1
LR = 5e-5
BAR_TIME_RATIO = 0.5  # tscale / TRL wall time with shared-prompt packing
NOTE = (
    "timings from a shared 2-core machine (other sessions' jobs running; load averages under "
    "machine): indicative only, the seeds' spread is mostly load; compare tscale and TRL from "
    "one run of this script, never across runs"
)
# --smoke: the same code path at tiny sizes, unless given explicitly (work folder beside --out)
SMOKE = {
    "base_steps": 3,
    "base_warmup": 1,
    "pairs": 32,
    "eval_pairs": 8,
    "seeds": 1,
    "threads": 1,
    "max_new_tokens": 4,
}

# --------------------------------------------------------------------------------------------
# Processes: timed from outside, peak RSS of the child itself
# --------------------------------------------------------------------------------------------


def timed_process(cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` to the end; its wall seconds and peak RSS in MiB (``wait4``: this child).

    Raises:
        SystemExit: the process failed (the message names its log).
    """
    usage = process_usage(cmd, env, log)
    return usage["wall_s"], usage["peak_rss_mib"]


def process_usage(cmd: Sequence[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` to the end: ``wall_s``, ``cpu_s`` (user + system seconds) and
    ``peak_rss_mib`` of the child itself (``wait4``). On a machine other jobs load, the CPU
    seconds of a one-thread process stay close to its wall time on a free machine.

    Raises:
        SystemExit: the process failed (the message names its log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} … failed ({proc.returncode}); see {log}")
    return {
        "wall_s": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
    }


# --------------------------------------------------------------------------------------------
# 1. The base: the quickstart stopped early, exported, cached by config fingerprint
# --------------------------------------------------------------------------------------------


def base_overrides(steps: int, warmup: int, threads: int, extra: Sequence[str]) -> list[str]:
    """The quickstart overrides of the base run (output folder aside)."""
    return [
        f"train.max_steps={steps}",
        f"scheduler.warmup_steps={warmup}",
        f"run.threads={threads}",
        "train.save_every=0",
        "train.eval_every=0",
        "train.progress=false",
        *extra,
    ]


def config_fingerprint(cfg: Any) -> str:
    """sha256 of the resolved config, its output folder left out (where it runs is no input)."""
    from tscale.config import to_dict

    data = to_dict(cfg)
    data["run"].pop("output_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def base_model(
    work: Path, *, steps: int, warmup: int, threads: int, extra: Sequence[str] = ()
) -> tuple[Path, dict[str, Any]]:
    """The exported base and what it measured: trained and exported once per config fingerprint
    (``work/base-<fp>/export``), then read back from the cache."""
    from rich.console import Console

    from tscale.config import load_config
    from tscale.train import train
    from tscale.train.export import export

    overrides = base_overrides(steps, warmup, threads, extra)
    cfg = load_config(QUICKSTART, overrides)
    fp = config_fingerprint(cfg)
    folder = work / f"base-{fp[:16]}"
    export_dir, info_file = folder / "export", folder / "base.json"
    if info_file.is_file() and (export_dir / "config.json").is_file():
        return export_dir, {**json.loads(info_file.read_text()), "cached": True}
    run_dir = folder / "run"
    cfg = load_config(QUICKSTART, [*overrides, f"run.output_dir={run_dir}"])
    t0 = time.perf_counter()
    result = train(cfg, overwrite=True, console=Console(quiet=True))
    export(run_dir, export_dir)
    s = result.summary
    info = {
        "config": "configs/quickstart.yaml",
        "overrides": overrides,
        "fingerprint": fp,
        "steps": steps,
        "exact_match_at_end_of_training": s["eval"]["exact_match"],
        "train_time_s": s["train_time_s"],
        "wall_s": time.perf_counter() - t0,
        "tscale_eval": tscale_eval_of_export(export_dir, extra, threads, folder / "eval"),
    }
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return export_dir, {**info, "cached": False}


def tscale_eval_of_export(
    export_dir: Path, extra: Sequence[str], threads: int, run_dir: Path
) -> dict[str, Any]:
    """Held-out exact match of the export by tscale's evaluation, the export loaded through
    ``model.path`` (the quickstart's data, its tokenizer the export's)."""
    import torch

    from tscale.config import load_config
    from tscale.core import rng as R
    from tscale.train import builders, data_build
    from tscale.train.trainer import evaluate

    raw = yaml.safe_load(QUICKSTART.read_text())
    raw.pop("model")  # the export's config.json sets the architecture
    raw["model"] = {"path": str(export_dir)}
    raw["data"]["tokenizer"] = {"path": str(export_dir / "tokenizer.json")}
    raw["run"].update(output_dir=str(run_dir), threads=threads)
    path = run_dir.parent / "eval-config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path, list(extra))
    torch.set_num_threads(threads)
    bundle = data_build.build_data(cfg, run_dir)
    model, params = builders.build_model(cfg, bundle.encoder.vocab_size, R.key(0))
    metrics, _ = evaluate(
        model.apply,
        params,
        bundle,
        num_samples=cfg.eval.num_samples,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        device=torch.device("cpu"),
    )
    return {
        "exact_match": metrics["exact_match"],
        "by_task": {k.split("/")[1]: v for k, v in metrics.items() if "/" in k},
        "eval_loss": metrics["loss"],
    }


# --------------------------------------------------------------------------------------------
# 2. The pairs
# --------------------------------------------------------------------------------------------


def make_pairs(
    work: Path, *, num_pairs: int, num_eval: int, extra: Sequence[str] = ()
) -> tuple[Path, Path, dict[str, Any]]:
    """Train and held-out preference pairs from the quickstart's problems (its tasks, item
    bounds and seed: the held-out prompts are the base's held-out set), as JSONL."""
    from tscale.config import load_config
    from tscale.data import synthetic

    cfg = load_config(QUICKSTART, list(extra))
    s, seed = cfg.data.synthetic, cfg.run.seed
    train, held_out = synthetic.make_splits(
        list(s.tasks), num_pairs, num_eval, seed, s.min_items, s.max_items
    )
    train_file = synthetic.write_jsonl(
        synthetic.preference_records(train, seed=seed), work / "pairs-train.jsonl"
    )
    eval_file = synthetic.write_jsonl(
        synthetic.preference_records(held_out, seed=seed), work / "pairs-eval.jsonl"
    )
    info = {
        "source": "tscale.data.synthetic.make_splits + preference_records",
        "tasks": list(s.tasks),
        "min_items": s.min_items,
        "max_items": s.max_items,
        "seed": seed,
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
        "rejected": "the correct answer with one item changed or an adjacent pair swapped",
        "example": synthetic.preference_records(train[:1], seed=seed)[0] if train else None,
    }
    return train_file, eval_file, info


# --------------------------------------------------------------------------------------------
# 3. TRL
# --------------------------------------------------------------------------------------------

# The TRL run: a whole process, as a user's script would be.
TRL_WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
ds = load_dataset("json", data_files=args["data"], split="train")
ds = ds.select_columns(["prompt", "chosen", "rejected"])
tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
config = DPOConfig(output_dir=args["out"], **args["settings"])
trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
t_train = time.perf_counter()
out = trainer.train()
t_end = time.perf_counter()
trainer.save_model(args["save"])
log = [h for h in trainer.state.log_history if "loss" in h]
json.dump(
    {
        "steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "in_process_s": t_end - t0,
        "train_s": t_end - t_train,
        "log": log,
    },
    open(args["result"], "w"),
)
"""

# Settings of every TRL run that are not DPOConfig's defaults (the rest are TRL's defaults:
# sigmoid loss, a frozen copy of the model as reference, linear decay, no warmup, weight decay 0,
# betas 0.9/0.999, eps 1e-8, clipping at 1.0, max_length 1024, no truncation here).
TRL_COMMON: dict[str, Any] = {
    "use_cpu": True,
    "bf16": False,  # fp32
    "gradient_checkpointing": False,  # DPOConfig's default is on; off for both
    "num_train_epochs": 1,
    "per_device_train_batch_size": BATCH,
    "learning_rate": LR,
    "beta": BETA,
    "optim": "adamw_torch",
    "logging_steps": 1,  # the loss of every step
    "save_strategy": "no",
    "report_to": [],
    "dataloader_drop_last": False,
}


def run_trl(seed: int, data: Path, model: Path, work: Path, threads: int) -> dict[str, Any]:
    """One TRL DPO process with ``seed``; its record (time, memory, per-step log)."""
    out = work / f"trl-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    worker = work / "trl_dpo_worker.py"
    worker.write_text(TRL_WORKER)
    settings = {**TRL_COMMON, "seed": seed}
    payload = {
        "data": str(data),
        "model": str(model),
        "out": str(out),
        "save": str(out / "final"),
        "result": str(out / "result.json"),
        "threads": threads,
        "settings": settings,
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(worker), json.dumps(payload)]
    seconds, rss = timed_process(cmd, env, out / "log.txt")
    got = json.loads((out / "result.json").read_text())
    log = got.pop("log")
    return {
        "framework": "trl",
        "variant": "defaults",
        "seed": seed,
        "settings": settings,
        "wall_s": seconds,
        "peak_rss_mib": rss,
        **got,
        "first_step_loss": log[0]["loss"] if log else None,
        "loss": [h["loss"] for h in log],
        "metrics": {
            k: [h.get(k) for h in log]
            for k in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
        },
        "final_model": str(out / "final"),
    }


# --------------------------------------------------------------------------------------------
# 4. tscale: the DPO task (task.type: dpo) on the same folder, pairs, geometry and optimizer
# --------------------------------------------------------------------------------------------

REFERENCE_STRATEGY = {
    "trl": "a frozen copy of the model folder, its forward run on every step's batch "
    "(DPOConfig precompute_ref_log_probs false: TRL's default)",
    "tscale": "a frozen copy of the model folder, its forward run on every step's batch "
    "(task.reference auto: copy without LoRA; not precomputed)",
}
"""The reference model of each side: the same strategy, so both pay the same reference forward
per step."""

TSCALE_COMMON: dict[str, Any] = {"log.plot": False}
"""Settings of every tscale run beyond TRL's geometry and optimizer: no end-of-run curves.png
(TRL, with ``report_to: []``, draws and reports nothing either); metrics.jsonl is written as
always, like TRL's log history."""

TSCALE_VARIANTS: dict[str, dict[str, Any]] = {
    "shared_prompt_packed": {"task.share_prompt": True, "data.packing.enabled": False},
    "padded_pairs": {"task.share_prompt": False, "data.packing.enabled": False},
}
"""tscale's variants, both at TRL's geometry (16 pairs per step, one pair per row): the prompt
packed once with both completions after it (the block mask keeps them apart), and plain padded
pairs (each branch the whole prompt + completion). Packing several pairs per row would change
the number of pairs per step, so the loss curves would no longer compare step for step."""


def tscale_dpo_config(
    name: str,
    settings: dict[str, Any],
    *,
    seed: int,
    data: Path,
    model: Path,
    work: Path,
    threads: int,
) -> dict[str, Any]:
    """The YAML of one tscale DPO run: TRL's geometry and optimizer, plus :data:`TSCALE_COMMON`
    and ``settings`` (dotted keys); the reference is a frozen copy of the same folder
    (``task.reference: auto``), as TRL's."""
    cfg: dict[str, Any] = {
        "run": {
            "name": name,
            "output_dir": str(work / f"tscale-{name}-seed{seed}"),
            "seed": seed,
            "threads": threads,
        },
        "model": {"path": str(model)},  # the reference: a frozen copy of the same folder
        # TRL renders prompt/chosen/rejected as plain text (no chat template): so does tscale
        "data": {"train_files": [str(data)], "batch_size": BATCH, "template": "plain"},
        "task": {"type": "dpo", "beta": BETA, "share_prompt": True},
        "optimizer": {
            "type": "adamw",
            "lr": LR,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
        "scheduler": {"type": "linear", "warmup_steps": 0},
        "train": {"epochs": 1, "log_every": 1, "save_every": 0, "progress": False},
        "eval": {"num_samples": 0},
    }
    for key, value in {**TSCALE_COMMON, **settings}.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def run_tscale(
    name: str, seed: int, data: Path, model: Path, work: Path, threads: int
) -> dict[str, Any]:
    """One ``tscale train`` DPO process (then ``tscale export`` for the evaluation, untimed)."""
    cfg = tscale_dpo_config(
        name,
        TSCALE_VARIANTS[name],
        seed=seed,
        data=data,
        model=model,
        work=work,
        threads=threads,
    )
    path = work / f"tscale-{name}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = Path(cfg["run"]["output_dir"])
    exe = Path(sys.executable).with_name("tscale")
    seconds, rss = timed_process(
        [str(exe), "train", str(path), "--overwrite"], dict(os.environ), run_dir.with_suffix(".log")
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "step" in r and "eval/loss" not in r]
    final = run_dir / "export"
    subprocess.run([str(exe), "export", str(run_dir), str(final)], check=True)
    return {
        "framework": "tscale",
        "variant": name,
        "seed": seed,
        "settings": TSCALE_VARIANTS[name],
        "wall_s": seconds,
        "peak_rss_mib": rss,
        "steps": len(steps),
        "first_step_loss": steps[0]["loss"] if steps else None,
        "loss": [r["loss"] for r in steps],
        "metrics": {
            k: [r.get(k) for r in steps]
            for k in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
        },
        "final_model": str(final),
    }


# --------------------------------------------------------------------------------------------
# 5. Evaluation of a policy folder (framework-independent: transformers)
# --------------------------------------------------------------------------------------------


def evaluate_policy(
    policy: Path,
    reference: Path,
    pairs_file: Path,
    *,
    beta: float,
    max_new_tokens: int,
    threads: int,
) -> dict[str, Any]:
    """Held-out pairwise accuracy of the implicit reward β·(log π − log π_ref) (chosen above
    rejected), its mean margin, the mean summed log-probs, and greedy exact match (overall and
    per task) of ``policy`` on the held-out pairs. Texts are tokenized as TRL does (prompt +
    completion + EOS as one string)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(policy)
    pi = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    pairs = [json.loads(x) for x in pairs_file.read_text().splitlines()]

    def logp(model: Any, prompt: str, completion: str) -> float:
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + completion + tok.eos_token)["input_ids"]
        x = torch.tensor([ids])
        logits = model(x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
        return float(lp[len(p) - 1 :].sum())

    wins, margins, lp_c, lp_r = [], [], [], []
    correct: dict[str, list[bool]] = {}
    stop = [tok.eos_token_id]
    with torch.inference_mode():
        for r in pairs:
            c, rj = (logp(pi, r["prompt"], r[k]) for k in ("chosen", "rejected"))
            rc, rr = (logp(ref, r["prompt"], r[k]) for k in ("chosen", "rejected"))
            reward_c, reward_r = beta * (c - rc), beta * (rj - rr)
            wins.append(reward_c > reward_r)
            margins.append(reward_c - reward_r)
            lp_c.append(c)
            lp_r.append(rj)
            x = tok(r["prompt"], return_tensors="pt")
            out = pi.generate(
                **x,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
            correct.setdefault(r["task"], []).append(text.strip() == r["answer"].strip())
    n = max(len(pairs), 1)
    every = [ok for oks in correct.values() for ok in oks]
    return {
        "pairwise_accuracy": sum(wins) / n,
        "margin": sum(margins) / n,
        "logps_chosen": sum(lp_c) / n,
        "logps_rejected": sum(lp_r) / n,
        "exact_match": sum(every) / max(len(every), 1),
        "exact_match_by_task": {t: sum(v) / len(v) for t, v in sorted(correct.items())},
    }


# --------------------------------------------------------------------------------------------
# Curves across seeds
# --------------------------------------------------------------------------------------------


def curve_band(curves: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per step: mean, sample std (0 for one curve) and mean ± 2 std over the seeds' curves
    (cut to the shortest)."""
    steps = min(len(c) for c in curves)
    mean, std = [], []
    for i in range(steps):
        xs = [c[i] for c in curves]
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        mean.append(m)
        std.append(math.sqrt(var))
    return {
        "mean": mean,
        "std": std,
        "low": [m - 2 * s for m, s in zip(mean, std, strict=True)],
        "high": [m + 2 * s for m, s in zip(mean, std, strict=True)],
    }


def within_band(
    curve: Sequence[float], band: dict[str, list[float]], *, atol: float = 1e-5
) -> dict[str, Any]:
    """How much of ``curve`` lies within the band widened by ``atol`` (step by step, over the
    common steps): at step 1 every seed's loss is ln 2, a band of width 0."""
    n = min(len(curve), len(band["mean"]))
    inside = [band["low"][i] - atol <= curve[i] <= band["high"][i] + atol for i in range(n)]
    return {"steps": n, "fraction_inside": sum(inside) / max(n, 1), "all_inside": all(inside)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def summarize(runs: list[dict[str, Any]], base_eval: dict[str, Any]) -> dict[str, Any]:
    """One side's seeds together: time, memory, first-step loss, the loss band, and the
    held-out figures after training (means over the seeds; exact match also as the change from
    the base)."""
    firsts = [r["first_step_loss"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    evals = [r["eval"] for r in runs]
    exact = _mean([e["exact_match"] for e in evals])
    return {
        "seeds": [r["seed"] for r in runs],
        "wall_s": {"mean": _mean(walls), "min": min(walls), "each": walls},
        "peak_rss_mib": {
            "max": max(r["peak_rss_mib"] for r in runs),
            "each": [r["peak_rss_mib"] for r in runs],
        },
        "first_step_loss": {
            "mean": _mean(firsts),
            "each": firsts,
            "ln2": math.log(2),
            "max_abs_diff_from_ln2": max(abs(x - math.log(2)) for x in firsts),
        },
        "final_loss": {"mean": _mean([r["loss"][-1] for r in runs])},
        "loss_band": curve_band([r["loss"] for r in runs]),
        "held_out": {
            "pairwise_accuracy": _mean([e["pairwise_accuracy"] for e in evals]),
            "margin": _mean([e["margin"] for e in evals]),
            "exact_match": exact,
            "exact_match_change_from_base": exact - base_eval["exact_match"],
            "exact_match_by_task": {
                t: _mean([e["exact_match_by_task"][t] for e in evals])
                for t in evals[0]["exact_match_by_task"]
            },
        },
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--base-warmup", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--eval-pairs", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--sides", default="trl,tscale", help="comma list: trl, tscale")
    ap.add_argument("--work", type=Path, default=WORK, help="runs and the cached base")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)

    import torch
    import transformers
    import trl

    if trl.__version__ != TRL_VERSION:
        print(f"note: TRL {trl.__version__} here; the recorded figures used {TRL_VERSION}")
    sides = set(filter(None, args.sides.split(",")))
    extra = list(SMOKE_TRAIN_OVERRIDES) if args.smoke else []
    work = args.out.resolve().parent / "preference-work" if args.smoke else args.work
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    base, base_info = base_model(
        work, steps=args.base_steps, warmup=args.base_warmup, threads=args.threads, extra=extra
    )
    print(
        f"base ({'cached' if base_info['cached'] else 'trained'}): tscale eval exact match "
        f"{base_info['tscale_eval']['exact_match']:.1%} {base_info['tscale_eval']['by_task']}",
        flush=True,
    )
    pairs, eval_pairs, data_info = make_pairs(
        work, num_pairs=args.pairs, num_eval=args.eval_pairs, extra=extra
    )

    def judge(folder: Path) -> dict[str, Any]:
        return evaluate_policy(
            folder,
            base,
            eval_pairs,
            beta=BETA,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )

    base_info["hf_eval"] = judge(base)
    print(f"base (transformers greedy): {base_info['hf_eval']['exact_match']:.1%}", flush=True)

    seeds = list(range(args.seeds))
    result: dict[str, Any] = {
        "benchmark": "preference",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "batch": BATCH,
            "beta": BETA,
            "lr": LR,
            "trl_common": TRL_COMMON,
            "tscale_common": TSCALE_COMMON,
            "tscale_variants": TSCALE_VARIANTS,
            "reference": REFERENCE_STRATEGY,
            "data": data_info,
        },
        "base": base_info,
        "note": NOTE,
    }
    if "trl" in sides:
        runs = []
        for seed in seeds:
            r = run_trl(seed, pairs, base, work, args.threads)
            r["eval"] = judge(Path(r["final_model"]))
            runs.append(r)
            print(
                f"trl seed {seed}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"first loss {r['first_step_loss']:.4f}, held-out pairwise accuracy "
                f"{r['eval']['pairwise_accuracy']:.3f}, exact match {r['eval']['exact_match']:.1%}",
                flush=True,
            )
        result["trl"] = {**summarize(runs, base_info["hf_eval"]), "runs": runs}
    if "tscale" in sides:
        result["tscale"] = {}
        for name in TSCALE_VARIANTS:
            runs = []
            for seed in seeds:
                r = run_tscale(name, seed, pairs, base, work, args.threads)
                r["eval"] = judge(Path(r["final_model"]))
                runs.append(r)
            result["tscale"][name] = {**summarize(runs, base_info["hf_eval"]), "runs": runs}
    trl_side, ts_side = result.get("trl"), result.get("tscale", {})
    if trl_side and "shared_prompt_packed" in ts_side:
        band = trl_side["loss_band"]
        result["comparison"] = {
            name: {
                "time_ratio": v["wall_s"]["mean"] / trl_side["wall_s"]["mean"],
                "memory_ratio": v["peak_rss_mib"]["max"] / trl_side["peak_rss_mib"]["max"],
                "loss_within_trl_band": [within_band(r["loss"], band) for r in v["runs"]],
            }
            for name, v in ts_side.items()
        }
        ratio = result["comparison"]["shared_prompt_packed"]["time_ratio"]
        result["bar_time_ratio"] = BAR_TIME_RATIO
        result["pass"] = ratio <= BAR_TIME_RATIO
    else:
        result["trl_only"] = True  # --sides trl: the figures of the TRL side alone
    result["machine"]["load_avg_after"] = os.getloadavg()
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
