"""GRPO at equal wall clock: tscale against TRL's ``GRPOTrainer``, held-out exact match (issue 15).

``benchmarks/rl.py`` times the two frameworks over the same number of steps; this script gives
each the same wall-clock budget and asks what a user gets from it: the held-out exact match of
the trained policy.

1. **base, prompts, settings**: as ``benchmarks/rl.py`` (the weak SFT base of the quickstart,
   the quickstart's training problems in one JSONL file whose token ids are checked identical
   between the two, G = 8 completions of 64 prompts per step, ≤ 24 new tokens, T = 1, β = 0,
   loss ``dapo``, ε 0.2, scale_rewards group, AdamW constant), with one learning rate for both
   (``--lr``, default 1e-4: ``configs/grpo_quickstart.yaml``'s) and no step limit.
2. **the budget**: every run is one whole process (imports, data, model, training) started
   with ``--budget`` seconds of wall clock. TRL stops at the first step end after the budget
   (a callback reading the time since the worker started); tscale gets SIGTERM at the budget,
   finishes that step and saves (its documented stop). The trained policy is then saved
   (TRL ``save_model``; ``tscale export``) outside the budget. The two sides of a seed run at
   the same time, one thread each, on the two cores of the machine: the load falls on both.
3. **evaluation**: the same evaluator for both folders, after training: the greedy held-out
   exact match of the quickstart's 200 held-out problems (``benchmarks/preference.py``'s
   ``tscale_eval_of_export``: the folder loaded through ``model.path`` with its own
   tokenizer), the figure the base's 32% is.
4. **figures**: per seed and side, steps done, held-out exact match (overall, per task) and its
   change from the base; means over the seeds, and whether tscale's mean gain is at least TRL's.

Writes ``benchmarks/results/rl_equal_time.json``; ``--smoke`` runs the same path at tiny sizes.

Usage: python benchmarks/rl_equal_time.py [--budget 300] [--seeds 3] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag, parse_args
from preference import base_model, tscale_eval_of_export
from rl import WORKER, checked_prompts, trl_settings, tscale_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rl_equal_time.json"
WORK = ROOT / "runs" / "bench-rl-equal-time"
SMOKE = {
    "base_steps": 3,
    "base_warmup": 1,
    "budget": 20.0,
    "prompts": 4,
    "generations": 2,
    "max_completion_length": 4,
    "num_train": 64,
    "seeds": 1,
}
NO_STEP_LIMIT = 1_000_000


def trl_process(args: argparse.Namespace, seed: int, data: Path, model: Path, work: Path) -> Any:
    """Start TRL's run of one seed (the worker of ``benchmarks/rl.py`` with a budget and a
    folder to save the policy in); returns the process and where its result lands."""
    out = work / f"trl-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    settings = trl_settings(args, seed) | {"learning_rate": args.lr, "max_steps": NO_STEP_LIMIT}
    payload = {
        "data": str(data),
        "model": str(model),
        "out": str(out),
        "result": str(out / "result.json"),
        "threads": 1,
        "settings": settings,
        "budget_s": args.budget,
        "save_to": str(out / "policy"),
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    log = (out / "log.txt").open("w")
    cmd = [sys.executable, str(WORKER), json.dumps(payload)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out


def tscale_process(args: argparse.Namespace, seed: int, data: Path, model: Path, work: Path) -> Any:
    """Start tscale's run of one seed (``configs/grpo_quickstart.yaml`` as ``benchmarks/rl.py``
    sets it up, ``--lr``, no step limit, one thread); returns the process and its run folder."""
    run_dir = work / f"tscale-seed{seed}"
    cfg = tscale_config(args, seed, data, model, run_dir)
    cfg["run"]["threads"] = 1
    cfg["optimizer"]["lr"] = args.lr
    cfg["train"].update(max_steps=NO_STEP_LIMIT, log_every=5)
    path = work / f"tscale-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (work / f"tscale-seed{seed}.log").open("w")
    exe = Path(sys.executable).with_name("tscale")
    cmd = [str(exe), "train", str(path), "--overwrite"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), run_dir


def run_seed(
    args: argparse.Namespace, seed: int, data: Path, model: Path, work: Path
) -> dict[str, dict[str, Any]]:
    """Both sides of one seed at once; each one's steps, seconds and trained folder."""
    t0 = time.perf_counter()
    trl, trl_out = trl_process(args, seed, data, model, work)
    ts, ts_dir = tscale_process(args, seed, data, model, work)
    time.sleep(max(0.0, args.budget - (time.perf_counter() - t0)))
    ts.send_signal(signal.SIGTERM)  # finish the step, save, stop
    ended: dict[str, float] = {}
    for name, proc in (("tscale", ts), ("trl", trl)):
        if proc.wait() != 0:
            raise SystemExit(f"{name} seed {seed} failed ({proc.returncode}); see {work}")
        ended[name] = time.perf_counter() - t0
    export = ts_dir / "policy"
    exe = Path(sys.executable).with_name("tscale")
    subprocess.run([str(exe), "export", str(ts_dir), str(export)], check=True, capture_output=True)
    trl_result = json.loads((trl_out / "result.json").read_text())
    rows = [json.loads(x) for x in (ts_dir / "metrics.jsonl").read_text().splitlines()]
    ts_steps = max((r["step"] for r in rows if "step" in r), default=0)
    return {
        "trl": {
            "steps": trl_result["steps"],
            "train_end_s": trl_result["in_process_s"],
            "ended_s": ended["trl"],
            "reward_first_last": [trl_result["log"][0]["reward"], trl_result["log"][-1]["reward"]],
            "folder": str(trl_out / "policy"),
        },
        "tscale": {
            "steps": ts_steps,
            "ended_s": ended["tscale"],
            "folder": str(export),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--base-warmup", type=int, default=50)
    ap.add_argument("--base", type=Path, default=None, help="a ready exported base folder")
    ap.add_argument("--budget", type=float, default=300.0, help="wall seconds of every run")
    ap.add_argument("--lr", type=float, default=1e-4, help="both sides' learning rate")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--num-train", type=int, default=20000, help="prompt records in the file")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=WORK, help="runs and the cached base")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    args.threads = 1  # what rl.py's helpers read: one thread per process, two at once
    args.steps = NO_STEP_LIMIT

    import torch
    import transformers
    import trl

    extra = list(SMOKE_TRAIN_OVERRIDES) if args.smoke else []
    work = args.out.resolve().parent / "rl-equal-time-work" if args.smoke else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if args.base is not None:
        base, base_info = args.base.resolve(), {"folder": str(args.base), "given": True}
        base_info["tscale_eval"] = tscale_eval_of_export(base, extra, 2, work / "eval-base")
    else:
        base, built = base_model(
            work, steps=args.base_steps, warmup=args.base_warmup, threads=2, extra=extra
        )
        base_info = {**built, "folder": str(base), "given": False}
    data, data_info = checked_prompts(args, base, work, extra)
    base_em = base_info["tscale_eval"]["exact_match"]
    runs: dict[str, list[dict[str, Any]]] = {"trl": [], "tscale": []}
    for seed in range(args.seeds):
        got = run_seed(args, seed, data, base, work)
        for side, r in got.items():
            ev = tscale_eval_of_export(Path(r["folder"]), extra, 2, work / f"eval-{side}-{seed}")
            r.update(
                seed=seed,
                exact_match=ev["exact_match"],
                exact_match_by_task=ev["by_task"],
                exact_match_change=ev["exact_match"] - base_em,
            )
            runs[side].append(r)
        print(
            f"seed {seed}: "
            + "; ".join(
                f"{side} {got[side]['steps']} steps, exact match {base_em:.3f} -> "
                f"{got[side]['exact_match']:.3f}"
                for side in ("tscale", "trl")
            )
            + f" (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    summary = {
        side: {
            "mean_steps": sum(r["steps"] for r in rs) / len(rs),
            "mean_exact_match": sum(r["exact_match"] for r in rs) / len(rs),
            "mean_exact_match_change": sum(r["exact_match_change"] for r in rs) / len(rs),
            "exact_match_change_each": [r["exact_match_change"] for r in rs],
        }
        for side, rs in runs.items()
    }
    result = {
        "benchmark": "rl_equal_time",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "trl_settings": trl_settings(args, 0) | {"learning_rate": args.lr},
            "evaluation": "greedy held-out exact match of the quickstart's held-out problems "
            "(preference.tscale_eval_of_export), the same evaluator for both folders",
        },
        "base": {"folder": str(base), "exact_match": base_em, "eval": base_info["tscale_eval"]},
        "prompts": data_info,
        "runs": runs,
        "summary": summary,
        "tscale_gain_at_least_trl": summary["tscale"]["mean_exact_match_change"]
        >= summary["trl"]["mean_exact_match_change"],
        **({"smoke": True} if args.smoke else {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
