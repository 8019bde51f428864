"""Defaults that depend on the run (fine-tuning ``model.path`` vs random init), resolved in one
function, and ``train.epochs`` as the run's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tscale.cli import main
from tscale.config import load_config
from tscale.config.schema import (
    PRETRAINED_DEFAULTS,
    RANDOM_INIT_DEFAULTS,
    model_max_positions,
    resolve_defaults,
)
from tscale.data import synthetic
from tscale.data.tokenize import load_or_train_tokenizer
from tscale.errors import ConfigError
from tscale.testing.runs import TINY_MODEL
from tscale.train import builders, data_build, train

TINY = [
    *TINY_MODEL,
    "data.synthetic.num_train=100",
    "data.synthetic.num_eval=8",
    "data.synthetic.max_items=5",
    "data.batch_size=16",
    "data.max_length=32",
    "scheduler.warmup_steps=1",
    "train.log_every=4",
    "train.progress=false",
    "eval.num_samples=0",
    "run.threads=1",
]
PER_EPOCH = 100 // 16  # full batches of the synthetic training set


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny HF Llama checkpoint (max_position_embeddings 48), a tokenizer.json it fits, and
    prompt/completion train files."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pretrained")
    records, _ = synthetic.make_splits(
        ["reverse", "sort"], 100, 0, seed=2, min_items=3, max_items=5
    )
    train_file = synthetic.write_jsonl(records, root / "train.jsonl")
    tok = load_or_train_tokenizer(None, [train_file], 300, cache_dir=root)
    tok_file = root / "tokenizer.json"
    tok.save(str(tok_file))
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=48,
        tie_word_embeddings=False,
    )
    model_dir = root / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    return {"model": model_dir, "tokenizer": tok_file, "train": train_file, "root": root}


def _model_dir(tmp_path: Path, positions: int) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    return tmp_path


def test_random_init_keeps_the_quickstart_defaults():
    cfg = resolve_defaults(load_config(None))
    assert cfg.optimizer.lr == RANDOM_INIT_DEFAULTS["optimizer.lr"] == 1e-3
    assert cfg.data.max_length == 64 and cfg.data.loss_mode == "completion_only"
    assert cfg.train.max_steps == 100 and cfg.train.epochs is None
    assert resolve_defaults(cfg) == cfg  # resolving twice changes nothing


@pytest.mark.parametrize(("positions", "length"), [(48, 48), (4096, 1024)])
def test_model_path_resolves_fine_tuning_defaults(tmp_path: Path, positions: int, length: int):
    cfg = resolve_defaults(load_config(None, [f"model.path={_model_dir(tmp_path, positions)}"]))
    assert cfg.optimizer.lr == PRETRAINED_DEFAULTS["optimizer.lr"] == 2e-5
    assert cfg.data.max_length == length  # min(1024, the model's max positions)
    assert cfg.data.loss_mode == "assistant_only"
    assert cfg.train.epochs == 1.0 and cfg.train.max_steps is None
    lora = load_config(None, [f"model.path={tmp_path}", "lora.enabled=true"])
    assert resolve_defaults(lora).optimizer.lr == 2e-4  # adapters start at zero
    assert resolve_defaults(load_config(None, ["lora.enabled=true"])).optimizer.lr == 1e-3


def test_explicit_values_win(tmp_path: Path):
    explicit = [
        "optimizer.lr=1e-4",
        "data.max_length=40",
        "data.loss_mode=last_turn_only",
        "train.max_steps=7",
    ]
    for path in ([], [f"model.path={_model_dir(tmp_path, 48)}"]):
        cfg = resolve_defaults(load_config(None, [*path, *explicit]))
        assert cfg.optimizer.lr == 1e-4 and cfg.data.max_length == 40
        assert cfg.data.loss_mode == "last_turn_only"
        assert cfg.train.max_steps == 7 and cfg.train.epochs is None  # no default epochs


def test_max_positions_from_config_json(tmp_path: Path):
    assert model_max_positions(_model_dir(tmp_path, 512)) == 512
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 256}))  # GPT-2's name
    assert model_max_positions(tmp_path) == 256
    assert model_max_positions(tmp_path / "missing") is None


def test_validate_checks_the_resolved_values(tmp_path: Path):
    model = _model_dir(tmp_path, 48)
    with pytest.raises(ConfigError, match=r"data.max_length \(64\) exceeds the max_position_emb"):
        builders.validate(load_config(None, [f"model.path={model}", "data.max_length=64"]))
    builders.validate(load_config(None, [f"model.path={model}"]))  # 48: fits
    with pytest.raises(ConfigError, match=r"train\.epochs: data\.streaming"):
        builders.validate(load_config(None, [f"model.path={model}", "data.streaming=true"]))
    with pytest.raises(ConfigError, match=r"train\.epochs must be > 0, got 0"):
        builders.validate(load_config(None, ["train.epochs=0"]))
    with pytest.raises(ConfigError, match=r"scheduler.warmup_steps \(200\) exceeds"):
        builders.validate(load_config(None, ["scheduler.warmup_steps=200"]))  # max_steps 100


def test_config_show_prints_resolved_values(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["config", "show", "configs/quickstart.yaml", "train.max_steps=null"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optimizer"]["lr"] == 3e-3 and shown["train"]["max_steps"] == 100
    assert shown["data"]["loss_mode"] == "completion_only"
    model = _model_dir(tmp_path, 48)
    unset = ["train.max_steps=null", "optimizer.lr=null", "data.max_length=null"]
    assert main(["config", "show", "configs/quickstart.yaml", f"model.path={model}", *unset]) == 0
    out = capsys.readouterr().out
    assert "# train.max_steps: train.epochs (1) x the steps per epoch" in out
    shown = yaml.safe_load(out)
    assert shown["optimizer"]["lr"] == 2e-5 and shown["data"]["max_length"] == 48
    assert shown["data"]["loss_mode"] == "assistant_only"
    assert shown["train"]["epochs"] == 1.0 and shown["train"]["max_steps"] is None


def test_auto_loss_mode_trains_exactly_the_completion_of_prompt_completion_records(
    tmp_path: Path,
):
    """Why ``auto`` may resolve to assistant_only: on prompt/completion records it trains the
    same tokens as completion_only (and on chat data every assistant turn)."""
    bundles = [
        data_build.build_data(
            load_config(
                None, [*TINY, f"run.output_dir={tmp_path / mode}", f"data.loss_mode={mode}"]
            ),
            tmp_path / mode,
        )
        for mode in ("completion_only", "assistant_only")
    ]
    a, b = (bundle.train_examples for bundle in bundles)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert list(x["input_ids"]) == list(y["input_ids"])
        assert list(x["labels"]) == list(y["labels"])


def test_model_path_run_uses_the_fine_tuning_defaults(tmp_path: Path, pretrained: dict[str, Path]):
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.path={pretrained['model']}",
            f"data.tokenizer.path={pretrained['tokenizer']}",
            f"data.train_files=[{pretrained['train']}]",
            "data.batch_size=16",
            f"run.output_dir={run}",
            "train.progress=false",
            "run.threads=1",
        ],
    )
    console = Console(record=True, width=200)
    result = train(cfg, console=console)
    out = console.export_text()
    per_epoch = -(-100 // 16)  # data.drop_last is false when fine-tuning: 4 rows in a last batch
    assert f"train.epochs 1: {per_epoch} steps per epoch (100 examples" in out
    assert result.final_step == per_epoch
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 2e-5
    assert saved["data"]["max_length"] == 48 and saved["data"]["loss_mode"] == "assistant_only"
    assert saved["train"]["epochs"] == 1.0 and saved["train"]["max_steps"] == per_epoch
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, per_epoch + 1))
    assert rows[0]["lr"] == pytest.approx(2e-5)  # cosine, no warmup: the peak at step 1


@pytest.mark.parametrize(
    ("extra", "steps"),
    [
        (["train.epochs=2"], 2 * PER_EPOCH),
        (["train.epochs=0.5"], 3),  # ceil(0.5 x 6)
        (["train.epochs=2", "train.max_steps=5"], 5),  # whichever comes first
        (["train.epochs=1", "train.max_steps=50"], PER_EPOCH),
    ],
)
def test_epochs_set_the_steps_and_the_schedule_total(tmp_path: Path, extra: list[str], steps: int):
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, f"run.output_dir={run}", "optimizer.lr=3e-3", *extra])
    result = train(cfg, console=Console(quiet=True))
    assert result.final_step == steps
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # the schedule knows the total: cosine over exactly `steps` steps
    total = load_config(None, [*TINY, "optimizer.lr=3e-3", f"train.max_steps={steps}"])
    schedule = builders.build_schedule(total)
    assert [r["lr"] for r in rows] == [float(schedule(s - 1)) for s in range(1, steps + 1)]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == steps
