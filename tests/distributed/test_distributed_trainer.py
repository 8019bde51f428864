"""`tscale train` under torchrun (2 gloo ranks): DDP and FSDP follow the one-process run, sharded
checkpoints resume on 1 and on 2 ranks with identical losses, and export to one HF directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# `make test` runs pytest with --dist loadfile: one worker runs this module, so its module-scoped
# launches are shared by its tests (pytest 9.2 broke xdist 3.8's loadgroup marks)

FSDP = ["parallel.dp_shard=-1", "parallel.dp_replicate=1"]
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
TASK = ["task.type=confidence_penalty_task:ConfidencePenaltySFT", "task.beta=0.5"]
STREAM = ["data.streaming=true", "data.packing.enabled=true"]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, torchrun, tscale_main, tiny_run
) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trainer")
    out: dict[str, Path] = {}
    cfg, out["single"] = tiny_run.config(tmp, "single")
    tscale_main(["train", str(cfg)])
    cfg, out["ddp"] = tiny_run.config(tmp, "ddp")
    torchrun(["-m", "tscale.cli", "train", str(cfg)])
    cfg, out["fsdp"] = tiny_run.config(tmp, "fsdp")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *FSDP])
    cfg, out["ddp-overlap"] = tiny_run.config(tmp, "ddp-overlap")
    torchrun(["-m", "tscale.cli", "train", str(cfg), "parallel.overlap_reduce=true"])
    cfg, out["stream-single"] = tiny_run.config(tmp, "stream-single")
    tscale_main(["train", str(cfg), *STREAM])
    cfg, out["stream-ddp"] = tiny_run.config(tmp, "stream-ddp")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *STREAM])
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-overlap"])
def test_loss_curve_follows_one_process(runs: dict[str, Path], mode: str, tiny_run):
    single, got = tiny_run.losses(runs["single"]), tiny_run.losses(runs[mode])
    assert sorted(got) == list(range(1, 11))
    for step, loss in single.items():
        assert abs(got[step] - loss) <= 1e-5, (step, got[step], loss)


def test_only_rank_zero_writes_run_files(runs: dict[str, Path]):
    rows = (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == 10  # one writer, no duplicated rows
    ckpt = runs["fsdp"] / "checkpoints" / "step_00000005"
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["sharded"] and meta["world_size"] == 2
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert not list((runs["fsdp"] / "checkpoints").glob(".tmp-*"))


def test_sharded_checkpoint_resumes_on_one_rank(runs: dict[str, Path], tscale_main, tiny_run):
    cfg, out = tiny_run.config(runs["tmp"], "resume21")
    ckpt = runs["fsdp"] / "checkpoints" / "step_00000005"
    tscale_main(["train", str(cfg), "--resume", str(ckpt)])
    got, ref = tiny_run.losses(out), tiny_run.losses(runs["fsdp"])
    assert sorted(got) == [6, 7, 8, 9, 10]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_one_rank_checkpoint_resumes_sharded_on_two(runs: dict[str, Path], torchrun, tiny_run):
    cfg, out = tiny_run.config(runs["tmp"], "resume12")
    ckpt = runs["single"] / "checkpoints" / "step_00000005"
    torchrun(["-m", "tscale.cli", "train", str(cfg), "--resume", str(ckpt), *FSDP])
    got, ref = tiny_run.losses(out), tiny_run.losses(runs["single"])
    assert sorted(got) == [6, 7, 8, 9, 10]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


def test_sharded_checkpoint_exports_one_hf_directory(runs: dict[str, Path], tscale_main):
    transformers = pytest.importorskip("transformers")
    hf = runs["tmp"] / "hf"
    tscale_main(["export", str(runs["fsdp"]), str(hf)])
    exported = load_file(str(hf / "model.safetensors"))
    single = load_file(str(runs["single"] / "checkpoints" / "step_00000010" / "params.safetensors"))
    for name, t in exported.items():
        assert torch.allclose(t, single[name], atol=1e-5), name
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(model(ids).logits).all()


def test_streaming_under_torchrun_follows_one_process(runs: dict[str, Path], tiny_run):
    single, got = tiny_run.rows(runs["stream-single"]), tiny_run.rows(runs["stream-ddp"])
    assert sorted(got) == list(range(1, 11))
    for step, row in single.items():
        assert abs(got[step]["loss"] - row["loss"]) <= 1e-5, (step, got[step], row)
        # input_tokens counts every rank's rows, like one process
        assert got[step]["input_tokens"] == row["input_tokens"], (step, got[step], row)


def test_streaming_cursor_resumes_on_one_process(runs: dict[str, Path], tscale_main, tiny_run):
    cfg, out = tiny_run.config(runs["tmp"], "stream-resume21")
    ckpt = runs["stream-ddp"] / "checkpoints" / "step_00000005"
    tscale_main(["train", str(cfg), "--resume", str(ckpt), *STREAM])
    got, ref = tiny_run.losses(out), tiny_run.losses(runs["stream-ddp"])
    assert sorted(got) == [6, 7, 8, 9, 10]
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])


def test_a_tasks_own_metrics_are_reduced_over_ranks(
    runs: dict[str, Path], torchrun, tscale_cli, tiny_run, monkeypatch: pytest.MonkeyPatch
):
    """The docs/tasks.md task logs weighted means (ce, entropy): under DDP each is reduced over
    the ranks as it declares, so the rows equal one process on the global batch."""
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    cfg, one = tiny_run.config(runs["tmp"], "task-single")
    tscale_cli(["train", str(cfg), *TASK])
    cfg, two = tiny_run.config(runs["tmp"], "task-ddp")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *TASK])
    rows = [
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"ce"' in x]
        for run in (one, two)
    ]
    assert len(rows[0]) == len(rows[1]) == 10
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "ce", "entropy", "tokens"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)


def test_fsdp_with_the_fused_loss_follows_one_process(runs: dict[str, Path], torchrun, tiny_run):
    """Refused before the model wrappers composed: the fused loss takes the sharded model
    (each layer and the head gathered on use) and follows the one-process plain loss."""
    cfg, out = tiny_run.config(runs["tmp"], "fsdp-fused")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *FSDP, "loss.fused=true"])
    single, got = tiny_run.losses(runs["single"]), tiny_run.losses(out)
    assert sorted(got) == list(range(1, 11))
    for step, loss in single.items():
        assert abs(got[step] - loss) <= 1e-4 * max(1.0, abs(loss)), (step, got[step], loss)


def test_sophia_under_ddp_follows_one_process(
    runs: dict[str, Path], torchrun, tscale_main, tiny_run
):
    """Refused before: Sophia-G's Hessian estimate is now reduced over the ranks like the
    gradients, with each rank's uniforms those of its rows in the global batch."""
    sophia = ["optimizer.type=sophia_g", "optimizer.update_every=2"]
    cfg, one = tiny_run.config(runs["tmp"], "sophia-single")
    tscale_main(["train", str(cfg), *sophia])
    cfg, two = tiny_run.config(runs["tmp"], "sophia-ddp")
    torchrun(["-m", "tscale.cli", "train", str(cfg), *sophia])
    single, got = tiny_run.losses(one), tiny_run.losses(two)
    assert sorted(got) == list(range(1, 11))
    for step, loss in single.items():
        assert abs(got[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, got[step], loss)


LORA_FROM_FOLDER = """
run: {{output_dir: {out}, seed: 0, threads: 1}}
model: {{path: {model}}}
data: {{train_files: [{train}], eval_files: [{eval}], batch_size: 8, max_length: 96}}
lora: {{enabled: true, rank: 4}}
optimizer: {{lr: 0.001}}
train: {{max_steps: 6, epochs: null, log_every: 1, save_every: 3, keep_last: 0, progress: false}}
eval: {{num_samples: 2, batch_size: 2, max_new_tokens: 3, num_show: 0}}
log: {{plot: false}}
"""


def test_lora_over_a_sharded_base_follows_one_process(
    runs: dict[str, Path], torchrun, tscale_main, tiny_run
):
    """Refused before: under parallel.dp_shard the LoRA base (a frozen tree loaded from
    model.path) is sharded over the ranks and gathered layer by layer; the adapters stay
    replicated and are reduced as under DDP. The run follows one process, evaluates (the base
    gathered whole) and records the base by its folder in every checkpoint."""
    from tscale.testing.hf_folders import chat_records, make_model_folder, write_jsonl

    tmp = runs["tmp"]
    model = make_model_folder(tmp / "lora-base-model", "qwen2")
    train = write_jsonl(chat_records(32, seed=3), tmp / "lora-train.jsonl")
    eval_ = write_jsonl(chat_records(4, seed=4), tmp / "lora-eval.jsonl")
    outs = {}
    for name in ("lora-one", "lora-fsdp"):
        outs[name] = tmp / name
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(
            LORA_FROM_FOLDER.format(out=outs[name], model=model, train=train, eval=eval_)
        )
        if name == "lora-one":
            tscale_main(["train", str(cfg)])
        else:
            torchrun(["-m", "tscale.cli", "train", str(cfg), *FSDP])
    one, two = (tiny_run.rows(outs[n]) for n in ("lora-one", "lora-fsdp"))
    assert sorted(two) == list(range(1, 7))
    for step, row in one.items():
        assert abs(two[step]["loss"] - row["loss"]) <= 1e-5 * max(1.0, row["loss"]), step
    meta = json.loads(
        (outs["lora-fsdp"] / "checkpoints" / "step_00000003" / "state.json").read_text()
    )
    assert meta["frozen"]["base"]["path"] == str(model.resolve())  # recorded, not copied
    evals = [json.loads(x) for x in (outs["lora-fsdp"] / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in evals)
    assert (outs["lora-fsdp"] / "adapter" / "adapter_config.json").is_file()
