"""Run under torchrun (2 ranks, gloo): data-parallel steps vs one process on the global batch.

Every rank computes the single-process reference itself (same seed, same global batches), then
the data-parallel run on its share; rank 0 writes the largest differences to ``sys.argv[1]``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from _worker_exit import end_without_teardown
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses.lm import make_lm_loss
from tscale.models.stack import CastModel
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.alias import OPTIMIZERS
from tscale.optim.base import chain
from tscale.optim.transforms import clip_by_global_norm
from tscale.parallel import ddp, fsdp
from tscale.parallel.mesh import plan_parallel
from tscale.step.compose import make_train_step

STEPS, B, S, V = 10, 8, 16, 256


def batches() -> list[TensorDict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(STEPS):
        ids = torch.randint(0, V, (B, S), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # prompts
        labels[i % B] = -100  # a row without trained tokens: uneven token counts per rank
        out.append(TensorDict({"input_ids": ids, "labels": labels}, [B]))
    return out


def tiny_model(case: dict) -> tuple[Transformer, TensorDict]:
    """The 2-layer model of a case (``tied``, ``checkpoint``) and its seed-0 params."""
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=V,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=case.get("tied", True),
        checkpoint_layers=case.get("checkpoint", False),
    )
    model = Transformer(cfg)
    return model, model.init(R.key(0))


def run_case(case: dict, rank: int, world: int) -> dict:
    model, full = tiny_model(case)
    data = batches()
    clip = case.get("clip", 1.0)
    dtype = torch.bfloat16 if case.get("bf16") else None

    def make_tx(norm_fn=None):
        tx = OPTIMIZERS[case["opt"]](case.get("lr", 1e-3))
        return tx if clip is None else chain(clip_by_global_norm(clip, norm_fn=norm_fn), tx)

    # the reference: one process, the global batch, microbatches = world * per-rank microbatches
    tx = make_tx()
    apply = model.apply if dtype is None else CastModel(model, dtype).apply
    ref = TrainState.create(T.clone(full), tx.init(full), R.key(1))
    ref_step = make_train_step(make_lm_loss(apply), tx, microbatches=case["ref_mb"])
    ref_losses = []
    for b in data:
        ref, m = ref_step(ref, b)
        ref_losses.append(float(m["loss"]))

    plan = plan_parallel(rank, world, rank, *case["degrees"], "cpu")
    mine = [b[rank * B // world : (rank + 1) * B // world] for b in data]
    if plan.sharded:
        layout = fsdp.FSDPLayout.of(
            full,
            plan.mesh,
            param_dtype=dtype,
            reduce_dtype=torch.float32,
            reshard_after_forward=case.get("reshard", True),
        )
        tx = make_tx(fsdp.sharded_norm(layout))
        params = fsdp.shard_tree(full, plan.mesh)
        opt = fsdp.shard_opt_state(tx.init(fsdp.local_tree(params)), params, plan.mesh)
        state = TrainState.create(params, opt, R.key(1))
        inner = make_train_step(
            make_lm_loss(fsdp.ShardedModel(model, layout).apply),
            tx,
            microbatches=case["mb"],
            grad_sync=fsdp.make_fsdp_sync(None),
            grad_norm=fsdp.sharded_norm(layout),
        )
        step = fsdp.wrap_fsdp_step(inner)
    elif case.get("overlap"):  # the all-reduce started per layer in the backward
        tx = make_tx()
        state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
        overlapped = ddp.OverlappedDDP(None)
        step = make_train_step(
            make_lm_loss(overlapped.wrap(model).apply),
            tx,
            microbatches=case["mb"],
            grad_sync=overlapped.sync,
        )
    else:
        tx = make_tx()
        state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
        step = make_train_step(
            make_lm_loss(apply), tx, microbatches=case["mb"], grad_sync=ddp.make_ddp_sync(None)
        )
    losses = []
    for b in mine:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    got = fsdp.full_tree(state.params)
    param_err = max(
        float((a.double() - b.double()).abs().max())
        for a, b in zip(T.leaves(got), T.leaves(ref.params), strict=True)
    )
    out = {
        "param_err": param_err,
        "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "losses": losses,
    }
    if plan.sharded:
        local = T.num_bytes(fsdp.local_tree(state.params)) + T.num_bytes(
            fsdp.local_tree(state.opt_state)
        )
        whole = T.num_bytes(ref.params) + T.num_bytes(ref.opt_state)
        out["memory_ratio"] = local / whole
    return out


CASES = {
    "ddp-adamw": {"degrees": (-1, 1), "opt": "adamw", "mb": 1, "ref_mb": 1},
    "ddp-adamw-accum": {"degrees": (-1, 1), "opt": "adamw", "mb": 2, "ref_mb": 2},
    "ddp-adamw_8bit": {"degrees": (-1, 1), "opt": "adamw_8bit", "mb": 1, "ref_mb": 2},
    "ddp-lion": {"degrees": (-1, 1), "opt": "lion", "mb": 2, "ref_mb": 1},
    "ddp-overlap-adamw": {
        "degrees": (-1, 1),
        "opt": "adamw",
        "mb": 1,
        "ref_mb": 1,
        "overlap": True,
    },
    "ddp-overlap-lion": {"degrees": (-1, 1), "opt": "lion", "mb": 1, "ref_mb": 2, "overlap": True},
    "ddp-overlap-untied": {
        "degrees": (-1, 1),
        "opt": "adamw",
        "mb": 1,
        "ref_mb": 1,
        "overlap": True,
        "tied": False,
    },
    "fsdp-adamw": {"degrees": (1, -1), "opt": "adamw", "mb": 1, "ref_mb": 1},
    "fsdp-adamw-accum": {"degrees": (1, -1), "opt": "adamw", "mb": 2, "ref_mb": 4},
    "fsdp-adamw-keep": {
        "degrees": (1, -1),
        "opt": "adamw",
        "mb": 1,
        "ref_mb": 1,
        "reshard": False,
        "tied": False,
    },
    "fsdp-adamw_8bit": {
        "degrees": (1, -1),
        "opt": "adamw_8bit",
        "mb": 1,
        "ref_mb": 2,
        "clip": None,
    },
    "fsdp-lion": {"degrees": (1, -1), "opt": "lion", "mb": 2, "ref_mb": 1},
    # no clip: a 1-ulp difference of the sharded norm would flip bf16 roundings of the params
    "fsdp-bf16": {
        "degrees": (1, -1),
        "opt": "adamw",
        "mb": 1,
        "ref_mb": 2,
        "bf16": True,
        "clip": None,
    },
    "ddp-bf16": {"degrees": (-1, 1), "opt": "adamw", "mb": 1, "ref_mb": 2, "bf16": True},
}
CASES_4 = {  # 4 ranks: 2 replicas x 2 shards
    "hsdp-adamw": {"degrees": (2, 2), "opt": "adamw", "mb": 1, "ref_mb": 1},
    "hsdp-lion": {"degrees": (2, 2), "opt": "lion", "mb": 1, "ref_mb": 4},
}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = CASES if world == 2 else CASES_4
    results = {name: run_case(case, rank, world) for name, case in cases.items()}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_without_teardown()
