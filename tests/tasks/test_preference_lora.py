"""Preference tasks over LoRA and QLoRA through `tscale train`: the LoRA base is the reference
(the adapters start at zero, so the first step has policy == reference: DPO's loss is ln 2,
KTO's is 1/2 with z₀ = 0); an NF4 base (lora.qlora) cannot run as the reference and is refused
in one line naming task.reference, while a reference-free run trains over it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.testing.preference import write_pairs
from tscale.testing.runs import step_rows

LORA = ["lora.enabled=true", "lora.rank=4"]
QLORA = [*LORA, "lora.qlora=true"]


TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=64",
    "data.tokenizer.vocab_size=300",
]


def _train(tmp: Path, *overrides: str, steps: int = 2, name: str = "run") -> tuple[int, list]:
    """``tscale train`` of a tiny model (random init unless ``model.path`` is given) on pairs:
    its exit code and step rows."""
    cfg = tmp / "pref.yaml"
    cfg.write_text("run: {seed: 0}\n")
    out = tmp / name
    pairs = tmp / "pairs.jsonl"
    model = [] if any(o.startswith("model.path=") for o in overrides) else TINY
    code = main(
        [
            "train",
            str(cfg),
            f"run.output_dir={out}",
            "run.threads=1",
            *model,
            f"data.train_files=[{pairs if pairs.exists() else write_pairs(pairs, 32, 0)}]",
            "data.batch_size=8",
            "data.max_length=64",
            "optimizer.lr=0.003",
            "scheduler.warmup_steps=0",
            f"train.max_steps={steps}",
            "train.epochs=null",
            "train.log_every=1",
            "train.save_every=0",
            "train.progress=false",
            "eval.num_samples=0",
            *overrides,
        ]
    )
    return code, step_rows(out)


@pytest.mark.parametrize("reference", ["auto", "lora_base"])
def test_dpo_over_the_lora_base_starts_at_ln2(tmp_path: Path, reference: str) -> None:
    code, rows = _train(tmp_path, "task.type=dpo", f"task.reference={reference}", *LORA)
    assert code == 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["loss"] != rows[0]["loss"]  # the adapters moved off the base


def test_kto_over_the_lora_base_starts_at_one_half(tmp_path: Path) -> None:
    # pairs as KTO data: the chosen reply desirable, the rejected one undesirable; with
    # policy == reference every reward and z₀ are 0, so each completion's loss is 1 − σ(0)
    code, rows = _train(tmp_path, "task.type=kto", *LORA)
    assert code == 0
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    ("task", "reference"),
    [("dpo", "auto"), ("dpo", "lora_base"), ("kto", "auto"), ("kto", "lora_base")],
)
def test_qlora_base_as_the_reference_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, reference: str
) -> None:
    code, rows = _train(tmp_path, f"task.type={task}", f"task.reference={reference}", *QLORA)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not rows
    assert len(err) == 1 and err[0].startswith("tscale: error: task.reference: "), err
    assert "lora.qlora" in err[0] and "Traceback" not in err[0]


def test_kto_without_a_reference_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _train(tmp_path, "task.type=kto", "task.reference=none")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tscale: error: task.reference: none is not available"), err


@pytest.mark.parametrize("task", [["task.type=dpo", "task.reference=none"], ["task.type=simpo"]])
def test_reference_free_runs_train_over_a_qlora_base(tmp_path: Path, task: list[str]) -> None:
    code, rows = _train(tmp_path, *task, *QLORA)
    assert code == 0 and len(rows) == 2
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[1]["loss"] != rows[0]["loss"]


def test_qlora_with_a_precomputed_reference_starts_at_ln2_with_its_own_cache_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The NF4 base, dequantised once before training, is QLoRA's reference: the first step is
    ln 2, and its cached log-probs are not those of the same folder's full-precision base."""
    from tscale.testing.hf_folders import make_model_folder

    folder = make_model_folder(tmp_path / "hf", "qwen2")
    shared = ["task.type=dpo", "task.reference=precomputed", f"model.path={folder}"]
    shared.append(f"data.cache_dir={tmp_path / 'cache'}")
    lines = []
    for name, lora in (("lora", LORA), ("qlora", QLORA), ("again", QLORA)):
        code, rows = _train(tmp_path, *shared, *lora, name=name)
        assert code == 0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), name
        out = capsys.readouterr().out
        lines.append(next(x for x in out.splitlines() if x.startswith("reference log-probs")))
    assert [x.split(" ")[2] for x in lines] == ["computed", "computed", "cached"], lines
    assert len(list((tmp_path / "cache").glob("reference-*"))) == 2
