"""Run under torchrun (2 ranks, gloo): a reward model's steps under FSDP and DDP equal one
process on the global batch; rank 0 writes the largest differences to ``sys.argv[1]``."""

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
from tscale.models.reward import RewardHead, RewardModel
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim.alias import adamw
from tscale.parallel import ddp, fsdp
from tscale.parallel.mesh import plan_parallel
from tscale.step.compose import make_train_step
from tscale.tasks.reward import make_reward_loss

STEPS, B, S, V = 3, 8, 32, 64


def batches() -> list[TensorDict]:
    """Rows of 1-2 groups (shared-prompt layout); one row per rank holds a group without its
    rejected side, so ranks have uneven pair counts."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        fields = {k: torch.zeros((B, S), dtype=torch.int64) for k in ("input_ids", "doc_ids")}
        fields["branch_ids"] = torch.zeros((B, S), dtype=torch.int64)
        fields["position_ids"] = torch.zeros((B, S), dtype=torch.int64)
        for r in range(B):
            t = 0
            for d in (1, 2) if r % 2 else (1,):
                p, c, k = 3, 4, 5
                n = p + c + (0 if r == 3 and d == 1 else 1 + k)
                fields["input_ids"][r, t : t + n] = torch.randint(3, V, (n,), generator=g)
                fields["doc_ids"][r, t : t + n] = d
                fields["branch_ids"][r, t + p - 1 : t + p + c] = 1
                fields["branch_ids"][r, t + p + c : t + n] = 2
                fields["position_ids"][r, t : t + p + c] = torch.arange(p + c)
                if n > p + c:
                    fields["position_ids"][r, t + p + c : t + n] = torch.arange(p - 1, p + k)
                t += n
        out.append(TensorDict(fields, [B]))
    return out


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = TransformerConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = RewardModel(Transformer(config), RewardHead.of(config))
    full = model.init(R.key(0))
    data = batches()
    tx = adamw(1e-2)

    ref = TrainState.create(T.clone(full), tx.init(full), R.key(1))
    ref_step = make_train_step(make_reward_loss(model.apply), tx, microbatches=world)
    ref_losses, ref_acc = [], []
    for b in data:
        ref, m = ref_step(ref, b)
        ref_losses.append(float(m["loss"]))
        ref_acc.append(float(m["accuracy"]))

    mine = [b[rank * B // world : (rank + 1) * B // world] for b in data]
    results = {}
    for case in ("fsdp", "ddp", "ddp-overlap"):
        plan = plan_parallel(
            rank, world, rank, *((1, world) if case == "fsdp" else (world, 1)), "cpu"
        )
        if case == "fsdp":
            layout = fsdp.FSDPLayout.of(full, plan.mesh, reduce_dtype=torch.float32)
            params = fsdp.shard_tree(full, plan.mesh)
            opt = fsdp.shard_opt_state(tx.init(fsdp.local_tree(params)), params, plan.mesh)
            state = TrainState.create(params, opt, R.key(1))
            step = fsdp.wrap_fsdp_step(
                make_train_step(
                    make_reward_loss(fsdp.ShardedModel(model, layout).apply),
                    tx,
                    grad_sync=fsdp.make_fsdp_sync(None),
                    grad_norm=fsdp.sharded_norm(layout),
                    metric_sync=ddp.make_metric_sync(None),
                )
            )
        elif case == "ddp-overlap":  # each group's all-reduce starts in the backward
            state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
            overlapped = ddp.OverlappedDDP(None)
            step = make_train_step(
                make_reward_loss(overlapped.wrap(model).apply),
                tx,
                grad_sync=overlapped.sync,
                metric_sync=ddp.make_metric_sync(None),
            )
        else:
            state = TrainState.create(T.clone(full), tx.init(full), R.key(1))
            step = make_train_step(
                make_reward_loss(model.apply),
                tx,
                grad_sync=ddp.make_ddp_sync(None),
                metric_sync=ddp.make_metric_sync(None),
            )
        losses, acc = [], []
        for b in mine:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
            acc.append(float(m["accuracy"]))
        got = fsdp.full_tree(state.params) if case == "fsdp" else state.params
        results[case] = {
            "param_err": max(
                float((a.double() - b.double()).abs().max())
                for a, b in zip(T.leaves(got), T.leaves(ref.params), strict=True)
            ),
            "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "acc_err": max(abs(a - b) for a, b in zip(acc, ref_acc, strict=True)),
            "score_moved": float(
                (T.flatten(got)["score.weight"] - full["score", "weight"]).abs().max()
            ),
        }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_without_teardown()
