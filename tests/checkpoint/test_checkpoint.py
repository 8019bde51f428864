"""Atomic checkpoints: round trip, structure checks, and saves killed at random moments."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from tscale.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from tscale.core import rng as R
from tscale.core.state import TrainState
from tscale.errors import CheckpointError
from tscale.testing import assert_trees_equal


def _state(seed: int = 0, width: int = 8) -> TrainState:
    g = torch.Generator().manual_seed(seed)
    params = TensorDict(
        {"model": {"w": torch.randn(width, width, generator=g), "norm": torch.ones(width)}}, []
    )
    opt = TensorDict(
        {
            "0": {"mu": params.apply(torch.randn_like), "count": torch.tensor(7)},
            "1": {},  # a stateless transform: must survive the round trip
        },
        [],
    )
    return TrainState.create(params, opt, R.key(seed)).replace(step=torch.tensor(5))


def test_round_trip_is_bitwise(tmp_path: Path):
    s = _state()
    path = save_checkpoint(
        tmp_path,
        s,
        step=5,
        cursor={"epoch": 1, "index": 3},
        config_yaml="a: 1\n",
        files={"note.txt": _write(tmp_path / "note.txt", "hi")},
    )
    assert path.name == "step_00000005"
    loaded, meta = load_checkpoint(path, _state(seed=1))
    assert_trees_equal(loaded, s)
    assert loaded.params.is_locked
    assert "1" in loaded.opt_state
    assert meta["cursor"] == {"epoch": 1, "index": 3}
    assert (path / "config.yaml").read_text() == "a: 1\n"
    assert (path / "note.txt").read_text() == "hi"


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_mismatched_structure_is_a_clear_error(tmp_path: Path):
    path = save_checkpoint(tmp_path, _state(width=8), step=1)
    with pytest.raises(CheckpointError, match=r"leaf 'model\.w' is torch.float32\[8, 8\]"):
        load_checkpoint(path, _state(width=4))
    with pytest.raises(CheckpointError, match=r"no state\.json"):
        load_checkpoint(tmp_path / "nope", _state())


def test_latest_and_prune(tmp_path: Path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(), step=step)
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000001"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_resave_same_step_replaces(tmp_path: Path):
    save_checkpoint(tmp_path, _state(seed=0), step=4)
    save_checkpoint(tmp_path, _state(seed=3), step=4)
    loaded, _ = load_checkpoint(tmp_path / "step_00000004", _state())
    assert_trees_equal(loaded.params, _state(seed=3).params)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from tensordict import TensorDict
    from tscale.checkpoint import save_checkpoint
    from tscale.core import rng as R
    from tscale.core.state import TrainState
    root = sys.argv[1]
    params = TensorDict({f"w{i}": torch.full((512, 512), float(i)) for i in range(24)}, [])
    opt = TensorDict({"mu": params.clone()}, [])
    state = TrainState.create(params, opt, R.key(0))
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        save_checkpoint(root, state, step=step, cursor={"index": step})
    """
)


def test_killed_saves_never_leave_a_loadable_partial_checkpoint(tmp_path: Path, fork_launcher):
    """SIGKILL a process that saves 48 MB checkpoints in a loop, at varying moments (the
    process forked by the ``fork_launcher`` fixture, torch already imported)."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    root = tmp_path / "ckpts"
    template = None
    seen_partial = False
    for trial in range(4):
        log = tmp_path / f"saver{trial}.log"
        proc = fork_launcher.start([str(root)], log, script=script)
        deadline = time.monotonic() + 120
        while "ready" not in proc.output():
            assert proc.poll() is None, proc.output()
            assert time.monotonic() < deadline, "the saver never got ready"
            time.sleep(0.005)
        time.sleep(0.05 + 0.07 * trial)
        assert proc.kill() == -signal.SIGKILL, proc.output()
        seen_partial |= any(p.name.startswith(".tmp-") for p in root.iterdir())
        for ckpt in list_checkpoints(root):
            meta = json.loads((ckpt / "state.json").read_text())
            if template is None:
                params = TensorDict({f"w{i}": torch.zeros(512, 512) for i in range(24)}, [])
                template = TrainState.create(
                    params, TensorDict({"mu": params.clone()}, []), R.key(0)
                )
            loaded, _ = load_checkpoint(ckpt, template)
            assert meta["cursor"]["index"] == meta["step"]
            assert float(loaded.params["w23"][0, 0]) == 23.0
        # the next save cleans what the killed one left behind
    save_checkpoint(root, _state(), step=10_000)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert latest_checkpoint(root).name == "step_00010000"
    # At least one kill landed mid-save (else this test proved nothing): 48 MB saves are slow.
    assert seen_partial
