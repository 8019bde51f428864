"""DeepSpeed's engine (ZeRO 0-3) on real gloo processes: equal to one tscale process on the same
global batch, through the trainer too (curves, resume, export), with clear errors for what it
does not do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensordict import TensorDict

from tscale.checkpoint import load_checkpoint
from tscale.checkpoint.sharded import load_deepspeed
from tscale.config.load import load_config
from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.errors import CheckpointError, ConfigError
from tscale.parallel.deepspeed_engine import deepspeed_config
from tscale.train import distributed

pytest.importorskip("deepspeed")

# `make test` runs pytest with --dist loadfile: one worker runs this module, so its module-scoped
# launches are shared by its tests (pytest 9.2 broke xdist 3.8's loadgroup marks)

WORKER = str(Path(__file__).resolve().parent / "_deepspeed_worker.py")


def _deepspeed_launcher(args: list[str]) -> None:
    """``deepspeed --num_gpus 2 ARGS`` (on CPU it starts 2 processes and passes --local_rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    cmd += ["--master_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    if proc.returncode != 0:
        pytest.fail(
            f"deepspeed launcher failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
        )


def _ds(stage: int) -> list[str]:
    return ["parallel.deepspeed.enabled=true", f"parallel.deepspeed.zero_stage={stage}"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, torchrun) -> dict:
    out = tmp_path_factory.mktemp("ds-eq") / "results.json"
    torchrun([WORKER, str(out)], nproc=2)  # one launch for every case
    return json.loads(Path(out).read_text())


FP32 = [
    "z0-adamw",
    "z1-adamw-accum",
    "z2-adamw",
    "z3-adamw",
    "z3-adamw-accum-checkpoint",
    "z2-offload",
    "z2-nan",
    "z3-nan",
]


@pytest.mark.parametrize("case", FP32)
def test_zero_stages_equal_one_process(cases: dict, case: str):
    r = cases[case]
    # DeepSpeed averages over ranks, so the loss is scaled by world/tokens before the backward
    # and every gradient element rounds differently from one process's division after it; Adam
    # magnifies that on elements with a tiny second moment (measured up to 1.07e-5)
    assert r["param_err"] <= 2e-5, r
    assert r["loss_err"] <= 1e-5, r
    assert r["ranks_agree"]


def test_nonfinite_step_is_skipped_on_every_rank(cases: dict):
    # rank 1's share of step 4 has NaN gradients: the loss is NaN there, the params are not
    for case in ("z2-nan", "z3-nan"):
        losses = cases[case]["losses"]
        assert losses[3] != losses[3], losses
        assert all(x == x for i, x in enumerate(losses) if i != 3), losses


@pytest.mark.parametrize("case", ["z2-lion", "z3-lion"])
def test_lion_is_bit_equal(cases: dict, case: str):
    # without clipping each rank's gradient partition is bit-equal to one process's
    assert cases[case]["param_err"] == 0.0, cases[case]


@pytest.mark.parametrize("case", ["z2-adamw_8bit", "z0-bf16", "z2-bf16", "z3-bf16"])
def test_reduced_precision_within_its_own_noise(cases: dict, case: str):
    r = cases[case]
    # no further from the reference than twice the precision change alone moves one process
    # (8-bit: one-process 8-bit vs fp32 AdamW; bf16: fp32 vs tscale's bf16 param_dtype)
    assert r["param_err"] <= 2 * r["solo_err"], r
    assert r["loss_err"] <= 2e-3, r


@pytest.mark.parametrize("case", ["z1-adamw-accum", "z2-adamw", "z3-adamw", "z2-offload"])
def test_zero_partitions_the_optimizer_state(cases: dict, case: str):
    assert cases[case]["opt_state_ratio"] <= 0.55, cases[case]
    assert cases["z0-adamw"]["opt_state_ratio"] >= 0.99  # stage 0 replicates it


def test_zero3_partitions_the_params(cases: dict):
    for case in ("z3-adamw", "z3-adamw-accum-checkpoint", "z3-lion"):
        assert cases[case]["param_ratio"] <= 0.55, cases[case]


# --------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, torchrun, tscale_cli, tscale_main, tiny_run
) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ds-trainer")
    out: dict[str, Path] = {"tmp": tmp}
    cfg, out["single"] = tiny_run.config(tmp, "single")
    tscale_main(["train", str(cfg)])
    for stage in (2, 3):
        cfg, out[f"z{stage}"] = tiny_run.config(tmp, f"z{stage}")
        torchrun(["-m", "tscale.cli", "train", str(cfg), *_ds(stage)])
    cfg, out["z2-one"] = tiny_run.config(tmp, "z2-one")  # DeepSpeed in one process
    tscale_cli(["train", str(cfg), *_ds(2)])
    cfg, out["launcher"] = tiny_run.config(
        tmp, "launcher"
    )  # DeepSpeed's own launcher, not torchrun
    _deepspeed_launcher(["--module", "tscale.cli", "train", str(cfg), *_ds(2)])
    lora = ["lora.enabled=true", "train.save_every=0"]  # adapters only: no root params
    cfg, out["lora-single"] = tiny_run.config(tmp, "lora-single")
    tscale_main(["train", str(cfg), *lora])
    cfg, out["lora-z2"] = tiny_run.config(tmp, "lora-z2")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *lora, *_ds(2)])
    return out


@pytest.mark.parametrize("name", ["z2", "z3", "z2-one", "launcher"])
def test_trainer_curve_follows_one_process(runs: dict[str, Path], name: str, tiny_run):
    single, got = tiny_run.losses(runs["single"]), tiny_run.losses(runs[name])
    assert sorted(got) == list(range(1, 11))
    for step, loss in single.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)


def test_lora_adapters_train_under_zero2(runs: dict[str, Path], tiny_run):
    single, got = tiny_run.losses(runs["lora-single"]), tiny_run.losses(runs["lora-z2"])
    assert sorted(got) == list(range(1, 11))
    for step, loss in single.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)
    assert (runs["lora-z2"] / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_holds_partitions_and_full_params(runs: dict[str, Path]):
    ckpt = runs["z3"] / "checkpoints" / "step_00000005"
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["deepspeed"] == {"world_size": 2, "zero_stage": 3}
    engine = sorted(p.name for p in (ckpt / "deepspeed" / "engine").iterdir())
    assert [n for n in engine if "optim_states" in n] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    params = load_file(str(ckpt / "params.safetensors"))
    single = load_file(str(runs["single"] / "checkpoints" / "step_00000005" / "params.safetensors"))
    assert params.keys() == single.keys()
    for name, t in params.items():
        assert torch.allclose(t, single[name], atol=1e-5), name


def test_resume_continues_with_identical_losses(runs: dict[str, Path], torchrun, tiny_run):
    cfg, out = tiny_run.config(runs["tmp"], "resume-z3")
    ckpt = runs["z3"] / "checkpoints" / "step_00000005"
    torchrun(["-m", "tscale.cli", "train", str(cfg), "--resume", str(ckpt), *_ds(3)])
    got, ref = tiny_run.losses(out), tiny_run.losses(runs["z3"])
    assert sorted(got) == [6, 7, 8, 9, 10]
    for step in got:
        assert got[step] == ref[step], (step, got[step], ref[step])


def _template(ckpt: Path) -> TrainState:
    params = T.unflatten(load_file(str(ckpt / "params.safetensors")))
    return TrainState.create(params, TensorDict(), R.key(0))


def _never(directory: Path) -> None:
    raise AssertionError(f"the engine was asked to load {directory}")


def test_resume_elsewhere_is_a_clear_error(runs: dict[str, Path]):
    ckpt = runs["z2"] / "checkpoints" / "step_00000005"
    template = _template(ckpt)
    with pytest.raises(CheckpointError, match=r"resume it with parallel\.deepspeed\.enabled on 2"):
        load_checkpoint(ckpt, template)  # a run without DeepSpeed
    for meta, key in (
        ({"world_size": 1, "zero_stage": 2}, "world_size"),
        ({"world_size": 2, "zero_stage": 3}, "zero_stage"),
    ):
        with pytest.raises(CheckpointError, match=f"resume with the same {key}"):
            load_deepspeed(ckpt, template, load_engine=_never, engine_meta=meta)
    plain = runs["single"] / "checkpoints" / "step_00000005"
    with pytest.raises(CheckpointError, match="not written by a DeepSpeed run"):
        load_deepspeed(plain, template, load_engine=_never, engine_meta={})


def test_export_gives_one_hf_directory(runs: dict[str, Path], tscale_cli):
    transformers = pytest.importorskip("transformers")
    hf = runs["tmp"] / "hf-z3"
    tscale_cli(["export", str(runs["z3"]), str(hf)])
    exported = load_file(str(hf / "model.safetensors"))
    single = load_file(str(runs["single"] / "checkpoints" / "step_00000010" / "params.safetensors"))
    for name, t in exported.items():
        assert torch.allclose(t, single[name], atol=1e-5), name
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 13]])).logits).all()


# ------------------------------------------------------------------------- errors, no processes


def _cfg(tiny_run, tmp_path: Path, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_run.yaml.format(out=tmp_path / "run"))
    return load_config(path, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.dp_shard=2"], "parallel.dp_replicate / parallel.dp_shard do not apply"),
        (["optimizer.type=sophia_g"], "optimizer.type=sophia_g does not run under"),
        (["optimizer.type=muon"], "needs whole named tensors"),
        (["optimizer.type=prodigy", "parallel.deepspeed.zero_stage=0"], "use adamw, adamw_8bit"),
        (["parallel.deepspeed.zero_stage=3", "lora.enabled=true"], "zero_stage: 3 does not"),
        (["parallel.deepspeed.offload_param=cpu"], "offload_param needs"),
        (["parallel.deepspeed.zero_stage=0", "parallel.deepspeed.offload_optimizer=cpu"], ">= 1"),
        (["train.compile=true"], "train.compile does not combine with parallel.deepspeed"),
    ],
)
def test_unsupported_combinations_name_the_keys(tmp_path: Path, overrides, message, tiny_run):
    cfg = _cfg(tiny_run, tmp_path, "parallel.deepspeed.enabled=true", *overrides)
    with pytest.raises(ConfigError, match=message):
        distributed.setup(cfg, torch.device("cpu"))


def test_raw_config_cannot_override_what_tscale_sets():
    base = dict(
        global_batch=16,
        world_size=2,
        microbatches=2,
        zero_stage=2,
        max_grad_norm=None,
        bf16=False,
        reduce_dtype=torch.float32,
    )
    conf = deepspeed_config(**base, extra={"zero_optimization": {"overlap_comm": True}})
    assert conf["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 0.0  # DeepSpeed's own default would clip at 1.0
    for extra, key in (
        ({"gradient_clipping": 1.0}, "optimizer.max_grad_norm"),
        ({"zero_optimization": {"stage": 3}}, "parallel.deepspeed.zero_stage"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ):
        with pytest.raises(ValueError, match=key):
            deepspeed_config(**base, extra=extra)


def test_docs_yaml_blocks_load(tmp_path: Path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    deepspeed_blocks = [b for b in blocks if "deepspeed:" in b]
    assert deepspeed_blocks
    for block in blocks:
        path = tmp_path / "block.yaml"
        path.write_text(block)
        cfg = load_config(path)
        if "deepspeed:" in block:
            assert cfg.parallel.deepspeed.enabled
            assert deepspeed_config(
                global_batch=8,
                world_size=2,
                microbatches=1,
                zero_stage=cfg.parallel.deepspeed.zero_stage,
                max_grad_norm=1.0,
                bf16=False,
                reduce_dtype=torch.float32,
                extra=cfg.parallel.deepspeed.config,
            )["zero_optimization"]["overlap_comm"]
