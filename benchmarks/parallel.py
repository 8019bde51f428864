"""2-rank DDP and FSDP (and DeepSpeed ZeRO-2/3 when installed) step time against one process on
the same global batch, and the per-rank memory of params + optimizer state.

One process runs the plain tscale step on the global batch with all ``--threads`` threads; then
``torchrun --nproc-per-node 2`` (gloo, CPU) runs the DDP and the FSDP step, each rank on half the
batch with ``--threads / 2`` threads, so the three use the same cores. Each measures
``--steps`` steps after ``--warmup`` and reports the median step time; the ratios are
``one-process time / 2-rank time`` (above 1: the 2 ranks are faster). Memory is the bytes of the
params and optimizer-state tensors a rank holds (FSDP: its shards), counted from the tensors.
``--repeats`` rounds run one after the other (one process, then the 2-rank runs); the medians
over rounds are reported, with every round's time beside them. Writes
``benchmarks/results/parallel.json`` and prints one summary line.

Usage: python benchmarks/parallel.py [--steps 12] [--warmup 3] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _smoke import add_smoke_flag, parse_args
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import adamw, chain, clip_by_global_norm
from tscale.parallel import ddp, fsdp
from tscale.parallel.mesh import plan_parallel
from tscale.step import make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "parallel.json"
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {
    "steps": 2,
    "warmup": 1,
    "batch": 2,
    "seq": 16,
    "hidden": 128,
    "layers": 1,
    "vocab": 256,
    "repeats": 1,
}


def _model(args: argparse.Namespace) -> tuple[Transformer, TensorDict]:
    cfg = TransformerConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 128,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = Transformer(cfg)
    return model, model.init(R.key(0))


def _batches(args: argparse.Namespace, n: int) -> list[TensorDict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        out.append(TensorDict({"input_ids": ids, "labels": ids.clone()}, [args.batch]))
    return out


def _time(step, state, batches: list[TensorDict], warmup: int) -> tuple[float, TrainState]:
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        state, m = step(state, b)
        float(m["loss"])  # the step's end, as the trainer reads it
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def _state_bytes(state: TrainState) -> int:
    """Bytes of params + optimizer state this rank holds (its shards under FSDP)."""
    return T.num_bytes(fsdp.local_tree(state.params)) + T.num_bytes(
        fsdp.local_tree(state.opt_state)
    )


def _tx():
    return chain(clip_by_global_norm(1.0), adamw(1e-3, weight_decay=0.1))


def single(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, params = _model(args)
    tx = _tx()
    state = TrainState.create(params, tx.init(params), R.key(1))
    step = make_train_step(make_lm_loss(model.apply), tx)
    median, state = _time(step, state, _batches(args, args.warmup + args.steps), args.warmup)
    return {"step_s": median, "state_bytes": _state_bytes(state)}


def _deepspeed_step(args: argparse.Namespace, model: Transformer, full: TensorDict, stage: int):
    """DeepSpeed's engine at ``stage`` over the same model and AdamW; returns
    ``(step(state, batch), run)`` in the shape :func:`_time` takes."""
    from tscale.optim.transforms import default_decay_mask
    from tscale.parallel import deepspeed_engine as DSE

    def make_loss(gather):
        if gather is None:
            return make_lm_loss(model.apply)
        return make_lm_loss(lambda p, b: model.apply(p, b, gather=gather))

    conf = DSE.deepspeed_config(
        global_batch=args.batch,
        world_size=dist.get_world_size(),
        microbatches=1,
        zero_stage=stage,
        max_grad_norm=1.0,
        bf16=False,
        reduce_dtype=torch.float32,
    )
    run = DSE.initialize(
        T.clone(full),
        make_loss=make_loss,
        make_tx=lambda decay: adamw(1e-3, weight_decay=0.1 if decay else 0.0),
        decays=default_decay_mask,
        config=conf,
        device=torch.device("cpu"),
    )
    return (lambda state, batch: (state, run.step(batch, 1))), run


def _deepspeed_bytes(run) -> int:
    """Bytes a rank holds for params (ZeRO-3: its partitions), DeepSpeed's fp32 master
    partitions and the optimizer state."""
    engine_opt = run.engine.optimizer
    total = 0
    for p in run.module.named_leaves().values():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += local.numel() * local.element_size()
    masters = getattr(engine_opt, "single_partition_of_fp32_groups", None)
    masters = masters or getattr(engine_opt, "fp32_partitioned_groups_flat", None) or []
    total += sum(t.numel() * t.element_size() for t in masters)
    base = getattr(engine_opt, "optimizer", engine_opt)
    total += sum(T.num_bytes(s["tscale"].tree) for s in base.state.values() if "tscale" in s)
    return total


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def worker(args: argparse.Namespace) -> None:
    """One rank of the 2-rank runs (started by torchrun)."""
    torch.set_num_threads(max(1, args.threads // 2))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, full = _model(args)
    batches = _batches(args, args.warmup + args.steps)
    share = args.batch // world
    mine = [b[rank * share : (rank + 1) * share] for b in batches]
    results = {}
    modes = ["ddp", "ddp_overlap", "fsdp"] + (["zero2", "zero3"] if args.deepspeed else [])
    for mode in modes:
        run = None
        if mode.startswith("zero"):
            state = TrainState.create(T.clone(full), TensorDict(), R.key(1))
            step, run = _deepspeed_step(args, model, full, int(mode[-1]))
        elif mode == "ddp_overlap":  # the all-reduce started per layer in the backward
            tx = _tx()
            state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
            overlapped = ddp.OverlappedDDP(None)
            loss = make_lm_loss(overlapped.wrap(model).apply)
            step = make_train_step(loss, tx, grad_sync=overlapped.sync)
        elif mode == "ddp":
            tx = _tx()
            state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
            loss = make_lm_loss(model.apply)
            step = make_train_step(loss, tx, grad_sync=ddp.make_ddp_sync(None))
        else:
            plan = plan_parallel(rank, world, rank, 1, -1, "cpu")
            layout = fsdp.FSDPLayout.of(full, plan.mesh)
            clip = clip_by_global_norm(1.0, norm_fn=fsdp.sharded_norm(layout))
            tx = chain(clip, adamw(1e-3, weight_decay=0.1))
            params = fsdp.shard_tree(full, plan.mesh)
            opt = fsdp.shard_opt_state(tx.init(fsdp.local_tree(params)), params, plan.mesh)
            state = TrainState.create(params, opt, R.key(1))
            inner = make_train_step(
                make_lm_loss(fsdp.ShardedModel(model, layout).apply),
                tx,
                grad_sync=fsdp.make_fsdp_sync(None),
                grad_norm=fsdp.sharded_norm(layout),
            )
            step = fsdp.wrap_fsdp_step(inner)
        dist.barrier()
        median, state = _time(step, state, mine, args.warmup)
        slowest = torch.tensor([median])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        used = _deepspeed_bytes(run) if run is not None else _state_bytes(state)
        results[mode] = {"step_s": float(slowest), "state_bytes": used}
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--no-deepspeed",
        dest="deepspeed",
        action="store_false",
        help="leave out DeepSpeed ZeRO-2/3 (run when deepspeed is installed)",
    )
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    args.deepspeed = args.deepspeed and _has_deepspeed()
    if args.worker_out:
        worker(args)
        return

    load_before = os.getloadavg()
    rounds: list[tuple[dict, dict]] = []
    for _ in range(args.repeats):  # one process, then the 2-rank runs, interleaved per round
        one = single(args)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ranks.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc-per-node=2", __file__, *sys.argv[1:], "--worker-out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // 2))}
            subprocess.run(cmd, check=True, env=env)
            rounds.append((one, json.loads(out.read_text())))
    # the median round of each: step times per round, ratios from the per-round medians
    one = {
        "step_s": statistics.median(r[0]["step_s"] for r in rounds),
        "state_bytes": rounds[0][0]["state_bytes"],
        "rounds_step_s": [r[0]["step_s"] for r in rounds],
    }
    ranks = {
        mode: {
            "step_s": statistics.median(r[1][mode]["step_s"] for r in rounds),
            "state_bytes": rounds[0][1][mode]["state_bytes"],
            "rounds_step_s": [r[1][mode]["step_s"] for r in rounds],
        }
        for mode in rounds[0][1]
    }
    tokens = args.batch * args.seq
    result = {
        "benchmark": "parallel",
        "what": "2-rank DDP / FSDP (gloo, CPU) vs one process, same global batch and cores",
        "model_params": T.num_elements(_model(args)[1]),
        "global_batch": [args.batch, args.seq],
        "threads_total": args.threads,
        "steps_timed": args.steps,
        "rounds": args.repeats,
        "one_process": {**one, "tokens_per_s": tokens / one["step_s"]},
        "ddp": {**ranks["ddp"], "tokens_per_s": tokens / ranks["ddp"]["step_s"]},
        "fsdp": {**ranks["fsdp"], "tokens_per_s": tokens / ranks["fsdp"]["step_s"]},
        "speed_ratio_ddp": one["step_s"] / ranks["ddp"]["step_s"],
        "speed_ratio_fsdp": one["step_s"] / ranks["fsdp"]["step_s"],
        "fsdp_state_memory_vs_ddp": ranks["fsdp"]["state_bytes"] / ranks["ddp"]["state_bytes"],
        "memory_bar": 0.55,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        # 1/5/15-minute load averages around the run (they include its own 2 busy threads);
        # other work on the machine distorts the speed ratios, not the memory ratios
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }
    result["memory_bar_met"] = result["fsdp_state_memory_vs_ddp"] <= 0.55
    if args.smoke:
        result["smoke"] = True
    r = ranks["ddp_overlap"]
    result["ddp_overlap"] = {**r, "tokens_per_s": tokens / r["step_s"]}
    result["speed_ratio_ddp_overlap"] = one["step_s"] / r["step_s"]
    for mode in ("zero2", "zero3"):
        if mode in ranks:
            r = ranks[mode]
            result[f"deepspeed_{mode}"] = {**r, "tokens_per_s": tokens / r["step_s"]}
            result[f"speed_ratio_deepspeed_{mode}"] = one["step_s"] / r["step_s"]
            result[f"deepspeed_{mode}_memory_vs_ddp"] = (
                r["state_bytes"] / ranks["ddp"]["state_bytes"]
            )
    if "zero2" in ranks:
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
        result["deepspeed_memory_note"] = (
            "DeepSpeed keeps its own fp32 master partition beside the fp32 module params even in "
            "fp32 runs; counted here (params + masters + optimizer state)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"parallel: one process {one['step_s'] * 1e3:.0f} ms/step; 2-rank ddp "
        f"{ranks['ddp']['step_s'] * 1e3:.0f} ms (x{result['speed_ratio_ddp']:.2f}), fsdp "
        f"{ranks['fsdp']['step_s'] * 1e3:.0f} ms (x{result['speed_ratio_fsdp']:.2f}); fsdp "
        f"params+opt state per rank {result['fsdp_state_memory_vs_ddp']:.3f}x ddp's"
    )
    print(
        f"  ddp with the all-reduce overlapped: {ranks['ddp_overlap']['step_s'] * 1e3:.0f} ms "
        f"(x{result['speed_ratio_ddp_overlap']:.2f})"
    )
    for mode in ("zero2", "zero3"):
        if mode in ranks:
            print(
                f"  deepspeed {mode}: {ranks[mode]['step_s'] * 1e3:.0f} ms "
                f"(x{result[f'speed_ratio_deepspeed_{mode}']:.2f}), state per rank "
                f"{result[f'deepspeed_{mode}_memory_vs_ddp']:.3f}x ddp's"
            )


if __name__ == "__main__":
    main()
