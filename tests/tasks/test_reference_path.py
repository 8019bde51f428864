"""``task.reference_path``: another HF folder's weights as the reference of DPO and KTO (TRL's
``ref_model``), checked against the policy's architecture, kept by the folder in checkpoints,
and precomputed under its own cache key.

Folders A and B are exports of two short runs of one tiny model (the same tokenizer, different
weights); C is another architecture."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tscale.cli import main
from tscale.testing.preference import write_pairs
from tscale.testing.runs import step_rows
from tscale.train.export import export

from .test_preference_task import NO_PLOT, run_pref

PRE = ("task.type=dpo", "task.reference=precomputed")
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for name, extra in (("A", ["train.max_steps=2"]), ("B", []), ("C", ["model.hidden_size=48"])):
        run_pref(root, f"run{name}", "task.type=dpo", "train.save_every=0", *extra)
        out[name] = export(root / f"run{name}", root / name)
    return out


def run_from(
    tmp: Path, name: str, model: Path, *overrides: str, steps: int = 2, code: int = 0
) -> list[dict]:
    """A preference run from the folder ``model`` (its tokenizer too), exiting with ``code``;
    its step rows."""
    train, held = tmp / "train.jsonl", tmp / "eval.jsonl"
    if not train.exists():  # written once: the data cache key covers the files' mtimes
        write_pairs(train, 64, 0)
        write_pairs(held, 8, 1)
    cfg = tmp / "pref.yaml"
    cfg.write_text("run: {seed: 0}\n")
    args = [
        "train",
        str(cfg),
        f"run.output_dir={tmp / name}",
        "run.threads=1",
        f"model.path={model}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{held}]",
        "data.batch_size=8",
        "data.max_length=48",
        "optimizer.lr=0.003",
        "scheduler.warmup_steps=0",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.progress=false",
        NO_PLOT,
        *overrides,
    ]
    assert main(args) == code
    return step_rows(tmp / name) if (tmp / name / "metrics.jsonl").is_file() else []


def _first(rows: list[dict]) -> dict[str, float]:
    return {k: rows[0][k] for k in COMPARED}


def test_the_reference_is_the_other_folder(tmp_path: Path, folders: dict[str, Path]) -> None:
    a, b = str(folders["A"]), str(folders["B"])
    same = run_from(tmp_path, "same", folders["A"], "task.type=dpo", f"task.reference_path={a}")
    assert same[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # A against a copy of A
    ab = run_from(tmp_path, "ab", folders["A"], "task.type=dpo", f"task.reference_path={b}")
    ba = run_from(tmp_path, "ba", folders["B"], "task.type=dpo", f"task.reference_path={a}")
    assert abs(ab[0]["loss"] - math.log(2)) > 1e-3
    # the policy's log-probs are A's whatever the reference; the margins swap sign with the roles
    assert ab[0]["logps/chosen"] == pytest.approx(same[0]["logps/chosen"], rel=1e-6)
    assert ab[0]["rewards/margins"] == pytest.approx(-ba[0]["rewards/margins"], rel=1e-4)
    assert ab[0]["rewards/chosen"] == pytest.approx(-ba[0]["rewards/chosen"], rel=1e-4)


def test_precomputed_from_the_folder_equals_the_folder_copy(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = folders["A"]
    b = shutil.copytree(folders["B"], tmp_path / "B")  # rewritten below
    copy = run_from(tmp_path, "copy", a, "task.type=dpo", f"task.reference_path={b}")
    # one processed-data cache: the folder's log-probs are computed once, read back by a second
    # run, and computed again once the folder's weights change under the same path
    shared = (*PRE, f"data.cache_dir={tmp_path / 'cache'}", f"task.reference_path={b}")
    pre = run_from(tmp_path, "pre", a, *shared)
    assert "reference log-probs: computed" in capsys.readouterr().out
    again = run_from(tmp_path, "again", a, *shared)
    assert "reference log-probs: cached" in capsys.readouterr().out
    for k, v in _first(copy).items():
        assert pre[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert again[0][k] == pre[0][k], k
    shutil.copy(a / "model.safetensors", b / "model.safetensors")  # B now holds A's weights
    changed = run_from(tmp_path, "changed", a, *shared)
    assert "reference log-probs: computed" in capsys.readouterr().out
    assert changed[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_kto_and_lora_take_the_folder_too(tmp_path: Path, folders: dict[str, Path]) -> None:
    a = str(folders["A"])
    lora = ["lora.enabled=true", "lora.rank=4"]
    dpo = run_from(
        tmp_path, "lora", folders["A"], "task.type=dpo", f"task.reference_path={a}", *lora
    )
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA's B = 0: policy is A
    kto = run_from(tmp_path, "kto", folders["A"], "task.type=kto", f"task.reference_path={a}")
    assert kto[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # ρ = 0, z₀ = 0: 1 − σ(0)


SAVE_AT_2 = "train.save_every=2"


def test_checkpoints_keep_the_folder_not_a_copy(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = folders["A"]
    b = shutil.copytree(folders["B"], tmp_path / "B")
    args = ("task.type=dpo", f"task.reference_path={b}", SAVE_AT_2)
    whole = run_from(tmp_path, "whole", a, *args, steps=4)
    step = tmp_path / "whole" / "checkpoints" / "step_00000002"
    shutil.copytree(step, tmp_path / "ck" / "checkpoints" / step.name)
    text = json.dumps(json.loads((step / "state.json").read_text()))
    assert str(b.resolve()) in text  # the folder and its fingerprint stand for the tree
    params = (step / "params.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in step.glob("*.safetensors")) < 4 * params
    resumed = run_from(tmp_path, "ck", a, *args, "--resume", steps=4)
    assert resumed == whole[2:]  # the reference read back from the folder: exact
    shutil.copy(a / "model.safetensors", b / "model.safetensors")  # the folder changed
    capsys.readouterr()
    run_from(tmp_path, "ck", a, *args, "train.max_steps=6", "--resume", steps=4, code=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(b.resolve()) in err[0], err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task.reference_path={C}"],
            r"^tscale: error: task\.reference_path: .*/C is not the policy's architecture \(",
        ),
        (
            ["task.reference_path={B}", "task.reference=none"],
            r"^tscale: error: task\.reference_path: .*/B is a reference model, but "
            r"task\.reference none",
        ),
        (
            ["task.reference_path={B}/nowhere"],
            r"^tscale: error: task\.reference_path: .*/nowhere is not an HF model folder",
        ),
    ],
)
def test_a_wrong_reference_folder_is_one_line(
    tmp_path: Path,
    folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    message: str,
) -> None:
    given = [o.format(**{k: str(v) for k, v in folders.items()}) for o in overrides]
    rows = run_from(tmp_path, "bad", folders["A"], "task.type=dpo", *given, code=2)
    err = capsys.readouterr().err.strip()
    assert not rows and len(err.splitlines()) == 1, err
    assert re.match(message, err), err
