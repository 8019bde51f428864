"""Filesystem faults while saving and before a run: one line, earlier checkpoints intact, no
temporary leftovers. Faults are injected in-process through the writer's seam
(``tscale.checkpoint.io.write_hook``): CI runs as root, where permissions block nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from tscale.checkpoint import io, latest_checkpoint, list_checkpoints, load_checkpoint
from tscale.cli import main
from tscale.core import rng as R
from tscale.core.state import TrainState
from tscale.errors import CheckpointError
from tscale.testing import assert_trees_equal
from tscale.testing.runs import step_rows, write_tiny_config


def _state(seed: int) -> TrainState:
    g = torch.Generator().manual_seed(seed)
    params = TensorDict({"w": torch.randn(4, 4, generator=g), "b": torch.zeros(4)}, [])
    opt = TensorDict({"0": {"mu": torch.randn(4, 4, generator=g)}, "1": {}}, [])
    return TrainState.create(params, opt, R.key(seed))


def _save(root: Path, step: int, tokenizer: Path) -> Path:
    return io.save_checkpoint(
        root,
        _state(step),
        step=step,
        config_yaml="a: 1\n",
        files={"tokenizer.json": tokenizer},
    )


def _writes_of_one_save(tmp_path: Path) -> int:
    counter = io.FailNthWrite(10**9, errno.ENOSPC)
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    with io.write_hook(counter):
        _save(tmp_path / "count", 1, tok)
    return counter.writes


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_fault_at_every_write_leaves_the_last_checkpoint_whole(tmp_path: Path, code: int):
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    root = tmp_path / "checkpoints"
    first = _save(root, 10, tok)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    writes = _writes_of_one_save(tmp_path)
    assert writes >= 6  # root, temp dir, params, opt_state, state.json, config.yaml, tokenizer
    for n in range(1, writes + 1):
        with io.write_hook(io.FailNthWrite(n, code)), pytest.raises(CheckpointError) as info:
            _save(root, 20, tok)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"saving the checkpoint of step 20 under {root} failed: ")
        assert f"({errno.errorcode[code]}) at {tmp_path}" in message
        advice = "free space on that disk" if code == errno.ENOSPC else "read-only"
        assert advice in message
        assert f"the last saved checkpoint is step 10 ({first})" in message
        assert "--resume" in message
        assert list_checkpoints(root) == [first], n
        assert {p.name: p.read_bytes() for p in first.iterdir()} == before
        assert not _leftovers(root), n
    loaded, _ = load_checkpoint(first, _state(0))
    assert_trees_equal(loaded.params, _state(10).params)
    assert _save(root, 20, tok).name == "step_00000020"  # the disk has room again


def test_a_first_save_that_fails_says_nothing_was_saved(tmp_path: Path):
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    with io.write_hook(io.FailNthWrite(3, errno.ENOSPC)), pytest.raises(CheckpointError) as info:
        _save(tmp_path / "checkpoints", 5, tok)
    assert "no checkpoint of this run was saved before" in str(info.value)
    assert not _leftovers(tmp_path)


def test_an_interrupted_save_removes_its_temporary_directory(tmp_path: Path):
    def interrupt(path: Path) -> None:
        if path.name == "state.json":
            raise KeyboardInterrupt

    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    with io.write_hook(interrupt), pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "checkpoints", 5, tok)
    assert not _leftovers(tmp_path) and latest_checkpoint(tmp_path / "checkpoints") is None


def test_the_hook_is_removed_after_its_block(tmp_path: Path):
    with io.write_hook(io.FailNthWrite(1, errno.EROFS)):
        pass
    io.check_writable(tmp_path)  # no fault outside the block
    with io.write_hook(io.FailNthWrite(1, errno.EROFS)), pytest.raises(OSError):
        io.check_writable(tmp_path / "not" / "yet")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing


class _FullAt:
    """The disk fills up when the save of ``step`` starts and stays full."""

    def __init__(self, step: int) -> None:
        self.marker, self.full = f"step_{step:08d}", False

    def __call__(self, path: Path) -> None:
        self.full = self.full or self.marker in str(path)
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_mid_run_names_the_last_saved_step_and_resume_continues(tmp_path: Path, capsys):
    cfg, run = write_tiny_config(tmp_path, "full", steps=6)
    args = ["train.save_every=2", "eval.num_samples=0"]
    with io.write_hook(_FullAt(4)):
        assert main(["train", str(cfg), *args]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    ckpts = run / "checkpoints"
    assert f"saving the checkpoint of step 4 under {ckpts} failed: No space left" in err
    assert f"the last saved checkpoint is step 2 ({ckpts / 'step_00000002'})" in err
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002"]
    assert not _leftovers(run)
    assert main(["train", str(cfg), *args, "--resume"]) == 0  # room again: continue from step 2
    assert [r["step"] for r in step_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(ckpts).name == "step_00000006"  # type: ignore[union-attr]


def test_a_read_only_output_dir_is_refused_before_a_fresh_run_or_a_resume(tmp_path: Path, capsys):
    cfg, run = write_tiny_config(tmp_path, "ro", steps=2)
    with io.write_hook(io.FailNthWrite(1, errno.EROFS)):
        assert main(["train", str(cfg)]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tscale: error: run.output_dir: cannot write into {run}: ")
    assert "Read-only file system (EROFS)" in err and "choose a writable run.output_dir" in err
    assert not run.exists()

    assert main(["train", str(cfg), "eval.num_samples=0"]) == 0
    saved = latest_checkpoint(run / "checkpoints")
    assert saved is not None
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with io.write_hook(io.FailNthWrite(1, errno.EROFS)):
        assert main(["train", str(cfg), "train.max_steps=4", "--resume"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"run.output_dir: cannot write into {run}" in err
    assert list_checkpoints(run / "checkpoints") == [saved]
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_an_output_dir_that_is_a_file_is_refused(tmp_path: Path, capsys):
    cfg, run = write_tiny_config(tmp_path, "file", steps=2)
    run.write_text("a file where the run directory should be\n")
    assert main(["train", str(cfg)]) == 2
    _, err = capsys.readouterr()
    assert err == (
        f"tscale: error: run.output_dir: {run} is a file, not a directory; remove it or choose "
        "another run.output_dir\n"
    )


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_fault_in_the_sharded_writer_is_the_same_line(tmp_path: Path):
    from tscale.checkpoint.sharded import save_sharded

    root = tmp_path / "checkpoints"
    first = save_sharded(root, _state(1), step=1, is_main=True, barrier=lambda: None)

    def full_at_state_json(path: Path) -> None:
        if path.name == "state.json" and "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with io.write_hook(full_at_state_json), pytest.raises(CheckpointError) as info:
        save_sharded(root, _state(2), step=2, is_main=True, barrier=lambda: None)
    assert "\n" not in str(info.value)
    assert f"the last saved checkpoint is step 1 ({first})" in str(info.value)
    assert list_checkpoints(root) == [first] and not _leftovers(root)


def test_a_failed_re_save_of_a_step_keeps_the_old_save(tmp_path: Path):
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    root = tmp_path / "checkpoints"
    first = _save(root, 10, tok)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    for n in range(1, _writes_of_one_save(tmp_path) + 2):  # + the rename of the old save back
        with io.write_hook(io.FailNthWrite(n, errno.ENOSPC, sticky=False)):
            try:
                again = _save(root, 10, tok)
            except CheckpointError:
                again = None
        assert list_checkpoints(root) == [first] and not _leftovers(root), n
        if again is None:
            assert {p.name: p.read_bytes() for p in first.iterdir()} == before, n
