"""The data options from YAML: templates and loss modes, packing, bad rows quarantined."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tscale.config import load_config
from tscale.train import train

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=128",
    "data.synthetic.num_train=300",
    "data.synthetic.num_eval=8",
    "data.synthetic.max_items=5",
    "data.tokenizer.vocab_size=300",
    "data.batch_size=8",
    "data.max_length=64",
    "optimizer.lr=3e-3",
    "scheduler.warmup_steps=2",
    "train.max_steps=12",
    "train.log_every=4",
    "train.progress=false",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=4",
    "eval.num_show=0",
]


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def test_packing_from_yaml_trains_on_packed_rows(tmp_path: Path):
    seen = []

    def spy(model, tx):
        from tscale.losses import make_lm_loss
        from tscale.step import make_train_step

        inner = make_train_step(make_lm_loss(model.apply), tx)

        def step(state, batch):
            seen.append(batch)
            return inner(state, batch)

        return step

    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", "data.packing.enabled=true"])
    result = train(cfg, console=Console(quiet=True), make_step=spy)
    batch = seen[0]
    assert set(batch.keys()) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert int(batch["doc_ids"].max()) > 1  # several documents share a row
    assert batch["input_ids"].shape[1] == 64
    assert "fill" in result.summary["data"]["packing"]
    assert sum(_losses(tmp_path)[-4:]) < sum(_losses(tmp_path)[:4])


def test_chat_records_with_a_template_and_bad_rows_quarantined(tmp_path: Path):
    rows = []
    for i in range(120):
        a, b = i % 10, (i * 7) % 10
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"add {a} and {b}"},
                    {"role": "assistant", "content": f"{a + b}"},
                ]
            }
        )
    rows.append({"messages": [{"role": "user", "content": "no reply"}]})  # nothing to train on
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "x " * 200},
                {"role": "assistant", "content": "too long"},
            ]
        }
    )
    train_file = tmp_path / "chat.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            f"run.output_dir={run}",
            f"data.train_files=[{train_file}]",
            f"data.eval_files=[{eval_file}]",
            "data.template=chatml",
            "data.loss_mode=assistant_only",
        ],
    )
    result = train(cfg, console=Console(quiet=True))
    errors = result.summary["data"]["train_encode_errors"]
    assert errors == {"no trained tokens": 1}, errors
    quarantined = [
        json.loads(x) for x in (run / "data" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert len(quarantined) == 1
    assert all(q["record"]["messages"] for q in quarantined)  # the original record is kept
    # the over-long row is truncated to data.max_length, not lost
    assert result.summary["data"]["train_examples"] == 121
    assert result.summary["data"]["train"]["truncated"] >= 1
    assert "exact_match" in result.summary["eval"]
