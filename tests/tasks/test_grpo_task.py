"""Online RL through `tscale train`: GRPO and RLOO from YAML on a tiny random-init model — the
metrics reach metrics.jsonl, β = 0 has no reference tree, microbatches keep groups whole and
give the step of one batch, the first update's log-probs are the sampler's, resume is exact."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tscale.cli import main
from tscale.config import load_config
from tscale.errors import ConfigError
from tscale.testing.runs import TINY_GRPO_YAML as YAML
from tscale.testing.runs import step_rows
from tscale.train.run import build_run

NO_PLOT = "log.plot=false"  # the end-of-run curves.png (~1 s a run) is checked in test_plot_cli

TIMING = "time/"


def config(tmp: Path) -> Path:
    path = tmp / "grpo.yaml"
    path.write_text(YAML)
    return path


def run_grpo(tmp: Path, name: str, *overrides: str, steps: int = 3) -> list[dict]:
    resume = [a for a in overrides if a == "--resume"]
    rest = [a for a in overrides if a != "--resume"]
    args = [
        "train",
        str(config(tmp)),
        f"run.output_dir={tmp / name}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        NO_PLOT,
        *rest,
        *resume,
    ]
    assert main(args) == 0
    return step_rows(tmp / name)


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def test_tiny_run_logs_every_metric(tmp_path: Path) -> None:
    rows = run_grpo(tmp_path, "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    for key in (
        "reward",
        "reward_std",
        "reward/exact_match",
        "reward/has_letter",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "entropy",
        "logprob_mismatch",
        "time/generation_s",
        "time/rollout_s",
    ):
        assert key in first, key
    assert first["reward/exact_match"] == 0.0  # a random model
    assert 1 <= first["completions/min_length"] <= first["completions/max_length"] <= 8
    # the first update's ratio is π_train / π_sampler: the fp32 contract
    assert first["logprob_mismatch"] <= 1e-5
    assert abs(first["ratio/mean"] - 1.0) <= 1e-5
    # tokens is the dapo normaliser: the completion tokens of 4 prompts x 4 completions
    assert first["tokens"] == round(first["completions/mean_length"] * 16)
    assert any(r["grad_norm"] > 0 for r in rows)  # the has_letter reward has spread
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    evals = [r for r in logged if "eval/exact_match" in r]
    assert evals and "eval/reward" in evals[-1]


def test_beta_zero_needs_no_reference(tmp_path: Path) -> None:
    def frozen(*overrides: str) -> set[str]:
        cfg = load_config(
            str(config(tmp_path)),
            [f"run.output_dir={tmp_path / 'b'}", "train.max_steps=1", *overrides],
        )
        run = build_run(cfg, overwrite=True)
        return set(run.state.frozen or {})

    assert frozen() == set()
    assert frozen("task.beta=0.1") == {"reference"}


def test_beta_reports_kl_from_the_reference(tmp_path: Path) -> None:
    rows = run_grpo(tmp_path, "kl", "task.beta=0.1", steps=3)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert rows[-1]["kl"] > 0.0


def test_microbatches_give_the_same_step(tmp_path: Path) -> None:
    for loss_type in ("dapo", "grpo"):
        one = run_grpo(tmp_path, f"mb1{loss_type}", f"task.loss_type={loss_type}")
        two = run_grpo(
            tmp_path, f"mb2{loss_type}", "train.microbatches=2", f"task.loss_type={loss_type}"
        )
        for a, b in zip(one, two, strict=True):
            assert a["tokens"] == b["tokens"]
            assert a["reward"] == b["reward"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7)


def test_resume_is_exact(tmp_path: Path) -> None:
    whole = run_grpo(tmp_path, "whole", "train.save_every=3", steps=6)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole/checkpoints/step_00000003", part / "step_00000003")
    resumed = run_grpo(tmp_path, "part", "train.save_every=3", "--resume", steps=6)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in whole[3:]]


def test_iterations_reuse_one_rollout(tmp_path: Path) -> None:
    rows = run_grpo(tmp_path, "mu", "task.num_iterations=2", steps=4)
    # steps 1-2 share one rollout (same rewards and lengths), 3-4 the next
    assert rows[0]["reward"] == rows[1]["reward"]
    assert rows[0]["completions/mean_length"] == rows[1]["completions/mean_length"]
    assert rows[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # recomputed old = policy
    assert rows[0]["logprob_mismatch"] <= 1e-5


def test_rloo_trains_from_yaml(tmp_path: Path) -> None:
    rows = run_grpo(tmp_path, "rloo", "task.type=rloo", "task.beta=0.05")
    assert rows[0]["logprob_mismatch"] <= 1e-5
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_zero_std_groups_are_masked(tmp_path: Path) -> None:
    rows = run_grpo(
        tmp_path,
        "dyn",
        "task.mask_zero_std_groups=true",
        "task.rewards.functions=[{fn: exact_match}]",
        steps=1,
    )
    # exact match is 0 everywhere for a random model: every group is masked, nothing trains
    assert rows[0]["frac_reward_zero_std"] == 1.0
    assert rows[0]["tokens"] == 0 and rows[0]["grad_norm"] == 0.0


def test_packing_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = load_config(
        str(config(tmp_path)),
        [f"run.output_dir={tmp_path / 'p'}", "train.max_steps=1", "data.packing.enabled=true"],
    )
    with pytest.raises(ConfigError, match=r"data\.packing"):
        build_run(cfg, overwrite=True)


def test_processed_cache_keeps_the_record_columns(tmp_path: Path) -> None:
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    first = run_grpo(tmp_path, "miss", "data.cache=true", cache, steps=2)
    assert list((tmp_path / "cache").glob("processed-*/train_columns.jsonl"))
    second = run_grpo(tmp_path, "hit", "data.cache=true", cache, steps=2)  # read back
    report = json.loads((tmp_path / "hit/data_report.json").read_text())
    assert report["cache"] == "hit"
    assert [without_timing(r) for r in second] == [without_timing(r) for r in first]


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "task.beta=0.1"]])
def test_quickstart_config_trains_from_the_exported_base(
    tmp_path: Path, base_export: Path, extra: list[str]
) -> None:
    out = tmp_path / "grpo"
    args = [
        "train",
        str(ROOT / "configs" / "grpo_quickstart.yaml"),
        f"model.path={base_export}",
        f"run.output_dir={out}",
        "data.synthetic.num_train=64",
        "data.synthetic.num_eval=8",
        "data.batch_size=4",
        "task.num_generations=4",
        "task.max_completion_length=8",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
        "run.threads=1",
        "eval.num_samples=4",
        "eval.max_new_tokens=8",
        *extra,
    ]
    assert main(args) == 0
    rows = step_rows(out)
    assert len(rows) == 2 and rows[0]["logprob_mismatch"] <= 1e-5
    if extra:  # the LoRA base is the reference: no copy, KL 0 before the first update
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_rollout_stage_is_pure_and_builds_whole_groups(tmp_path: Path) -> None:
    from tscale.core import rng as R
    from tscale.losses.rl import group_advantages

    cfg = load_config(
        str(config(tmp_path)), [f"run.output_dir={tmp_path / 'r'}", "train.max_steps=1"]
    )
    run = build_run(cfg, overwrite=True)
    batch = run.prepare_batch(next(run.batches))
    key = R.fold_in(run.state.rng, 0)
    out = run.rollout(run.state, batch, key)
    again = run.rollout(run.state, batch, key)
    for name in ("input_ids", "completion_ids", "sampler_logps", "advantages", "loss_mask"):
        assert (out[name] == again[name]).all(), name  # a pure function of (state, batch, key)
    n, g = batch.batch_size[0], 4
    assert out.batch_size[0] == n * g
    assert (out["group"] == torch.arange(n).repeat_interleave(g)).all()
    # each completion row starts with its prompt
    for r in range(n * g):
        prompt = batch["input_ids"][r // g][batch["record_ids"][r // g] >= 0]
        assert (out["input_ids"][r, : prompt.numel()] == prompt).all()
    expected = group_advantages(out["rewards"], g, "group")
    assert torch.equal(out["advantages"], expected)
    assert (out["completion_mask"].sum(1) >= 1).all()
    other = run.rollout(run.state, batch, R.fold_in(run.state.rng, 1))
    assert not torch.equal(other["completion_ids"], out["completion_ids"])  # a fresh draw per step


def _wait_until(run, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert run.poll() is None, f"the run ended before the kill:\n{run.output()[-3000:]}"
        assert time.monotonic() < deadline, f"no kill moment in 120 s:\n{run.output()[-3000:]}"
        time.sleep(0.001)


def _partial(ckpts: Path, stale: set[Path]) -> bool:
    """A checkpoint being written (or left half-written) that was not there before."""
    return bool(set(ckpts.glob(".tmp-*")) - stale)


def test_killed_at_random_moments_resumes_exactly(tmp_path: Path, fork_launcher) -> None:
    """kill -9 five times at random moments, resume each time: the logged steps equal the
    uninterrupted run's (timings aside).

    Every step saves a checkpoint. Each of the 5 launches resumes from the last complete one
    (step c) and is killed at a moment drawn (``random.Random(0)``) from two kinds, 2 of each
    and a fifth drawn at random, in a shuffled order:

    - ``save``: the moment the temporary directory of step c+1's checkpoint appears, i.e. in
      the middle of writing it (the metrics row of step c+1 is already logged; the resume must
      drop it and redo the step);
    - ``step``: a uniform draw within the first half of a step after step c+1's checkpoint is
      complete, i.e. in step c+2's batch, rollout or update (the step's length, step and save,
      is the uninterrupted run's median from its checkpoints' times: a tiny step takes tens of
      ms on an idle machine, several times that under load, and a fixed window missed it).

    At least one kill of each kind must land as meant (a partial checkpoint left behind; no
    partial checkpoint and no row of the next step). The runs are forked from one launcher
    process that has imported torch and tscale (the ``fork_launcher`` fixture), so 5 kills cost
    less than 3 fresh ``python -m tscale.cli`` launches did."""
    steps = 6
    common = ["train.save_every=1", NO_PLOT]
    whole = run_grpo(tmp_path, "whole", *common, steps=steps)
    saved = sorted(p.stat().st_mtime for p in (tmp_path / "whole" / "checkpoints").glob("step_*"))
    step_s = statistics.median(b - a for a, b in itertools.pairwise(saved))
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    base = ["train", str(config(tmp_path)), f"run.output_dir={out}"]
    base += [f"train.max_steps={steps}", f"train.eval_every={steps}", *common]
    rng = random.Random(0)
    kinds = ["save", "save", "step", "step", rng.choice(["save", "step"])]
    rng.shuffle(kinds)
    landed = {"save": 0, "step": 0}
    for i, kind in enumerate(kinds):
        done = [int(p.name.split("_")[1]) for p in ckpts.glob("step_*")]
        target = max(done, default=0) + 1
        assert target < steps
        stale = set(ckpts.glob(".tmp-*"))  # a partial save an earlier kill left
        run = fork_launcher.start(base + (["--resume"] if done else []), tmp_path / f"{i}.log")
        final = ckpts / f"step_{target:08d}"
        if kind == "save":
            _wait_until(run, lambda: _partial(ckpts, stale) or final.exists())  # noqa: B023
        else:
            _wait_until(run, final.exists)
            time.sleep(rng.uniform(0.0, 0.5 * step_s))
        assert run.kill() == -signal.SIGKILL, run.output()[-3000:]
        if kind == "save":
            landed["save"] += _partial(ckpts, stale)
        else:
            newest = max(int(p.name.split("_")[1]) for p in ckpts.glob("step_*"))
            mid_step = not _partial(ckpts, stale) and len(step_rows(out)) == newest == target
            landed["step"] += mid_step
    assert landed["save"] >= 1 and landed["step"] >= 1, (kinds, landed)
    resumed = run_grpo(tmp_path, "killed", *common, "--resume", steps=steps)
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in whole]


def test_resume_refuses_changed_rewards(tmp_path: Path) -> None:
    from tscale.errors import CheckpointError

    run_grpo(tmp_path, "whole", "train.save_every=2", steps=2)
    saved = json.loads((tmp_path / "whole/checkpoints/step_00000002/state.json").read_text())
    assert set(saved["extra"]["task"]["reward_fingerprint"]) == {"exact_match", "has_letter"}
    cfg = load_config(
        str(config(tmp_path)),
        [
            f"run.output_dir={tmp_path / 'whole'}",
            "train.max_steps=4",
            "task.rewards.functions=[{fn: exact_match, weight: 2.0}]",
        ],
    )
    with pytest.raises(CheckpointError, match="reward functions changed"):
        build_run(cfg, resume=True)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_chat_prompts_match_transformers_and_stop_at_the_end_of_turn(
    tmp_path: Path, style: str
) -> None:
    """A chat record's prompt is transformers' apply_chat_template(add_generation_prompt=True)
    of its turns before the answer; the stop ids are EOS and the template's end of turn."""
    transformers = pytest.importorskip("transformers")
    from tscale.data.hf_tokenizer import load_encoder
    from tscale.data.prompt import ChatTemplate
    from tscale.tasks.grpo import GRPOTask, stop_ids_of
    from tscale.testing.hf_folders import make_model_folder
    from tscale.train.data_template import SelectedTemplate

    folder = make_model_folder(tmp_path / style, style)
    enc = load_encoder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    tpl = ChatTemplate.from_jinja(enc.chat_template).with_tokens(
        bos_token=enc.bos_token or "", eos_token=enc.eos_token or "", date="2026-01-01"
    )
    question = [{"role": "user", "content": "What color is the sky?"}]
    records = [
        {"messages": [*question, {"role": "assistant", "content": "blue"}]},
        {"messages": question},  # a prompt-only record
    ]
    cfg = load_config(None, ["data.system_prompt=null"])
    stage = GRPOTask().examples(cfg, enc, SelectedTemplate(tpl))
    results, _ = stage(records, ["a:1", "a:2"], budget=None, max_length=None)
    expected = hf.apply_chat_template(
        question, add_generation_prompt=True, date_string="01 Jan 2026"
    )
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    for res in results:
        assert res.value["input_ids"] == expected
        assert len(set(res.value["record_ids"])) == 1
    assert results[0].value["columns"] == records[0]
    assert results[0].value["record_ids"] != results[1].value["record_ids"]
    stops = stop_ids_of(enc, tpl)
    assert enc.eos_id in stops
    assert hf.convert_tokens_to_ids(tpl.eos_token) in stops


def test_shared_prompt_layout_gives_the_same_steps(tmp_path: Path) -> None:
    """task.share_prompt (each group one document, the prompt once) trains what one row per
    completion trains: the same rollouts, losses and gradients up to float rounding, for μ = 1
    and μ = 2 (the recomputed old log-probs), with β > 0 (the reference pass) and with
    microbatches; the first update's log-probs are the sampler's."""
    cases = [
        ("dapo", ("task.loss_type=dapo",)),
        ("mu2-beta", ("task.num_iterations=2", "task.beta=0.1")),
        ("mb2", ("train.microbatches=2", "task.loss_type=grpo")),
    ]
    for name, extra in cases:
        rows = run_grpo(tmp_path, f"rows-{name}", *extra, steps=3)
        shared = run_grpo(tmp_path, f"shared-{name}", "task.share_prompt=true", *extra, steps=3)
        assert shared[0]["logprob_mismatch"] <= 1e-5
        for a, b in zip(rows, shared, strict=True):
            assert b["tokens"] == a["tokens"] and b["reward"] == a["reward"], name
            assert b["completions/mean_length"] == a["completions/mean_length"], name
            for key in ("loss", "grad_norm", "entropy", "ratio/mean"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, key)
            if "kl" in a:
                assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6), name


def test_shared_prompt_rows_hold_each_group_once(tmp_path: Path) -> None:
    """The group layout: G folded rows per group; unfolded, the document is the prompt once
    and every completion (but its last token) after a copy of the prompt's last token, and the
    logits of every completion position equal those of the completion's own row."""
    from tscale.core import rng as R
    from tscale.tasks.grpo import completion_logits

    def rollout(shared: bool) -> tuple:
        cfg = load_config(
            str(config(tmp_path)),
            [
                f"run.output_dir={tmp_path / str(shared)}",
                "train.max_steps=1",
                f"task.share_prompt={str(shared).lower()}",
            ],
        )
        run = build_run(cfg, overwrite=True)
        batch = run.prepare_batch(next(run.batches))
        return run, batch, run.rollout(run.state, batch, R.fold_in(run.state.rng, 0))

    run, batch, rows = rollout(False)
    _, _, shared = rollout(True)
    n, g = batch.batch_size[0], 4
    assert shared.batch_size[0] == n * g and torch.equal(shared["group"], rows["group"])
    for name in ("completion_ids", "completion_mask", "sampler_logps", "advantages"):
        assert torch.equal(shared[name], rows[name]), name
    docs = shared["input_ids"].reshape(n, -1)
    branch = shared["branch_ids"].reshape(n, -1)
    real = shared["doc_ids"].reshape(n, -1) == 1
    lengths = rows["completion_mask"].sum(1).tolist()
    for p in range(n):
        prompt = batch["input_ids"][p][batch["record_ids"][p] >= 0].tolist()
        want = prompt[:-1]
        for k in range(g):
            comp = rows["completion_ids"][p * g + k, : lengths[p * g + k]].tolist()
            want += [prompt[-1], *comp[:-1]]
        assert docs[p][real[p]].tolist() == want
        assert branch[p][real[p]].tolist()[: len(prompt) - 1] == [0] * (len(prompt) - 1)
    from tscale.train import builders

    model, _ = builders.build_model(run.cfg, run.data.encoder.vocab_size, R.key(0))
    params = run.state.params
    a = completion_logits(lambda b: model.apply(params, b), rows, g)
    b = completion_logits(lambda b: model.apply(params, b), shared, g)
    mask = rows["completion_mask"]
    assert torch.allclose(a[mask], b[mask], atol=1e-5, rtol=1e-5)
