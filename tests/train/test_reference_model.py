"""Reference-model strategies (issue 13: several models in one state): a task adds a frozen
copy of the starting weights as the ``reference`` tree (checkpointed by model.path and a
fingerprint) or uses the LoRA base; its KL term to the reference trains and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import pytest
import torch

from tscale import cli
from tscale.core.fields import field
from tscale.core.metrics import mean
from tscale.losses.lm import IGNORE_INDEX, target_labels, token_cross_entropy
from tscale.tasks import TASKS, SFTTask, TaskContext
from tscale.tasks.reference import frozen_copy, lora_base_reference, reference_apply
from tscale.testing.hf_folders import chat_records, make_model_folder, write_jsonl

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli


@attrs.frozen(kw_only=True)
class KLToReference(SFTTask):
    """SFT plus beta * KL(policy || reference) per trained token (the RL-style penalty)."""

    type: Literal["sft_kl_test"] = field("sft_kl_test", "A test task.")
    beta: float = field(0.1, "KL weight.", ge=0.0)
    key_metrics: ClassVar[tuple[str, ...]] = ("kl",)

    def prepare(self, ctx: TaskContext) -> dict[str, Any]:
        return lora_base_reference(ctx) if "base" in ctx.frozen else frozen_copy(ctx)

    def loss(self, ctx: TaskContext):
        apply_fn, ref, beta = ctx.apply_fn, reference_apply(ctx), self.beta

        def loss_fn(params, batch, frozen=None):
            logits = apply_fn(params, batch, frozen=frozen)
            labels = target_labels(batch)
            ce_sum, tokens = token_cross_entropy(logits, labels)
            logp = torch.log_softmax(logits.float(), -1)
            ref_logp = torch.log_softmax(ref(batch, frozen).float(), -1)
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)
            kl_sum = (kl * (labels != IGNORE_INDEX)).sum()
            return ce_sum + beta * kl_sum, {"tokens": tokens, "kl": mean(kl_sum, tokens)}

        return loss_fn


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in task name for this module's tests only (the registry is global)."""
    monkeypatch.setitem(TASKS, "sft_kl_test", KLToReference)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ref")
    return make_model_folder(root / "m", "qwen2"), write_jsonl(chat_records(16), root / "t.jsonl")


def _train(tmp_path: Path, folder: Path, data: Path, name: str, *extra: str) -> Path:
    run = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text("# keys on the command line\n")
    args = [
        f"run.output_dir={run}", f"model.path={folder}", f"data.train_files=[{data}]",
        "task.type=sft_kl_test", "task.beta=0.5", "optimizer.lr=1e-3", "data.batch_size=4",
        "data.max_length=96", "train.max_steps=6", "train.epochs=null", "train.log_every=1",
        "train.save_every=3", "train.keep_last=0", "train.progress=false", "run.threads=1",
        "eval.num_samples=0", NO_PLOT, *extra,
    ]  # fmt: skip
    assert cli.main(["train", str(cfg), *args]) == 0
    return run


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-base"])
def test_kl_to_the_reference_trains_and_resumes_exactly(tmp_path, setup, lora) -> None:
    folder, data = setup
    extra = ["lora.enabled=true", "lora.rank=4"] if lora else []
    run = _train(tmp_path, folder, data, "full", *extra)
    rows = _rows(run)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert rows[-1]["kl"] > 1e-6  # and moves away from it
    meta = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())
    name = "base" if lora else "reference"
    assert meta["frozen"][name]["path"] == str(folder.resolve())  # recorded, not copied
    assert not list((run / "checkpoints" / "step_00000003").glob("frozen.*"))
    # resume from step 3: the reference is rebuilt from the folder, fingerprint checked
    resumed = tmp_path / "resumed"
    shutil.copytree(
        run / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003"
    )
    _train(tmp_path, folder, data, "resumed", *extra, "--resume")
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in rows[3:]]
