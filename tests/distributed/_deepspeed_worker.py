"""Run under torchrun (2 ranks, gloo): DeepSpeed ZeRO stages vs one tscale process on the
global batch.

Every rank computes the single-process reference itself (same seed, same global batches), then
runs DeepSpeed's engine (:mod:`tscale.parallel.deepspeed_engine`) on its share; rank 0 writes
the largest differences and the per-rank memory to ``sys.argv[1]``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

# the script's directory is on sys.path when torchrun starts it
from _equivalence_worker import B, tiny_model
from _equivalence_worker import batches as plain_batches
from _worker_exit import end_without_teardown
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses.lm import make_lm_loss
from tscale.models.stack import CastModel
from tscale.optim import transforms
from tscale.optim.alias import OPTIMIZERS
from tscale.optim.base import chain
from tscale.parallel import deepspeed_engine as DSE
from tscale.step.compose import make_train_step

POISON_STEP = 3  # the "nan" case: rank 1's share of this step has a NaN gradient


def batches(poison: bool) -> list[TensorDict]:
    """The DDP/FSDP worker's batches with a per-row loss factor (NaN in ``poison`` cases)."""
    out = []
    for i, b in enumerate(plain_batches()):
        scale = torch.ones(B)
        if poison and i == POISON_STEP:
            scale[-1] = float("nan")  # the last row: rank 1's share
        b.set("scale", scale)
        out.append(b)
    return out


def scaled(loss_fn):
    """The loss times a per-batch factor (1, or NaN to poison the gradients)."""

    def run(params, batch):
        loss_sum, aux = loss_fn(params, batch)
        return loss_sum * batch["scale"].prod(), aux

    return run


def _clipped(tx, clip: float | None):
    """The optimizer behind a global-norm clip, as the trainer chains it."""
    return tx if clip is None else chain(transforms.clip_by_global_norm(clip), tx)


def run_case(case: dict, rank: int, world: int) -> dict:
    model, full = tiny_model(case)
    data = batches(case.get("poison", False))
    clip = case.get("clip", 1.0)
    opt = OPTIMIZERS[case["opt"]]
    ref_opt = OPTIMIZERS[case.get("ref_opt", case["opt"])]
    bf16 = case.get("bf16", False)

    # the reference: one tscale process, the global batch, skip_nonfinite as the trainer builds it
    tx = transforms.skip_nonfinite(_clipped(ref_opt(1e-3), clip))
    apply = CastModel(model, torch.bfloat16).apply if bf16 else model.apply
    ref = TrainState.create(T.clone(full), tx.init(full), R.key(1))
    ref_step = make_train_step(scaled(make_lm_loss(apply)), tx, microbatches=case["mb"] * world)
    ref_losses = []
    for b in data:
        ref, m = ref_step(ref, b)
        ref_losses.append(float(m["loss"]))

    def make_tx(decay: bool):
        mask = None if decay else (lambda name, t: False)
        return transforms.skip_nonfinite(opt(1e-3, mask=mask))

    def make_loss(gather):
        if gather is None:
            return scaled(make_lm_loss(model.apply))
        return scaled(make_lm_loss(lambda p, b: model.apply(p, b, gather=gather)))

    conf = DSE.deepspeed_config(
        global_batch=B,
        world_size=world,
        microbatches=case["mb"],
        zero_stage=case["stage"],
        max_grad_norm=clip,
        bf16=bf16,
        reduce_dtype=torch.float32,
        offload_optimizer=case.get("offload", "none"),
        # every param partitioned under ZeRO-3 (small ones stay whole by default)
        extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    run = DSE.initialize(
        T.clone(full),
        make_loss=make_loss,
        make_tx=make_tx,
        decays=transforms.default_decay_mask,
        config=conf,
        device=torch.device("cpu"),
        skip_nonfinite=True,
    )
    mine = [b[rank * B // world : (rank + 1) * B // world] for b in data]
    losses = []
    for b in mine:
        losses.append(float(run.step(b, case["mb"])["loss"]))
    got = run.full_params()
    diffs = [
        (a.double() - b.double()).abs()
        for a, b in zip(T.leaves(got), T.leaves(ref.params), strict=True)
    ]
    out = {
        "param_err": max(float(d.max()) for d in diffs),
        "frac_off": sum(int((d > 1e-4).sum()) for d in diffs) / T.num_elements(full),
        "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True) if a == a),
        "losses": losses,
        "ref_losses": ref_losses,
    }
    if "solo" in case:  # the precision change alone: another one-process run against ref
        solo_opt = OPTIMIZERS[case["solo"].get("opt", case["opt"])]
        solo_tx = transforms.skip_nonfinite(_clipped(solo_opt(1e-3), clip))
        solo_bf16 = case["solo"].get("bf16", bf16)
        solo_apply = CastModel(model, torch.bfloat16).apply if solo_bf16 else model.apply
        solo = TrainState.create(T.clone(full), solo_tx.init(full), R.key(1))
        solo_step = make_train_step(
            scaled(make_lm_loss(solo_apply)), solo_tx, microbatches=case["mb"] * world
        )
        for b in data:
            solo, _ = solo_step(solo, b)
        out["solo_err"] = max(
            float((a.double() - b.double()).abs().max())
            for a, b in zip(T.leaves(solo.params), T.leaves(ref.params), strict=True)
        )
    # per-rank memory of the optimizer state (and of the params under ZeRO-3) vs one process
    inner = run.engine.optimizer
    base = getattr(inner, "optimizer", inner)
    state_bytes = sum(
        T.num_bytes(slot["tscale"].tree) for slot in base.state.values() if "tscale" in slot
    )
    out["opt_state_ratio"] = state_bytes / T.num_bytes(ref.opt_state)
    if case["stage"] == 3:
        stored = run.module.named_leaves().values()
        out["param_ratio"] = sum(p.ds_tensor.numel() for p in stored) / T.num_elements(full)
    # every rank ends with the same full params
    check = torch.tensor([sum(float(t.double().sum()) for t in T.leaves(got))], dtype=torch.float64)
    seen = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(seen, check)
    out["ranks_agree"] = all(bool(s == seen[0]) for s in seen)
    return out


CASES = {
    "z0-adamw": {"stage": 0, "opt": "adamw", "mb": 1},
    "z1-adamw-accum": {"stage": 1, "opt": "adamw", "mb": 2},
    "z2-adamw": {"stage": 2, "opt": "adamw", "mb": 1},
    "z3-adamw": {"stage": 3, "opt": "adamw", "mb": 1},
    "z3-adamw-accum-checkpoint": {
        "stage": 3,
        "opt": "adamw",
        "mb": 2,
        "tied": False,
        "checkpoint": True,
    },
    "z2-offload": {"stage": 2, "opt": "adamw", "mb": 1, "offload": "cpu"},
    # no clipping: DeepSpeed's clip rounds differently from tscale's, and Lion's sign amplifies
    # a 1-ulp difference into a flipped update
    "z2-lion": {"stage": 2, "opt": "lion", "mb": 1, "clip": None},
    "z3-lion": {"stage": 3, "opt": "lion", "mb": 1, "clip": None},
    # ZeRO quantises flat partitions, one process each tensor: both against fp32 AdamW
    "z2-adamw_8bit": {
        "stage": 2,
        "opt": "adamw_8bit",
        "mb": 1,
        "ref_opt": "adamw",
        "solo": {"opt": "adamw_8bit"},
    },
    # DeepSpeed's bf16 (bf16 module, fp32 masters) against tscale's param_dtype bf16, and fp32
    # against the same: rounding in bf16 differs with the loss scale and the reduction order
    "z2-bf16": {
        "stage": 2,
        "opt": "adamw",
        "mb": 1,
        "bf16": True,
        "clip": None,
        "solo": {"bf16": False},
    },
    # stage 0's bf16 wrapper steps once with zero gradients while it sets up (not counted)
    "z0-bf16": {
        "stage": 0,
        "opt": "adamw",
        "mb": 1,
        "bf16": True,
        "clip": None,
        "solo": {"bf16": False},
    },
    "z3-bf16": {
        "stage": 3,
        "opt": "adamw",
        "mb": 1,
        "bf16": True,
        "clip": None,
        "solo": {"bf16": False},
    },
    "z2-nan": {"stage": 2, "opt": "adamw", "mb": 1, "poison": True, "clip": None},
    "z3-nan": {"stage": 3, "opt": "adamw", "mb": 1, "poison": True},
}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    results = {name: run_case(CASES[name], rank, world) for name in names}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_without_teardown()
