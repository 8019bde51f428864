"""The parallel model wrappers on 2 gloo ranks: FSDP's gather (the fused loss and decoding over
sharded params, LoRA over a sharded frozen base) and DDP's overlapped all-reduce equal one
process over the full params."""

from __future__ import annotations

import os
import socket
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.grad import value_and_grad
from tscale.losses import make_fused_lm_loss, make_lm_loss
from tscale.models import Transformer, TransformerConfig, generate
from tscale.models.lora import LoraConfig, LoraModel
from tscale.models.protocol import LanguageModel
from tscale.parallel import fsdp
from tscale.parallel.ddp import OverlappedDDP
from tscale.parallel.mesh import plan_parallel
from tscale.testing import assert_trees_close

# 3 query heads, 5 layers' rows that do not split evenly: shards of unequal size.
CFG = TransformerConfig(
    vocab_size=67, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3, num_kv_heads=1
)
LORA = LoraConfig(rank=3, targets=(*LoraConfig().targets, "lm_head"))


def _batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return {"input_ids": ids, "labels": labels}


def _adapters(lm: LoraModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    a = lm.init(R.key(1))
    return a.apply(lambda t: t + 0.2 * torch.randn(t.shape, generator=g))


def _rows(full: torch.Tensor, rank: int) -> torch.Tensor:
    return full.chunk(2)[rank] if full.shape[0] >= 2 else full[:0]


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


def _check(rank: int) -> None:
    mesh = plan_parallel(rank, 2, rank, 1, 2, "cpu").mesh
    model = Transformer(CFG)
    full = model.init(R.key(0))
    both = [_batch(0), _batch(1)]

    # 1. The fused loss over sharded params (loss.fused with dp_shard > 1).
    for reshard in (True, False):
        layout = fsdp.FSDPLayout.of(full, mesh, reshard_after_forward=reshard)
        local = fsdp.local_tree(fsdp.shard_tree(full, mesh))
        sharded = fsdp.ShardedModel(model, layout)
        assert isinstance(sharded, LanguageModel)
        (loss, _), grads = value_and_grad(make_fused_lm_loss(sharded, backend="torch"))(
            local, both[rank]
        )

        def total(p, _):
            sums = [make_lm_loss(model.apply)(p, b)[0] for b in both]
            return sums[0] + sums[1], {}

        (want_total, _), want = value_and_grad(total)(full, None)
        want_mine = make_lm_loss(model.apply)(full, both[rank])[0]
        torch.testing.assert_close(loss, want_mine, rtol=1e-6, atol=1e-5)
        # The reduce-scatter sums both ranks' gradients into this rank's rows.
        assert_trees_close(grads, want.apply(lambda t: _rows(t, rank)), atol=1e-5, rtol=1e-4)
        # The same wrapper gives the plain loss too.
        plain = make_lm_loss(sharded.apply)(local, both[rank])[0]
        torch.testing.assert_close(plain, want_mine, rtol=1e-6, atol=1e-5)

    # Decoding over sharded params: each layer gathered on use, the same tokens.
    kw = {"max_new_tokens": 5, "pad_id": 0}
    prompts = [[3, 4, 5], [7]]
    assert generate(sharded, local, prompts, **kw) == generate(model, full, prompts, **kw)

    # The DDP overlap wrapper: each layer's all-reduce starts in the backward, the fused loss too.
    ddp = OverlappedDDP(None)
    (loss, aux), grads = value_and_grad(make_fused_lm_loss(ddp.wrap(model), backend="torch"))(
        full, both[rank]
    )
    grads, loss_sum, _ = ddp.sync(grads, loss, aux["tokens"])
    assert_trees_close(grads, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_sum, want_total, rtol=1e-6, atol=1e-5)

    # 2. LoRA over a sharded frozen base: the adapters are replicated, the base is sharded.
    lm_full = LoraModel(model=model, base=full, config=LORA)
    adapters = _adapters(lm_full)
    layout = fsdp.FSDPLayout.of(full, mesh)
    base_local = fsdp.local_tree(fsdp.shard_tree(full, mesh))
    lm = fsdp.ShardedModel(LoraModel(model=model, config=LORA), layout, tree="base")
    frozen = {"base": base_local}
    for make in (lambda m: make_fused_lm_loss(m, backend="torch"), lambda m: make_lm_loss(m.apply)):
        (loss, _), grads = value_and_grad(make(lm))(adapters, both[rank], frozen=frozen)
        want_loss, want = value_and_grad(make(lm_full))(adapters, both[rank])
        torch.testing.assert_close(loss, want_loss[0], rtol=1e-6, atol=1e-5)
        assert_trees_close(grads, want, atol=1e-5, rtol=1e-4)  # this rank's batch, no sync
    # Frozen means frozen: the stored shards get no gradient and are not written.
    assert all(not t.requires_grad for t in T.leaves(base_local))
    _check_memory(rank, model, full, adapters, both[rank], mesh)


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in T.leaves(tree))


def _check_memory(rank, model, full, adapters, batch, mesh) -> None:
    """Per-rank memory of LoRA over a sharded base: each rank stores its rows of the base, and
    after the forward (before the backward) no gathered layer weight is alive under
    ``reshard_after_forward`` — LoRA's adoption of the gathered weights keeps none of them."""
    base_local = fsdp.local_tree(fsdp.shard_tree(full, mesh))
    assert _nbytes(base_local) <= _nbytes(full) // 2 + 4 * CFG.hidden_size * 4  # its rows only
    adapters = adapters.apply(lambda t: t.detach().requires_grad_())  # a graph to keep
    alive = {}
    for reshard in (True, False):
        layout = fsdp.FSDPLayout.of(full, mesh, reshard_after_forward=reshard)
        lm = fsdp.ShardedModel(LoraModel(model=model, config=LORA), layout, tree="base")
        record: list[tuple[weakref.ref, int]] = []
        real = fsdp.make_gather

        def tracking(layout, plans, regather=None, real=real, record=record):
            gather = real(layout, plans, regather)

            def run(group):
                out = gather(group)
                if any(".mlp." in f".{k}" for k in T.leaf_keys(group)):  # a layer, not the root
                    record.extend(
                        (weakref.ref(t), t.numel() * t.element_size()) for t in T.leaves(out)
                    )
                return out

            return run

        fsdp.make_gather = tracking
        try:
            loss, _ = make_fused_lm_loss(lm, backend="torch")(
                adapters, batch, frozen={"base": base_local}
            )
        finally:
            fsdp.make_gather = real
        alive[reshard] = sum(n for ref, n in record if ref() is not None)
        layers = sum(n for _, n in record)
        assert layers > 0
        loss.backward()  # the backward re-gathers what it needs
    assert alive[True] == 0, alive  # nothing of the layers kept between forward and backward
    # The measurement sees what the backward keeps without resharding: every gathered layer
    # weight but layer 0's q/k/v projections and input norm (their input, the embedding, needs
    # no gradient, so autograd saves no weight there).
    first = full["model", "layers", "0"]
    unsaved = _nbytes(first["self_attn"].select("q_proj", "k_proj", "v_proj"))
    unsaved += _nbytes(first["input_layernorm"])
    assert alive[False] == layers - unsaved > 0, (alive, layers, unsaved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_model_fused_loss_and_lora_over_a_sharded_base_on_two_ranks():
    mp.start_processes(_worker, args=(_free_port(),), nprocs=2, join=True, start_method="spawn")
