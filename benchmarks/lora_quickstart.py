"""LoRA and QLoRA SFT on the quickstart task, from a partly trained base: held-out exact match.

LoRA cannot teach a random-init model the task (its frozen random weights carry nothing to
adapt), so this does what users do:

1. **base**: ``configs/quickstart.yaml`` trained for only ``--base-steps`` (300) full fine-tuning
   steps, then exported as an HF checkpoint (``tscale export``) to ``runs/lora_base/export``;
2. **base accuracy**: the exported checkpoint, loaded through ``model.path`` exactly as the LoRA
   runs load it, answers the 200 held-out problems greedily (no training);
3. **lora**: ``configs/lora_quickstart.yaml`` (adapters over the frozen base) on the full
   quickstart task — the same generated problems and held-out set (same seed);
4. **qlora**: ``configs/qlora_quickstart.yaml``, the same with the frozen projections in NF4.

Every run is in this process, one after the other, with the configs' ``run.threads``. Writes
``benchmarks/results/lora_quickstart.json`` and prints one line per run. The bar is the
quickstart's: held-out exact match >= 80%. Timings come from a shared CPU machine: indicative.

Usage: python benchmarks/lora_quickstart.py [--base-steps 300] [--only lora qlora]
       [--steps N] [extra a.b=value overrides for the LoRA/QLoRA runs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag, parse_args
from rich.console import Console

from tscale.config import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.train import builders, data_build, train
from tscale.train.export import export
from tscale.train.trainer import evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lora_quickstart.json"
EXPORT = ROOT / "runs" / "lora_base" / "export"  # the configs' model.path
CONFIGS = {"lora": "configs/lora_quickstart.yaml", "qlora": "configs/qlora_quickstart.yaml"}
BAR = 0.8
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly;
# its runs go beside --out and train a smaller task for a few steps
SMOKE = {"base_steps": 3, "steps": 3, "threads": 1}
SMOKE_OVERRIDES = SMOKE_TRAIN_OVERRIDES


def _evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/exact_match" in r]


def train_base(
    steps: int,
    threads: int,
    export_dir: Path,
    runs: Path = ROOT / "runs",
    extra: tuple[str, ...] = (),
) -> dict:
    """Full fine-tuning of the quickstart model for ``steps``, exported as an HF directory."""
    run_dir = runs / "lora_base"
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"train.max_steps={steps}",
            f"run.output_dir={run_dir}",
            f"run.threads={threads}",
            "train.save_every=0",
            "train.eval_every=0",
            "train.progress=false",
            *extra,
        ],
    )
    result = train(cfg, overwrite=True, console=Console(quiet=True))
    export(run_dir, export_dir)
    s = result.summary
    return {
        "config": "configs/quickstart.yaml",
        "overrides": [f"train.max_steps={steps}"],
        "steps": steps,
        "exact_match_at_end_of_training": s["eval"]["exact_match"],
        "train_time_s": s["train_time_s"],
        "trainable_params": T.num_elements(result.state.params),
    }


def base_accuracy(config: str, overrides: list[str], runs: Path = ROOT / "runs") -> dict:
    """Held-out exact match of the checkpoint at ``model.path``, loaded as the LoRA run loads it."""
    run_dir = runs / "lora_base_eval"
    cfg = load_config(ROOT / config, [f"run.output_dir={run_dir}", *overrides])
    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
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
        "model_params": T.num_elements(params),
        "model_bytes_fp32": T.num_bytes(params),
    }


def run_adapter(name: str, overrides: list[str], runs: Path = ROOT / "runs") -> dict:
    """One LoRA/QLoRA SFT run from its config; accuracy, trainable params, memory, time."""
    config = CONFIGS[name]
    run_dir = runs / f"bench-{name}"
    cfg = load_config(
        ROOT / config, [f"run.output_dir={run_dir}", "train.progress=false", *overrides]
    )
    t0 = time.perf_counter()
    result = train(cfg, overwrite=True, console=Console(quiet=True))
    wall = time.perf_counter() - t0
    s = result.summary
    evals = _evals(run_dir)
    out = {
        "config": config,
        "overrides": overrides,
        "lora": {
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "targets": cfg.lora.targets or "q/k/v/o, gate/up/down",
            "qlora": cfg.lora.qlora,
        },
        "optimizer": {"lr": cfg.optimizer.lr, "weight_decay": cfg.optimizer.weight_decay},
        "steps": s["final_step"],
        "exact_match": s["eval"]["exact_match"],
        "by_task": {k.split("/")[1]: v for k, v in s["eval"].items() if "/" in k},
        "exact_match_by_step": {r["step"]: r["eval/exact_match"] for r in evals},
        "eval_loss": s["eval"]["loss"],
        "trainable_params": T.num_elements(result.state.params),
        "adapter_files": sorted(p.name for p in (run_dir / "adapter").iterdir()),
        "train_time_s": s["train_time_s"],
        "tokens_per_s": s["tokens_per_s"],
        "wall_s": wall,
        "meets_bar": s["eval"]["exact_match"] >= BAR,
    }
    if cfg.lora.qlora:
        from tscale.models.quant import quantized_bytes

        model, base = builders.build_model(cfg, 0, R.key(0))
        _, q = builders.build_lora_model(cfg, model, base)  # the NF4 base, a frozen tree
        mem = quantized_bytes(q)
        out["base_memory_bytes"] = {
            k: mem[k] for k in ("quantized", "unquantized", "total", "fp32_total", "bf16_total")
        }
        out["base_memory_bytes"]["bits_per_quantized_weight"] = mem["bits_per_weight"]
        out["base_memory_bytes"]["ratio_fp32"] = mem["ratio_fp32"]
        out["base_memory_bytes"]["ratio_bf16"] = mem["ratio_bf16"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--skip-base", action="store_true", help="reuse runs/lora_base/export")
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps of the SFT runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("overrides", nargs="*", help="a.b=value for the LoRA/QLoRA runs")
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    os.chdir(ROOT)  # the configs' paths (runs/lora_base/export) are relative to the repository
    runs, base_extra, eval_extra = ROOT / "runs", [], []
    if args.smoke:  # the runs beside --out, the base exported there, a smaller task
        runs = args.out.resolve().parent / "lora-quickstart-runs"
        export_dir = runs / "lora_base" / "export"
        base_extra = SMOKE_OVERRIDES
        eval_extra = [
            f"model.path={export_dir}",
            f"data.tokenizer.path={export_dir / 'tokenizer.json'}",
            *SMOKE_OVERRIDES,
        ]
    overrides = [f"run.threads={args.threads}", *eval_extra, *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    report = {
        "benchmark": "lora_quickstart",
        "device": f"cpu ({platform.machine()}), {args.threads} thread(s), runs one at a time",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "bar": f"held-out exact match >= {BAR}",
        "note": "timings from a shared machine (other jobs running): indicative only",
        "base": previous.get("base"),
        "base_accuracy": previous.get("base_accuracy"),
        "runs": previous.get("runs", {}),
    }
    if not args.skip_base:
        report["base"] = train_base(
            args.base_steps, args.threads, runs / "lora_base" / "export", runs, tuple(base_extra)
        )
        print(
            f"base: {report['base']['exact_match_at_end_of_training']:.1%} after "
            f"{args.base_steps} steps, {report['base']['train_time_s']:.0f} s"
        )
    report["base_accuracy"] = base_accuracy(
        CONFIGS["lora"], [f"run.threads={args.threads}", *eval_extra], runs
    )
    print(f"base (loaded from runs/lora_base/export): {report['base_accuracy']['exact_match']:.1%}")
    for name in args.only:
        r = run_adapter(name, overrides, runs)
        report["runs"][name] = r
        print(
            f"{name}: exact match {r['exact_match']:.1%} "
            f"({'meets' if r['meets_bar'] else 'misses'} the 80% bar), "
            f"{r['trainable_params']:,} trainable params, {r['train_time_s']:.0f} s training"
        )
    report["load_average_at_end"] = os.getloadavg()[0]
    if args.smoke:
        report["smoke"] = True
        report["smoke_overrides"] = SMOKE_OVERRIDES
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
