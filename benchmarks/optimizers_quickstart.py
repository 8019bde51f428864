"""Every optimizer on the quickstart task: held-out exact match after the quickstart's 1500 steps.

Each optimizer runs ``configs/quickstart.yaml`` with ``optimizer.type`` set and the per-optimizer
learning rate below (the values docs/optimizers.md recommends; every other hyper-parameter is the
optimizer's default), as a separate ``tscale train`` process. Writes
``benchmarks/results/optimizers_quickstart.json`` and prints one line per optimizer. The bar is the
quickstart's: held-out exact match ≥ 80%.

Usage: python benchmarks/optimizers_quickstart.py [--jobs 2] [--only lion muon] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag, parse_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "optimizers_quickstart.json"

# Per-optimizer settings on top of configs/quickstart.yaml (AdamW: lr 3e-3, wd 0.1, cosine).
SETTINGS: dict[str, list[str]] = {
    "adamw": [],
    "adamw_8bit": [],
    "lion": ["optimizer.lr=3e-4", "optimizer.weight_decay=1.0"],
    "prodigy": ["optimizer.lr=1.0", "optimizer.betas=[0.9, 0.999]", "optimizer.d_coef=0.03"],
    "sophia_g": ["optimizer.lr=3e-4", "optimizer.betas=[0.965, 0.99]"],
    "schedule_free_adamw": ["scheduler.type=constant", "scheduler.min_lr_ratio=null"],
    "muon": ["optimizer.lr=0.02", "optimizer.betas=null"],
}
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly;
# its runs go beside --out and train a smaller task for a few steps
SMOKE = {"jobs": 1, "only": ["adamw"], "steps": 3}
SMOKE_OVERRIDES = SMOKE_TRAIN_OVERRIDES


def run_one(
    name: str, steps: int, threads: int, out_root: Path, extra: list[str] | None = None
) -> dict:
    out = out_root / name
    cmd = [
        sys.executable,
        "-m",
        "tscale.cli",
        "train",
        "configs/quickstart.yaml",
        "--overwrite",
        f"optimizer.type={name}",
        *SETTINGS[name],
        f"run.output_dir={out}",
        f"run.threads={threads}",
        f"train.max_steps={steps}",
        "train.save_every=0",
        "train.eval_every=500",
        "train.progress=false",
        *(extra or []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"optimizer": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/exact_match" in r]
    final = evals[-1]
    return {
        "optimizer": name,
        "settings": SETTINGS[name],
        "exact_match": final["eval/exact_match"],
        "exact_match_by_step": {r["step"]: r["eval/exact_match"] for r in evals},
        "eval_loss": final["eval/loss"],
        "skipped_steps": max((r.get("skipped", 0) for r in rows), default=0),
        "wall_s": wall,
        "meets_bar": final["eval/exact_match"] >= 0.8,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each when > 1)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    names = args.only or list(SETTINGS)
    threads = 1 if args.jobs > 1 else 2
    out_root = ROOT / "runs" / "bench-optimizers"
    extra: list[str] = []
    if args.smoke:
        out_root = args.out.resolve().parent / "bench-optimizers-runs"
        extra = SMOKE_OVERRIDES
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_one(n, args.steps, threads, out_root, extra), names))
    previous = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    merged = {r["optimizer"]: r for r in previous} | {r["optimizer"]: r for r in results}
    report = {
        "benchmark": "optimizers_quickstart",
        "device": f"cpu ({platform.machine()}), {threads} thread(s) per run, {args.jobs} at once",
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_end": os.getloadavg()[0],
        "steps": args.steps,
        "bar": "held-out exact match >= 0.8",
        "runs": [merged[n] for n in SETTINGS if n in merged],
    }
    if args.smoke:
        report["smoke"] = True
        report["smoke_overrides"] = SMOKE_OVERRIDES
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        if "error" in r:
            print(f"{r['optimizer']:>20}: failed: {r['error']}")
        else:
            print(
                f"{r['optimizer']:>20}: exact match {r['exact_match']:.1%} "
                f"({'meets' if r['meets_bar'] else 'misses'} the 80% bar), {r['wall_s']:.0f} s"
            )


if __name__ == "__main__":
    main()
