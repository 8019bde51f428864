"""Preemption: how long the checkpoint of a SIGTERM stop takes, and what agreeing on the stop
step costs under torchrun.

- **save**: ``tscale.checkpoint.save_checkpoint`` (what the trainer's one-process save runs: a
  hidden temp directory, every file fsynced, a rename) of a real ``TrainState`` — Llama-style
  params initialised by ``Transformer.init`` plus the AdamW state of ``tscale.optim.adamw``
  (two moments), float32 — for the model sizes of ``--sizes`` (hidden size, layers, vocab),
  each saved ``--repeats`` times into a fresh directory; the median seconds and GB/s are kept.
  Launchers give ~30 s between SIGTERM and SIGKILL (torchrun's agent, SLURM's KillWait).
- **vote** (``--vote``: run under ``torchrun --nproc-per-node 2``, gloo, CPU): per step of a
  stand-in step (a float32 matmul loop of ``--step-ms`` milliseconds, then an all-reduce of
  1 MiB of "gradients" as DDP does, which lines the ranks up), (a) a blocking 1-float
  all-reduce at each step boundary, and (b) ``StopVote.poll`` (the trainer's: an async
  all-reduce started after each step, waited after the next). Reports the time per step spent
  in each call (host time, the median of 5 interleaved rounds) and each loop's time per step as
  a ratio to the plain loop's, in the same processes.

Writes ``benchmarks/results/preemption.json`` or ``--out`` (rank 0 merges the vote figures into
it) and prints one summary line.

Usage:
    python benchmarks/preemption.py [--sizes 128x4x384,768x12x32000] [--repeats 3]
    torchrun --standalone --nproc-per-node 2 benchmarks/preemption.py --vote [--step-ms 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _smoke import add_smoke_flag, parse_args

RESULTS = Path(__file__).resolve().parent / "results" / "preemption.json"
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {"sizes": "64x1x128", "repeats": 1, "step_ms": 1.0, "steps": 5}


def _merge(out: Path, section: str, value: object, smoke: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[section] = value
    if smoke:
        data["smoke"] = True
    out.write_text(json.dumps(data, indent=2) + "\n")


def bench_save(sizes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    from tscale import optim
    from tscale.checkpoint import save_checkpoint
    from tscale.core import rng
    from tscale.core.state import TrainState
    from tscale.models.transformer import Transformer, TransformerConfig

    out = []
    for hidden, layers, vocab in sizes:
        config = TransformerConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_layers=layers,
            num_heads=max(1, hidden // 64),
            max_position_embeddings=1024,
        )
        params = Transformer(config).init(rng.key(0))
        tx = optim.adamw(1e-3)
        state = TrainState.create(params, tx.init(params), rng.key(1))
        n_params = sum(t.numel() for t in params.values(include_nested=True, leaves_only=True))
        n_bytes = sum(
            t.numel() * t.element_size()
            for tree in (state.params, state.opt_state)
            for t in tree.values(include_nested=True, leaves_only=True)
        )
        times = []
        for _ in range(repeats):
            root = Path(tempfile.mkdtemp(prefix="tscale-preempt-"))
            try:
                t0 = time.perf_counter()
                save_checkpoint(root, state, step=1, cursor={"epoch": 0, "index": 1})
                times.append(time.perf_counter() - t0)
            finally:
                shutil.rmtree(root)
        median = statistics.median(times)
        row = {
            "hidden_size": hidden,
            "num_layers": layers,
            "vocab_size": vocab,
            "params_millions": round(n_params / 1e6, 2),
            "checkpoint_gb": round(n_bytes / 1e9, 3),
            "save_s_median": round(median, 3),
            "save_s_all": [round(t, 3) for t in times],
            "gb_per_s": round(n_bytes / 1e9 / median, 3),
        }
        print(json.dumps(row))
        out.append(row)
        del state, params
    return out


def bench_vote(step_ms: float, steps: int) -> dict | None:
    import torch.distributed as dist

    from tscale.train.distributed import StopVote

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    a = torch.randn(192, 192)

    grads = torch.zeros(1 << 18)  # 1 MiB of "gradients"

    def fake_step() -> None:  # ~step_ms of compute, then the gradient all-reduce (as DDP)
        for _ in range(reps):
            a @ a
        dist.all_reduce(grads)

    t0 = time.perf_counter()
    for _ in range(50):
        a @ a
    reps = max(1, round(step_ms / 1e3 / ((time.perf_counter() - t0) / 50)))

    class _Par:  # what StopVote reads of the trainer's Parallel
        world_size = dist.get_world_size()

    group = dist.new_group(backend="gloo")

    def loop(mode: str) -> tuple[float, float]:
        """(seconds per step, seconds per step inside the agreement call)."""
        vote = StopVote(_Par()) if mode == "vote" else None  # type: ignore[arg-type]
        dist.barrier()
        spent = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            fake_step()
            t = time.perf_counter()
            if mode == "blocking":
                flag = torch.zeros(1)
                dist.all_reduce(flag, group=group)
                flag.item()
            elif vote is not None:
                vote.poll(False)
            spent += time.perf_counter() - t
        if vote is not None:
            vote.close(False)
        return (time.perf_counter() - t0) / steps, spent / steps

    loop("plain")  # warm-up
    per_step: dict[str, list[float]] = {mode: [] for mode in ("plain", "blocking", "vote")}
    inside: dict[str, list[float]] = {mode: [] for mode in ("plain", "blocking", "vote")}
    for _ in range(5):  # interleaved rounds, the median of each
        for mode in per_step:
            total, call = loop(mode)
            per_step[mode].append(total)
            inside[mode].append(call)
    med = {m: statistics.median(v) for m, v in per_step.items()}
    call = {m: statistics.median(v) for m, v in inside.items()}
    dist.barrier()
    dist.destroy_process_group()
    if rank:
        return None
    return {
        "world_size": 2,
        "backend": "gloo",
        "step_ms": round(med["plain"] * 1e3, 3),
        "blocking_allreduce_us_per_step": round(call["blocking"] * 1e6, 1),
        "stop_vote_us_per_step": round(call["vote"] * 1e6, 1),
        "loop_ratio_blocking": round(med["blocking"] / med["plain"], 4),
        "loop_ratio_vote": round(med["vote"] / med["plain"], 4),
        "steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="128x4x384,768x12x32000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vote", action="store_true", help="the agreement benchmark (torchrun)")
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", type=Path, default=RESULTS, help="the JSON the sections merge into")
    add_smoke_flag(p)
    args = parse_args(p, SMOKE, RESULTS)
    if args.vote:
        result = bench_vote(args.step_ms, args.steps)
        if result is not None:
            _merge(args.out, "vote", result, args.smoke)
            print(
                f"stop vote: {result['stop_vote_us_per_step']} us/step (blocking all-reduce "
                f"{result['blocking_allreduce_us_per_step']} us/step) on "
                f"{result['step_ms']} ms steps, 2 gloo ranks"
            )
        return
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    rows = bench_save(sizes, args.repeats)  # type: ignore[arg-type]
    _merge(
        args.out,
        "save",
        {"cpu_threads": torch.get_num_threads(), "host": os.uname().nodename, "rows": rows},
        args.smoke,
    )
    print(
        "checkpoint save: "
        + ", ".join(f"{r['params_millions']}M params {r['save_s_median']} s" for r in rows)
    )


if __name__ == "__main__":
    main()
