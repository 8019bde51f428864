"""Preference tasks under torchrun (2 gloo ranks on CPU) follow one process on the same global
batch: DPO under DDP and FSDP, KTO (whose ``z₀`` is all-reduced in the rollout stage) under DDP —
per-step loss, ``rewards/*``, ``logps/*`` and KTO's ``kl`` within 1e-5."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tscale.testing.runs import step_rows

# `make test` runs pytest with --dist loadfile: one worker runs this module, so its module-scoped
# launches are shared by its tests

FSDP = ["parallel.dp_shard=-1", "parallel.dp_replicate=1"]
LETTERS = "abcdefgh"
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


def _rows(n: int, seed: int, unpaired: bool) -> list[dict]:
    """Reverse-the-letters records: the right answer is chosen/desirable, one with a changed
    letter rejected/undesirable (KTO: one unpaired row each, alternating)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        items = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        answer = list(reversed(items))
        wrong = list(answer)
        k = rng.randrange(len(wrong))
        wrong[k] = rng.choice([c for c in LETTERS if c != wrong[k]])
        prompt = "reverse: " + " ".join(items)
        if unpaired:
            good = i % 2 == 0
            out.append(
                {"prompt": prompt, "completion": " ".join(answer if good else wrong), "label": good}
            )
        else:
            out.append({"prompt": prompt, "chosen": " ".join(answer), "rejected": " ".join(wrong)})
    return out


def _config(tmp: Path, name: str, *, unpaired: bool) -> tuple[list[str], Path]:
    """The ``tscale train`` arguments of a tiny preference run, and its run directory."""
    data = tmp / ("kto.jsonl" if unpaired else "pairs.jsonl")
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64, 0, unpaired)))
    out = tmp / name
    cfg = tmp / f"{name}.yaml"
    cfg.write_text("run: {seed: 0}\n")
    args = [
        "train",
        str(cfg),
        f"run.output_dir={out}",
        "run.threads=1",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.max_position_embeddings=64",
        "data.tokenizer.vocab_size=300",
        f"data.train_files=[{data}]",
        "data.batch_size=8",
        "data.max_length=48",
        "optimizer.lr=0.003",
        "scheduler.warmup_steps=0",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.save_every=0",
        "train.progress=false",
        "eval.num_samples=0",
    ]
    return args, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, torchrun, tscale_cli) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("pref")
    plans = {
        "dpo-one": (["task.type=dpo"], False, 1),
        "dpo-ddp": (["task.type=dpo"], False, 2),
        "dpo-fsdp": (["task.type=dpo", *FSDP], False, 2),
        "kto-one": (["task.type=kto"], True, 1),
        "kto-ddp": (["task.type=kto"], True, 2),
    }
    out: dict[str, list] = {}
    for name, (extra, unpaired, ranks) in plans.items():
        args, run = _config(tmp, name, unpaired=unpaired)
        if ranks == 1:
            tscale_cli([*args, *extra])
        else:
            torchrun(["-m", "tscale.cli", *args, *extra])
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
    assert abs(one[0]["loss"] - 0.6931471805599453) <= 1e-6  # the reference is the start
    _assert_follows(one, runs[f"dpo-{mode}"], COMPARED)


def test_kto_follows_one_process_with_the_global_kl(runs: dict[str, list]):
    """``kl`` (z₀) is all-reduced over the ranks before the step: the same value as one process
    on the global batch, and so the same losses."""
    one, two = runs["kto-one"], runs["kto-ddp"]
    assert any(r["kl"] > 0 for r in one[1:])  # z₀ moves off 0 once the policy does
    _assert_follows(one, two, ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"))
