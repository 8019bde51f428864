"""Online RL on the CPU: tscale GRPO against TRL's ``GRPOTrainer`` (issue 15).

1. **base**: the weak SFT base of the quickstart (``configs/quickstart.yaml`` with
   ``train.max_steps=300 scheduler.warmup_steps=50``, exported), built and cached by
   ``benchmarks/preference.py``'s :func:`base_model` (``--base DIR`` takes a ready folder).
2. **prompts**: the quickstart's training problems (its tasks, item bounds and seed:
   ``tscale.data.synthetic.make_splits``) as JSONL records ``prompt``, ``completion`` (the
   answer), ``task``; both frameworks read that one file. The folder has no chat template, so
   both render a prompt as plain text: tscale's GRPO example stage (``plain`` template, BOS from
   the tokenizer) and TRL's ``processing_class(text=prompt)``. Every prompt's token ids are
   compared between the two before anything is timed (``prompts.ids_identical``), and the two
   rewards score 1,000 decoded answers identically (``prompts.rewards_identical``).
3. **the runs**: G = 8 completions of 64 prompts per step, ≤ 24 new tokens, T = 1 over the full
   softmax, β = 0 (no reference), loss ``dapo``, ε 0.2, scale_rewards group, one update per
   generation, AdamW (lr 5e-5 constant, betas 0.9/0.999, eps 1e-8, no weight decay, clipping
   1.0), fp32, the exact-match reward (tscale's built-in ``exact_match``; for TRL a plain
   function with TRL's reward signature scoring the same thing, in ``_trl_grpo_worker.py``),
   ``--steps`` optimizer steps, seeds 0..``--seeds``-1, no evaluation and no checkpoint on
   either side. tscale runs ``configs/grpo_quickstart.yaml`` as shipped otherwise (random
   batches, ``task.share_prompt``). Each run is one whole process (imports, data, model,
   training, exit) timed from outside, its peak RSS from ``wait4``; TRL and tscale alternate
   seed by seed so that the machine's load falls on both.
4. **figures**: the time ratio tscale/TRL (mean wall time; the bar is ≤ 0.5) and the ratio of
   CPU seconds (user + system of each process: with ``--threads 1`` on a machine that other
   jobs load, the steadier figure, close to the wall time on a free machine), per-step time
   (tscale: prompt tokens / tokens_per_s of each logged step; TRL: the wall time between step
   ends), the generation share of the step (tscale's ``time/generation_s``; TRL's time inside
   its ``_generate_single_turn``), peak RSS, and the mean reward per step over the seeds with
   its mean ± 2 std band, and on what fraction of steps tscale's mean lies inside TRL's band.

Writes ``benchmarks/results/rl.json``; ``--smoke`` runs the same path at tiny sizes (the work
folder beside ``--out``).

Usage: python benchmarks/rl.py [--steps 40] [--seeds 3] [--threads 1] [--base DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag, parse_args
from preference import base_model, curve_band, process_usage, within_band

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rl.json"
GRPO_CONFIG = ROOT / "configs" / "grpo_quickstart.yaml"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
WORKER = ROOT / "benchmarks" / "_trl_grpo_worker.py"
WORK = ROOT / "runs" / "bench-rl"
TRL_VERSION = "1.16.0"
LR = 5e-5
BAR_TIME_RATIO = 0.5  # tscale / TRL mean wall time
NOTE = (
    "timings from a shared 2-core machine (other sessions' jobs running; load averages under "
    "machine): indicative only; compare tscale and TRL from one run of this script, never "
    "across runs"
)
# --smoke: the same code path at tiny sizes, unless given explicitly (work folder beside --out)
SMOKE = {
    "base_steps": 3,
    "base_warmup": 1,
    "steps": 2,
    "prompts": 4,
    "generations": 2,
    "max_completion_length": 4,
    "num_train": 64,
    "seeds": 1,
    "threads": 1,
}

# --------------------------------------------------------------------------------------------
# Prompts: one JSONL file both frameworks read, token ids checked identical
# --------------------------------------------------------------------------------------------


def prompts_file(work: Path, *, num_train: int, extra: Sequence[str]) -> tuple[Path, dict]:
    """The quickstart's training problems as ``prompt``/``completion``/``task`` records."""
    from tscale.config import load_config
    from tscale.data import synthetic

    cfg = load_config(QUICKSTART, list(extra))
    s, seed = cfg.data.synthetic, cfg.run.seed
    train, _ = synthetic.make_splits(list(s.tasks), num_train, s.num_eval, seed, *_bounds(s))
    path = synthetic.write_jsonl(
        ({k: r[k] for k in ("prompt", "completion", "task")} for r in train),
        work / "prompts.jsonl",
    )
    info = {
        "source": "tscale.data.synthetic.make_splits (the quickstart's tasks, bounds and seed)",
        "tasks": list(s.tasks),
        "records": len(train),
        "seed": seed,
        "example": dict(train[0]) if train else None,
    }
    return path, info


def _bounds(s: Any) -> tuple[int, int]:
    return s.min_items, s.max_items


def check_prompt_ids(cfg_path: Path, model: Path, work: Path) -> dict[str, Any]:
    """Every prompt's ids from tscale's GRPO example stage against TRL's tokenization of the
    same string (``processing_class(text=prompts)``, as ``GRPOTrainer._tokenize_prompts`` does
    for a plain prompt dataset)."""
    from transformers import AutoTokenizer

    from tscale.config import load_config
    from tscale.train import data_build

    cfg = load_config(cfg_path, [f"run.output_dir={work / 'prompt-check'}"])
    bundle = data_build.build_data(cfg, work / "prompt-check", make_examples=cfg.task.examples)
    tscale_ids = {ex["columns"]["prompt"]: list(ex["input_ids"]) for ex in bundle.train_examples}
    prompts = list(tscale_ids)
    tok = AutoTokenizer.from_pretrained(model)
    hf_ids = tok(text=prompts)["input_ids"]
    differ = [p for p, ids in zip(prompts, hf_ids, strict=True) if list(ids) != tscale_ids[p]]
    return {
        **check_rewards(bundle, tok),
        "checked": len(prompts),
        "ids_identical": not differ,
        "differing": len(differ),
        "first_differing": differ[:3],
        "example_ids": tscale_ids[prompts[0]] if prompts else None,
        "bos_added_by_tokenizer": bool(prompts) and hf_ids[0][:1] == [tok.bos_token_id],
    }


def checked_prompts(
    args: argparse.Namespace, base: Path, work: Path, extra: Sequence[str]
) -> tuple[Path, dict[str, Any]]:
    """The prompt file and its record, after checking that both frameworks tokenize every
    prompt alike and score answers alike (exits otherwise)."""
    data, data_info = prompts_file(work, num_train=args.num_train, extra=extra)
    check_cfg = work / "prompt-check.yaml"
    check_cfg.write_text(yaml.safe_dump(tscale_config(args, 0, data, base, work / "unused")))
    data_info.update(check_prompt_ids(check_cfg, base, work))
    if not (data_info["ids_identical"] and data_info["rewards_identical"]):
        raise SystemExit(f"prompt ids or rewards differ between tscale and TRL: {data_info}")
    return data, data_info


def check_rewards(bundle: Any, tok: Any, limit: int = 500) -> dict[str, Any]:
    """The two exact-match rewards score the same: for the first ``limit`` records, each
    answer's ids with EOS after them, and the same with the last item dropped, decoded as each
    framework decodes a completion (tscale's encoder; TRL's ``batch_decode(...,
    skip_special_tokens=True)``) and scored by each side's function against the record."""
    from _trl_grpo_worker import exact_match as trl_exact_match

    from tscale.rewards.builtin import exact_match

    records = [ex["columns"] for ex in bundle.train_examples[:limit]]
    answers = [str(r["completion"]) for r in records]
    cut = [" ".join(a.split()[:-1]) for a in answers]
    eos = [tok.eos_token_id]
    ids = [tok(a, add_special_tokens=False)["input_ids"] + eos for a in [*answers, *cut]]
    ts_text = [bundle.encoder.decode(x) for x in ids]
    hf_text = tok.batch_decode(ids, skip_special_tokens=True)
    refs = [*answers, *answers]
    columns = {"completion": refs}
    ts = exact_match([""] * len(ids), ts_text, ids, **columns)
    hf = trl_exact_match([""] * len(ids), hf_text, ids, answer=refs)
    return {
        "reward_checked": len(ids),
        "reward_texts_identical": ts_text == hf_text,
        "rewards_identical": ts == hf,
        "reward_mean": sum(x for x in ts if x is not None) / max(len(ts), 1),  # 0.5: half right
    }


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


def trl_settings(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """GRPOConfig's settings of one run (TRL's defaults otherwise: ε 0.2, scale_rewards group,
    one iteration per generation, top_k 0, top_p 1, no mask on truncated completions)."""
    return {
        "use_cpu": True,
        "bf16": False,  # fp32
        "gradient_checkpointing": False,
        "per_device_train_batch_size": args.prompts * args.generations,  # completions per step
        "num_generations": args.generations,
        "max_completion_length": args.max_completion_length,
        "temperature": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_steps": args.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
    }


def run_trl(
    args: argparse.Namespace, seed: int, data: Path, model: Path, work: Path
) -> dict[str, Any]:
    """One TRL GRPO process; its record (time, memory, per-step figures)."""
    out = work / f"trl-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    settings = trl_settings(args, seed)
    payload = {
        "data": str(data),
        "model": str(model),
        "out": str(out),
        "result": str(out / "result.json"),
        "threads": args.threads,
        "settings": settings,
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(WORKER), json.dumps(payload)]
    usage = process_usage(cmd, env, out / "log.txt")
    got = json.loads((out / "result.json").read_text())
    log = got.pop("log")
    return {
        "framework": "trl",
        "seed": seed,
        **usage,
        "steps": got["steps"],
        "in_process_s": got["in_process_s"],
        "train_s": got["train_s"],
        "step_s": got["step_s"],
        "generation_s": got["generation_s"],
        "reward": [h["reward"] for h in log],
        "metrics": {
            k: [h.get(k) for h in log]
            for k in ("loss", "frac_reward_zero_std", "completions/mean_length", "entropy")
        },
    }


# --------------------------------------------------------------------------------------------
# tscale
# --------------------------------------------------------------------------------------------


def tscale_config(
    args: argparse.Namespace, seed: int, data: Path, model: Path, run_dir: Path
) -> dict[str, Any]:
    """``configs/grpo_quickstart.yaml`` on the benchmark's prompt file, folder and geometry; no
    evaluation, no checkpoint during the run, every step logged."""
    cfg = yaml.safe_load(GRPO_CONFIG.read_text())
    cfg["run"].update(output_dir=str(run_dir), seed=seed, threads=args.threads)
    cfg["model"] = {"path": str(model)}
    data_cfg = cfg["data"]
    data_cfg.pop("synthetic")
    # random batches, as TRL's sampler (grpo's own default too): pinned, not left to defaults
    data_cfg.update(train_files=[str(data)], batch_size=args.prompts, group_by_length=False)
    cfg["optimizer"].update(lr=LR, betas=[0.9, 0.999], eps=1e-8)  # TRL's, whatever the config says
    cfg["train"] = {
        "max_steps": args.steps,
        "log_every": 1,
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
    }
    cfg["eval"] = {"num_samples": 0}
    cfg["task"].update(
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
    )
    return cfg


def run_tscale(
    args: argparse.Namespace, seed: int, data: Path, model: Path, work: Path
) -> dict[str, Any]:
    """One ``tscale train`` GRPO process; its record."""
    run_dir = work / f"tscale-seed{seed}"
    path = work / f"tscale-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(tscale_config(args, seed, data, model, run_dir)))
    exe = Path(sys.executable).with_name("tscale")
    usage = process_usage(
        [str(exe), "train", str(path), "--overwrite"], dict(os.environ), work / f"{path.stem}.log"
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r and "step" in r]
    speed = {
        r["step"]: r["tokens_per_s"]
        for r in map(json.loads, (run_dir / "throughput.jsonl").read_text().splitlines())
    }
    return {
        "framework": "tscale",
        "seed": seed,
        **usage,
        "steps": len(steps),
        # log_every 1: one step per window, its prompt tokens over its tokens/s
        "step_s": [r["input_tokens"] / speed[r["step"]] for r in steps],
        "generation_s": [r["time/generation_s"] for r in steps],
        "reward": [r["reward"] for r in steps],
        "metrics": {
            k: [r.get(k) for r in steps]
            for k in ("loss", "frac_reward_zero_std", "completions/mean_length", "entropy")
        },
        "config": str(path),
    }


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's seeds together: wall time, per-step time (median over every step of every
    seed, the first step of each left out: warm-up), generation share (Σ generation / Σ step
    of each run), peak RSS, and the reward band per step."""
    walls = [r["wall_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    later = [s for r in runs for s in r["step_s"][1:]] or [s for r in runs for s in r["step_s"]]
    shares = [sum(r["generation_s"]) / sum(r["step_s"]) for r in runs]
    band = curve_band([r["reward"] for r in runs])
    tail = max(1, len(band["mean"]) // 4)
    return {
        "seeds": [r["seed"] for r in runs],
        "wall_s": {
            "mean": _mean(walls),
            "median": statistics.median(walls),
            "min": min(walls),
            "each": walls,
        },
        "cpu_s": {"mean": _mean(cpus), "median": statistics.median(cpus), "each": cpus},
        "step_s": {
            "median": statistics.median(later),
            "mean": _mean(later),
            "first_step_each": [r["step_s"][0] for r in runs],
        },
        "generation_share": {"mean": _mean(shares), "each": shares},
        "peak_rss_mib": {
            "max": max(r["peak_rss_mib"] for r in runs),
            "each": [r["peak_rss_mib"] for r in runs],
        },
        "reward_band": band,
        "reward_first_step_mean": band["mean"][0],
        "reward_last_quarter_mean": _mean(band["mean"][-tail:]),
    }


def compare(trl: dict[str, Any], ts: dict[str, Any]) -> dict[str, Any]:
    """tscale over TRL: the time ratios, memory, and tscale's mean reward curve against TRL's
    band (mean ± 2 std over the seeds)."""
    inside = within_band(ts["reward_band"]["mean"], trl["reward_band"], atol=0.0)
    return {
        "time_ratio": ts["wall_s"]["mean"] / trl["wall_s"]["mean"],
        "time_ratio_median": ts["wall_s"]["median"] / trl["wall_s"]["median"],
        "cpu_time_ratio": ts["cpu_s"]["mean"] / trl["cpu_s"]["mean"],
        "step_time_ratio": ts["step_s"]["median"] / trl["step_s"]["median"],
        "memory_ratio": ts["peak_rss_mib"]["max"] / trl["peak_rss_mib"]["max"],
        "reward_mean_within_trl_band": inside,
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--base-warmup", type=int, default=50)
    ap.add_argument("--base", type=Path, default=None, help="a ready exported base folder")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of every run")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--num-train", type=int, default=20000, help="prompt records in the file")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each process (1: on a shared machine two OpenMP threads stall "
        "whenever another job holds a core)",
    )
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
    work = args.out.resolve().parent / "rl-work" if args.smoke else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    if args.base is not None:
        base, base_info = args.base.resolve(), {"folder": str(args.base), "given": True}
    else:
        base, built = base_model(
            work, steps=args.base_steps, warmup=args.base_warmup, threads=args.threads, extra=extra
        )
        base_info = {**built, "folder": str(base), "given": False}
    data, data_info = checked_prompts(args, base, work, extra)
    print(
        f"prompts: {data_info['checked']} checked, token ids identical; rewards of "
        f"{data_info['reward_checked']} decoded answers identical",
        flush=True,
    )

    result: dict[str, Any] = {
        "benchmark": "rl",
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
            "lr": LR,
            "trl_settings": trl_settings(args, 0),
            "tscale_config": tscale_config(args, 0, data, base, work / "tscale-seed0"),
        },
        "base": {k: v for k, v in base_info.items() if k != "tscale_eval"}
        | {"eval": base_info.get("tscale_eval")},
        "prompts": data_info,
        "note": NOTE,
    }
    runs: dict[str, list[dict[str, Any]]] = {"trl": [], "tscale": []}
    for seed in range(args.seeds):  # alternate, so that the machine's load falls on both
        for side, run in (("trl", run_trl), ("tscale", run_tscale)):
            if side not in sides:
                continue
            r = run(args, seed, data, base, work)
            runs[side].append(r)
            print(
                f"{side} seed {seed}: {r['wall_s']:.1f} s (CPU {r['cpu_s']:.1f} s), "
                f"{len(r['step_s'])} steps, median "
                f"{statistics.median(r['step_s']):.2f} s/step, generation "
                f"{sum(r['generation_s']) / sum(r['step_s']):.0%}, peak RSS "
                f"{r['peak_rss_mib']:.0f} MiB, reward {r['reward'][0]:.3f} -> "
                f"{r['reward'][-1]:.3f}, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for side, rs in runs.items():
        if rs:
            result[side] = {**summarize(rs), "runs": rs}
    if "trl" in result and "tscale" in result:
        result["comparison"] = compare(result["trl"], result["tscale"])
        result["bar_time_ratio"] = BAR_TIME_RATIO
        result["pass"] = result["comparison"]["time_ratio"] <= BAR_TIME_RATIO
        c = result["comparison"]
        print(
            f"tscale/TRL: time {c['time_ratio']:.2f}x (bar {BAR_TIME_RATIO}), CPU time "
            f"{c['cpu_time_ratio']:.2f}x, step "
            f"{c['step_time_ratio']:.2f}x, memory {c['memory_ratio']:.2f}x; tscale's mean reward "
            f"inside TRL's band on {c['reward_mean_within_trl_band']['fraction_inside']:.0%} "
            "of steps"
        )
    result["machine"]["load_avg_after"] = os.getloadavg()
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
