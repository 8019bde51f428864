"""``task.reference: precomputed`` (issue 14, item 3): the reference log-probs computed once
before training equal the frozen copy's step for step; they are cached beside the processed
data (a second run skips the pass, a changed reference misses); microbatches, eval and resume
agree; streaming is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tscale.cli import main
from tscale.data.loader import BatchLoader, batch_iter
from tscale.losses.sequence import sequence_logps, sequence_sums, token_logps
from tscale.testing.hf_folders import make_model_folder
from tscale.testing.preference import write_pairs

COMPUTED = "reference log-probs: computed in"
CACHED = "reference log-probs: cached ("


def run_dpo(
    tmp: Path, name: str, *overrides: str, steps: int = 4, model: tuple[str, ...] | None = None
) -> tuple[list[dict], list[dict]]:
    """A tiny DPO run through ``tscale train``; its step rows and its eval rows. Every run in
    ``tmp`` shares one processed-data cache (``data.cache_dir``)."""
    train, held = tmp / "train.jsonl", tmp / "eval.jsonl"
    if not train.exists():  # written once: the data cache key covers the files' mtimes
        write_pairs(train, 64, 0)
        write_pairs(held, 8, 1)
    out = tmp / name
    cfg = tmp / "dpo.yaml"
    cfg.write_text("run: {seed: 0}\n")
    resume = [a for a in overrides if a == "--resume"]
    overrides = tuple(a for a in overrides if a != "--resume")
    tiny = (
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
        "model.num_heads=2", "model.max_position_embeddings=64", "data.tokenizer.vocab_size=300",
    )  # fmt: skip
    args = [
        "train", str(cfg), f"run.output_dir={out}", "run.seed=0", "run.threads=1",
        *(tiny if model is None else model),
        f"data.train_files=[{train}]", f"data.eval_files=[{held}]",
        f"data.cache_dir={tmp / 'cache'}",
        "data.batch_size=8", "data.max_length=48", "task.type=dpo", "optimizer.lr=0.003",
        "scheduler.warmup_steps=0", f"train.max_steps={steps}", "train.log_every=1",
        f"train.eval_every={steps}", "train.progress=false", "eval.num_samples=0",
        "eval.batch_size=4", *overrides, *resume,
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "loss" in r and not any(k.startswith("eval/") for k in r)]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return steps_, evals


def assert_rows_close(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        keys = [k for k, v in x.items() if isinstance(v, float) and k not in ("time", "tok_per_s")]
        keys = [k for k in keys if not k.endswith(("_s", "/s", "seconds", "time"))]
        assert keys
        for k in keys:
            assert y[k] == pytest.approx(x[k], abs=tol, rel=tol), (k, x[k], y[k])


def test_precomputed_equals_the_frozen_copy_step_for_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy, copy_eval = run_dpo(tmp_path, "copy", "task.reference=copy")
    pre, pre_eval = run_dpo(tmp_path, "pre", "task.reference=precomputed")
    assert COMPUTED in capsys.readouterr().out
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert pre[-1]["loss"] != pre[0]["loss"]
    assert_rows_close(copy, pre)
    assert "eval/rewards/margins" in pre_eval[-1]
    assert_rows_close(copy_eval, pre_eval)


def test_microbatches_do_not_change_a_precomputed_run(tmp_path: Path) -> None:
    one, one_eval = run_dpo(tmp_path, "one", "task.reference=precomputed")
    two, two_eval = run_dpo(tmp_path, "two", "task.reference=precomputed", "train.microbatches=2")
    assert_rows_close(one, two)
    assert_rows_close(one_eval, two_eval)


def test_second_run_reads_the_cache_and_a_changed_seed_misses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, first_eval = run_dpo(tmp_path, "a", "task.reference=precomputed")
    assert COMPUTED in capsys.readouterr().out
    second, second_eval = run_dpo(tmp_path, "b", "task.reference=precomputed")
    out = capsys.readouterr().out
    assert CACHED in out and COMPUTED not in out  # the reference did not run
    assert second == first and second_eval == first_eval  # identical, not close
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 1
    run_dpo(tmp_path, "c", "task.reference=precomputed", "run.seed=1")  # another init
    out = capsys.readouterr().out
    assert COMPUTED in out and CACHED not in out
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 2


def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("task.reference=precomputed", "train.save_every=3")
    whole, _ = run_dpo(tmp_path, "whole", *args, steps=6)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/checkpoints/step_00000003", part / "step_00000003")
    capsys.readouterr()
    resumed, _ = run_dpo(tmp_path, "part", *args, "--resume", steps=6)
    assert CACHED in capsys.readouterr().out
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert resumed == whole[3:]


def test_another_reference_folder_misses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two HF folders with one tokenizer and config (the same data cache key) but other
    weights: the second is a miss, and each run starts at ln 2 against its own reference."""
    a = make_model_folder(tmp_path / "a", "llama3", hidden_size=32, num_layers=1, num_heads=2)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (weights,) = b.glob("*.safetensors")
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(1)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for folder, expect in ((a, COMPUTED), (a, CACHED), (b, COMPUTED)):
        rows, _ = run_dpo(
            tmp_path,
            f"run-{folder.name}-{expect[21:24]}",
            "task.reference=precomputed",
            model=(f"model.path={folder}",),
        )
        assert expect in capsys.readouterr().out, (folder, expect)
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert len(list((tmp_path / "cache").glob("processed-*"))) == 1  # one data key
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 2


def test_lora_base_precomputed_equals_lora_base(tmp_path: Path) -> None:
    lora = ("lora.enabled=true", "lora.rank=4")
    base, base_eval = run_dpo(tmp_path, "base", *lora, "task.reference=lora_base")
    pre, pre_eval = run_dpo(tmp_path, "pre", *lora, "task.reference=precomputed")
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_rows_close(base, pre)
    assert_rows_close(base_eval, pre_eval)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (("data.streaming=true",), "data.streaming makes the rows on the fly"),
        (("task.type=kto",), "not supported by task.type kto"),
    ],
)
def test_refusals_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: tuple[str, ...], says: str
) -> None:
    with pytest.raises(AssertionError):
        run_dpo(tmp_path, "r", "task.reference=precomputed", *overrides)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tscale: error:")]
    assert len(err) == 1 and says in err[0], err


def test_the_loader_carries_a_float_field_aligned_with_the_tokens() -> None:
    rows = [
        {"input_ids": [5, 6, 7], "labels": [6, 7, -100]},
        {"input_ids": [8, 9], "labels": [9, -100]},
    ]
    loader = BatchLoader(rows, 2, seed=0, shuffle=False, pad_id=0, pad_to_multiple_of=4)
    loader.add_field("ref_logps", [[-1.5, -2.0, 0.0], [-0.25, 0.0]])
    batch = next(iter(loader))
    assert batch["ref_logps"].dtype == torch.float32 and batch["input_ids"].dtype == torch.int64
    assert batch["ref_logps"].tolist() == [[-1.5, -2.0, 0.0, 0.0], [-0.25, 0.0, 0.0, 0.0]]
    (evb,) = batch_iter([{**r, "ref_logps": [0.5] * len(r["labels"])} for r in rows], 2, 0, 4)
    assert evb["ref_logps"].tolist() == [[0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]
    with pytest.raises(Exception, match="example 1 has 2 tokens"):
        loader.add_field("ref_logps", [[0.0] * 3, [0.0] * 3])


def test_sequence_sums_of_token_logps_is_sequence_logps() -> None:
    """The policy's sums and the precomputed reference's come from one scatter."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64)
    batch = {
        "labels": torch.tensor([[3, 4, -100, 5, 6, -100], [1, -100, 2, 2, -100, -100]]),
        "doc_ids": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        "branch_ids": torch.tensor([[0, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 0]]),
    }
    direct = sequence_logps(logits, batch, num_branches=2)
    token = token_logps(logits, batch)
    summed = sequence_sums(token.float(), batch, num_branches=2)
    assert torch.equal(direct.counts, summed.counts)
    torch.testing.assert_close(summed.sums, direct.sums.float())
    logp = torch.log_softmax(logits, -1)  # by hand: position 0 is the prompt (branch 0)
    torch.testing.assert_close(direct.sums[0, 0, 0], logp[0, 1, 4])
    torch.testing.assert_close(direct.sums[0, 0, 1], logp[0, 3, 5] + logp[0, 4, 6])
    torch.testing.assert_close(direct.sums[1, 0, 1], logp[1, 2, 2] + logp[1, 3, 2])
    assert direct.counts[:, 0].tolist() == [[1, 2], [1, 2]]
