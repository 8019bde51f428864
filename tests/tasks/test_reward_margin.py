"""A per-pair ``margin`` column for reward models, through ``tscale train``: the first-step
loss equals TRL's ``RewardTrainer.compute_loss`` on the same rewards (from the exported
``*ForSequenceClassification`` folder in ``transformers``) and margins; packed rows give the
same loss; bad margins are quarantined with file:line; the processed-data cache misses when
only the margins change; ``task.margin`` with the column is refused; DPO ignores the column."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tscale.cli import main
from tscale.core.result import Err, Ok
from tscale.data.pack import StreamingPacker, pack_examples
from tscale.data.preference import record_margin
from tscale.testing.preference import letter_pairs
from tscale.testing.runs import step_rows
from tscale.train.data_sources import load_processed

transformers = pytest.importorskip("transformers")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")

N_PAIRS = 16


def _pairs(n: int, seed: int, shift: float = 0.0) -> list[dict]:
    """:func:`letter_pairs` with a margin each (two decimals, 0 to 3, plus ``shift``)."""
    rng = random.Random(seed + 100)
    return [{**r, "margin": round(rng.uniform(0.0, 3.0), 2) + shift} for r in letter_pairs(n, seed)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(tmp_path: Path, out: Path, train: Path, *extra: str) -> int:
    """One step at lr 0 (the exported weights are the initial ones) over every pair."""
    eval_file = tmp_path / "eval.jsonl"
    if not eval_file.exists():
        _write(eval_file, _pairs(4, 1))
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("run: {seed: 0}\ntask: {type: reward}\n")
    return main(
        [
            "train",
            str(cfg),
            f"run.output_dir={out}",
            "run.threads=1",
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.max_position_embeddings=64",
            "model.init_std=0.5",  # rewards far apart: a margin put on the wrong pair shows
            "data.tokenizer.vocab_size=300",
            f"data.train_files=[{train}]",
            f"data.eval_files=[{eval_file}]",
            f"data.batch_size={N_PAIRS}",
            "data.max_length=48",
            "optimizer.lr=0.0",
            "scheduler.warmup_steps=0",
            "train.max_steps=1",
            "train.log_every=1",
            "train.eval_every=100",
            "train.progress=false",
            "eval.batch_size=4",
            "--overwrite",
            *extra,
        ]
    )


def _first_loss(out: Path) -> float:
    return float(step_rows(out)[0]["loss"])


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "data_report.json").read_text())


def _cached_documents(out: Path) -> list[dict]:
    train, _, _ = load_processed(Path(_report(out)["cache_path"]), out / "scratch.jsonl")
    return train


def _branch(doc: dict, branch: int) -> list[int]:
    """The unpacked sequence of one branch of a shared-prompt document: prompt + completion."""
    return [t for t, b in zip(doc["input_ids"], doc["branch_ids"], strict=True) if b in (0, branch)]


def _hf_rewards(folder: Path, sequences: list[list[int]]) -> torch.Tensor:
    """Each sequence's reward from the exported folder in ``transformers`` (right-padded)."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    pad = model.config.pad_token_id
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def _trl_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> float:
    """TRL 1.16's ``RewardTrainer.compute_loss`` on the given rewards and ``margin`` column
    (one process, a bare trainer)."""
    trainer = object.__new__(trl_reward.RewardTrainer)
    ident = lambda t: t  # noqa: E731 - one process: gathers are the identity
    for name, value in {
        "accelerator": SimpleNamespace(gather=ident, gather_for_metrics=ident),
        "model": SimpleNamespace(training=True),
        "args": SimpleNamespace(center_rewards_coefficient=None),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }.items():
        setattr(trainer, name, value)
    logits = torch.cat([chosen, rejected])[:, None]
    inputs = {"attention_mask": torch.ones(len(logits), 3, dtype=torch.long), "margin": margin}
    out = trl_reward.RewardTrainer.compute_loss(
        trainer, lambda **kw: SimpleNamespace(logits=logits), inputs
    )
    return float(out)


def test_first_step_loss_equals_trl_with_margins_packed_or_not(tmp_path: Path) -> None:
    records = _pairs(N_PAIRS, 0)
    train = _write(tmp_path / "train.jsonl", records)
    out = tmp_path / "run"
    assert _train(tmp_path, out, train) == 0
    ours = _first_loss(out)
    folder = tmp_path / "hf"
    assert main(["export", str(out), str(folder)]) == 0

    # the cached documents (record order, one per pair) carry each record's margin on every token
    docs = _cached_documents(out)
    assert len(docs) == N_PAIRS
    for doc, record in zip(docs, records, strict=True):
        assert doc["margins"] == [pytest.approx(record["margin"])] * len(doc["input_ids"])
    rewards = _hf_rewards(folder, [_branch(d, k) for d in docs for k in (1, 2)])
    chosen, rejected = rewards[0::2], rewards[1::2]
    margin = torch.tensor([r["margin"] for r in records], dtype=torch.float)  # TRL's collator
    theirs = _trl_loss(chosen, rejected, margin)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    # the check can fail: without the margins, or with them on the wrong pairs, the loss moves
    assert abs(_trl_loss(chosen, rejected, torch.zeros_like(margin)) - theirs) > 0.1
    assert abs(_trl_loss(chosen, rejected, margin.roll(1)) - theirs) > 0.05

    # packed: several pairs per row, every row in the first batch: the same loss
    rows = len(pack_examples(docs, 48)[0])
    assert rows < N_PAIRS
    packed = tmp_path / "packed"
    assert (
        _train(tmp_path, packed, train, "data.packing.enabled=true", f"data.batch_size={rows}") == 0
    )
    assert _report(packed)["packing"].startswith(f"{N_PAIRS} documents in {rows} sequences")
    assert _first_loss(packed) == pytest.approx(ours, rel=1e-5, abs=1e-6)


def test_files_with_and_without_the_column_mix(tmp_path: Path) -> None:
    half = N_PAIRS // 2
    with_column = _pairs(half, 0)
    files = [
        _write(tmp_path / "a.jsonl", with_column),
        _write(tmp_path / "b.jsonl", letter_pairs(half, 2)),  # no margin: task.margin (0)
    ]
    train = f"[{files[0]},{files[1]}]"
    losses = []
    for packing in ("false", "true"):
        out = tmp_path / f"run-{packing}"
        extra = [f"data.train_files={train}", f"data.packing.enabled={packing}"]
        if packing == "true":
            rows = len(pack_examples(_cached_documents(tmp_path / "run-false"), 48)[0])
            extra.append(f"data.batch_size={rows}")
        assert _train(tmp_path, out, files[0], *extra) == 0
        losses.append(_first_loss(out))
    margins = sorted(d["margins"][0] for d in _cached_documents(tmp_path / "run-false"))
    assert margins == pytest.approx(sorted([r["margin"] for r in with_column] + [0.0] * half))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)


def test_bad_margins_are_quarantined_with_file_and_line(tmp_path: Path) -> None:
    records = _pairs(N_PAIRS + 5, 0)
    bad = {2: "high", 5: float("nan"), 9: float("inf"), 14: True}
    lines = [json.dumps({**r, "margin": bad[i]} if i in bad else r) for i, r in enumerate(records)]
    lines[17] = json.dumps({**records[17], "margin": None})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert _train(tmp_path, out, train, "data.max_error_rate=0.5") == 0
    quarantined = [
        json.loads(x) for x in (out / "data" / "quarantine.jsonl").read_text().splitlines()
    ]
    where = {q["where"].rsplit("/", 1)[-1]: q["reason"] for q in quarantined}
    assert sorted(where) == sorted(f"train.jsonl:line {i + 1}" for i in (2, 5, 9, 14, 17))
    assert where["train.jsonl:line 3"].startswith("margin not a number: holds str 'high'")
    assert where["train.jsonl:line 6"] == "margin not finite: nan"
    assert where["train.jsonl:line 10"] == "margin not finite: inf"
    assert where["train.jsonl:line 15"].startswith("margin not a number: holds bool")
    assert where["train.jsonl:line 18"].startswith("margin missing")
    train_report = _report(out)["train"]
    assert train_report["quarantined"] == 5 and train_report["trained"] == N_PAIRS
    assert train_report["quarantined_reasons"] == {
        "margin not a number": 2,
        "margin not finite": 2,
        "margin missing": 1,
    }
    assert math.isfinite(_first_loss(out))


def test_streaming_packer_state_keeps_the_margins() -> None:
    docs = [
        {
            "input_ids": [1, 2, 3],
            "labels": [2, 3, -100],
            "position_ids": [0, 1, 2],
            "branch_ids": [0, 1, 2],
            "margins": [m] * 3,
        }
        for m in (0.25, 1.5, -2.0)
    ]
    packer = StreamingPacker(8, 4)
    assert packer.push(docs[0]) == []
    resumed = StreamingPacker(8, 4)
    resumed.load_state_dict(json.loads(json.dumps(packer.state_dict())))
    for p in (packer, resumed):
        assert p.push({k: v for k, v in docs[1].items() if k != "margins"}) == []
        assert p.push(docs[2]) == []  # no room left beside the first two: a second row
    packs = [packer.flush(), resumed.flush()]
    assert packs[0] == packs[1]
    # a document without margins packs 0.0
    assert [p["margins"] for p in packs[0]] == [[0.25] * 3 + [0.0] * 3, [-2.0] * 3]


def test_record_margin() -> None:
    assert record_margin({"chosen": "a"}) == Ok(None)
    assert record_margin({"margin": 2}) == Ok(2.0)
    assert record_margin({"margin": -0.5}) == Ok(-0.5)
    for value in ("1", [1.0], False, float("-inf"), None):
        got = record_margin({"margin": value}, where="f.jsonl:line 4")
        assert isinstance(got, Err) and got.where == "f.jsonl:line 4", value


def test_the_cache_misses_when_only_the_margins_change(tmp_path: Path) -> None:
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    train = _write(tmp_path / "train.jsonl", _pairs(N_PAIRS, 0))
    runs = [tmp_path / f"run{i}" for i in range(3)]
    assert _train(tmp_path, runs[0], train, cache) == 0
    assert _train(tmp_path, runs[1], train, cache) == 0
    assert [_report(r)["cache"] for r in runs[:2]] == ["miss", "hit"]
    assert _first_loss(runs[1]) == _first_loss(runs[0])  # the margins come back from the cache
    # the same texts, each margin 1.0 larger (an expected loss change well above noise)
    _write(train, _pairs(N_PAIRS, 0, shift=1.0))
    assert _train(tmp_path, runs[2], train, cache) == 0
    assert _report(runs[2])["cache"] == "miss"
    assert _report(runs[2])["cache_path"] != _report(runs[0])["cache_path"]
    assert [d["margins"][0] for d in _cached_documents(runs[2])] == pytest.approx(
        [r["margin"] for r in _pairs(N_PAIRS, 0, shift=1.0)]
    )
    assert _first_loss(runs[2]) > _first_loss(runs[0]) + 0.3


def test_task_margin_with_the_column_is_refused_and_dpo_ignores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _write(tmp_path / "train.jsonl", _pairs(N_PAIRS, 0))
    assert _train(tmp_path, tmp_path / "run", train, "task.margin=0.5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.jsonl:line 1: the data has a margin column" in err and "task.margin" in err
    dpo = tmp_path / "dpo"
    assert _train(tmp_path, dpo, train, "task.type=dpo", "optimizer.lr=0.001") == 0
    assert _first_loss(dpo) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
