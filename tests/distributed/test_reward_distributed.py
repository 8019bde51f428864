"""A reward model (score head included) under FSDP and DDP (plain and overlapped) on two gloo
processes equals one process on the same global batch, with ranks holding uneven pair counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKER = str(Path(__file__).resolve().parent / "_reward_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, torchrun) -> dict:
    out = tmp_path_factory.mktemp("reward") / "results.json"
    torchrun([WORKER, str(out)], nproc=2)
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("case", ["fsdp", "ddp", "ddp-overlap"])
def test_reward_steps_equal_one_process(two_ranks: dict, case: str) -> None:
    r = two_ranks[case]
    assert r["score_moved"] > 1e-3  # the head trains (sharded over uneven rows under FSDP)
    assert r["param_err"] < 1e-5, r
    assert r["loss_err"] < 1e-5 and r["acc_err"] == 0.0, r
