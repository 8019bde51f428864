"""The example stage is a parameter of build_data: in memory and streaming run the same stage,
and a stage's Err and Dropped results are quarantined and counted like SFT's."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from tscale.config import load_config
from tscale.config.schema import Config
from tscale.core.result import Err, Ok
from tscale.data.length import Dropped, LengthBudget, LengthReport
from tscale.data.tokenize import Encoder
from tscale.train.data_build import ExampleStage, build_data, sft_examples
from tscale.train.data_template import SelectedTemplate


def _config(tmp_path: Path, *extra: str) -> Config:
    rows = [
        {"prompt": f"what is {i} plus {i}? ", "completion": f"it is {2 * i}."} for i in range(30)
    ]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.train_files=[{data}]",
            "data.tokenizer.vocab_size=300",
            "data.batch_size=2",
            "data.max_length=128",
            "data.max_error_rate=null",
            *extra,
        ],
    )


def tagged(cfg: Config, encoder: Encoder, template: SelectedTemplate) -> ExampleStage:
    """SFT's stage, plus: every 3rd record quarantined, every 5th dropped, the rest tagged."""
    sft = sft_examples(cfg, encoder, template)

    def stage(
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: LengthBudget | None,
        max_length: int | None,
    ) -> tuple[list[Ok[dict] | Err], LengthReport]:
        results, report = sft(records, places, budget=budget, max_length=max_length)
        out: list[Ok[dict] | Err] = []
        for rec, where, res in zip(records, places, results, strict=True):
            n = int(rec["prompt"].split()[2])
            if n % 3 == 0:
                out.append(Err("toy: multiple of three", None, where))
            elif n % 5 == 0:
                out.append(Dropped("toy: multiple of five", None, where))
            else:
                assert isinstance(res, Ok)
                out.append(Ok({**res.value, "labels": [-100] * len(res.value["labels"])}))
        return out, report

    return stage


def test_the_stage_is_used_in_memory(tmp_path: Path):
    bundle = build_data(_config(tmp_path), tmp_path / "run", make_examples=tagged)
    train = bundle.report["train"]
    # 0..29: 10 multiples of 3, 4 of 5 that are not of 3 (5, 10, 20, 25)
    assert (train["rows_read"], train["quarantined"], train["dropped"]) == (30, 10, 4)
    assert train["trained"] == 16 and len(bundle.train_examples) == 16
    assert all(set(e["labels"]) == {-100} for e in bundle.train_examples)
    q = (tmp_path / "run" / "data" / "quarantine.jsonl").read_text().splitlines()
    first = json.loads(q[0])
    assert first["where"].endswith("t.jsonl:line 1") and first["record"]["prompt"].startswith(
        "what is 0"
    )  # the original record, not the stage's None


@pytest.mark.parametrize("packing", [False, True])
def test_the_stage_is_used_streaming(tmp_path: Path, packing: bool):
    cfg = _config(tmp_path, "data.streaming=true", f"data.packing.enabled={str(packing).lower()}")
    bundle = build_data(cfg, tmp_path / "run", make_examples=tagged)
    batches = list(itertools.islice(iter(bundle.loader), 4))
    assert all(set(b["labels"].flatten().tolist()) == {-100} for b in batches)
    train = bundle.report["train"]
    epochs, rest = divmod(train["rows_read"], 30)  # packed rows need more than one pass
    assert epochs >= 1 and rest == 0
    assert (train["quarantined"], train["dropped"]) == (10 * epochs, 4 * epochs)
