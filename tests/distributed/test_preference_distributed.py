"""Preference tasks under torchrun (2 gloo ranks on CPU) follow one process on the same global
batch — per-step loss, ``rewards/*``, ``logps/*`` and KTO's ``kl`` within 1e-5: DPO and KTO
(whose ``z₀`` is all-reduced in the rollout stage) under DDP and FSDP (the reference a
replicated copy; KTO's rollout and TR-DPO's reference sync gather the sharded policy whole),
and with LoRA over a sharded base (the base is the reference: its forward runs the shards
through the step's per-layer gather)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tscale.testing.hf_folders import make_model_folder
from tscale.testing.preference import write_pairs
from tscale.testing.runs import step_rows

pytestmark = pytest.mark.slow  # 12 launches of `tscale train`, ~2-3 min on 2 CPU cores

# `make test` runs pytest with --dist loadfile: one worker runs this module, so its module-scoped
# launches are shared by its tests

FSDP = ["parallel.dp_shard=-1", "parallel.dp_replicate=1"]
STEPS = 3
COMPARED = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
)
KTO_COMPARED = ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm")
LN2 = 0.6931471805599453


def _config(tmp: Path, name: str, *, unpaired: bool, lora: bool = False) -> tuple[list[str], Path]:
    """The ``tscale train`` arguments of a tiny preference run, and its run directory."""
    data = tmp / ("kto.jsonl" if unpaired else "pairs.jsonl")
    if not data.exists():
        write_pairs(data, 64, 0, unpaired=unpaired)
    out = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text("run: {seed: 0}\n")
    if lora:  # a tiny HF folder: the base sharded under FSDP is loaded from model.path
        folder = tmp / "hf-model"
        if not folder.exists():
            make_model_folder(folder, "qwen2")
        model = [f"model.path={folder}", "data.max_length=96", "train.epochs=null"]
        model += ["lora.enabled=true", "lora.rank=4", "optimizer.lr=0.001"]
    else:
        model = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2"]
        model += ["model.num_heads=2", "model.max_position_embeddings=64"]
        model += ["data.tokenizer.vocab_size=300", "data.max_length=48", "optimizer.lr=0.003"]
    args = [
        "train",
        str(cfg),
        f"run.output_dir={out}",
        "run.threads=1",
        f"data.train_files=[{data}]",
        "data.batch_size=8",
        "scheduler.warmup_steps=0",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.save_every=0",
        "train.progress=false",
        "eval.num_samples=0",
        "log.plot=false",
        *model,
    ]
    return args, out


SYNC = ["task.sync_ref_model=true", "task.ref_model_sync_steps=1", "task.ref_model_mixup_alpha=0.5"]
KINDS = {  # name: (task overrides, the task, LoRA over a HF folder)
    "dpo": (["task.type=dpo"], "dpo", False),
    "kto": (["task.type=kto"], "kto", False),
    "dpo-sync": (["task.type=dpo", *SYNC], "dpo", False),
    "dpo-lora": (["task.type=dpo"], "dpo", True),
}
# a few launches only (the suite's time): DDP and FSDP for DPO; FSDP (which all-reduces z₀ as
# DDP does) for KTO; the sharded LoRA base and TR-DPO's sync under FSDP
RUNS = [
    (kind, mode)
    for kind in KINDS
    for mode in (("one", "ddp", "fsdp") if kind == "dpo" else ("one", "fsdp"))
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, torchrun, tscale_main) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("pref")
    out: dict[str, list] = {}
    for kind, mode in RUNS:
        overrides, task, lora = KINDS[kind]
        name = f"{kind}-{mode}"
        args, run = _config(tmp, name, unpaired=task == "kto", lora=lora)
        if mode == "one":
            tscale_main([*args, *overrides])
        else:
            torchrun(["-m", "tscale.cli", *args, *overrides, *(FSDP if mode == "fsdp" else [])])
        out[name] = step_rows(run)
    return out


def _assert_follows(one: list[dict], got: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for a, b in zip(one, got, strict=True):
        assert b["tokens"] == a["tokens"], (a["step"], a["tokens"], b["tokens"])
        for key in keys:
            assert abs(b[key] - a[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a, b)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_follows_one_process(runs: dict[str, list], mode: str):
    one = runs["dpo-one"]
    assert abs(one[0]["loss"] - LN2) <= 1e-6  # the reference is the start
    _assert_follows(one, runs[f"dpo-{mode}"], COMPARED)


@pytest.mark.parametrize("mode", ["fsdp"])
def test_kto_follows_one_process_with_the_global_kl(runs: dict[str, list], mode: str):
    """``kl`` (z₀) is all-reduced over the ranks before the step: the same value as one process
    on the global batch, and so the same losses."""
    one = runs["kto-one"]
    assert abs(one[0]["loss"] - 0.5) <= 1e-6 and one[0]["kl"] == 0.0  # policy == reference
    assert any(r["kl"] > 0 for r in one[1:])  # z₀ moves off 0 once the policy does
    _assert_follows(one, runs[f"kto-{mode}"], KTO_COMPARED)


def test_dpo_over_a_sharded_lora_base_follows_one_process(runs: dict[str, list]):
    """The LoRA base is the reference and is sharded: the reference forward gathers it layer
    by layer as the policy's does (before: this rank's shards ran as whole weights)."""
    one = runs["dpo-lora-one"]
    assert abs(one[0]["loss"] - LN2) <= 1e-6
    _assert_follows(one, runs["dpo-lora-fsdp"], COMPARED)


def test_tr_dpo_reference_sync_under_fsdp_follows_one_process(runs: dict[str, list]):
    """TR-DPO moves the (replicated) reference toward the policy every step: under FSDP the
    policy's shards are gathered whole for it (before: a DTensor/Tensor mix failed)."""
    one = runs["dpo-sync-one"]
    assert one[2]["loss"] != runs["dpo-one"][2]["loss"]  # the synced reference shows by step 3
    _assert_follows(one, runs["dpo-sync-fsdp"], COMPARED)
