"""Frozen trees in checkpoints: recorded by folder + fingerprint, or saved when they have none;
format-1 checkpoints (before frozen trees were recorded) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from tscale.checkpoint import load_checkpoint, save_checkpoint
from tscale.checkpoint.frozen import FrozenSource, folder_fingerprint
from tscale.core import rng as R
from tscale.core.state import TrainState
from tscale.errors import CheckpointError
from tscale.testing import assert_trees_equal
from tscale.testing.hf_folders import make_model_folder


def _tree(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"model": {"w": torch.randn(4, 4, generator=g)}}, [])


def _state(frozen: dict) -> TrainState:
    params = _tree(0)
    return TrainState.create(params, TensorDict({"mu": _tree(1)}, []), R.key(0), frozen)


def test_a_frozen_tree_without_a_folder_is_saved_and_read_back(tmp_path: Path) -> None:
    base = _tree(2)
    path = save_checkpoint(tmp_path, _state({"base": base}), step=3)
    meta = json.loads((path / "state.json").read_text())
    assert meta["format_version"] == 2 and meta["frozen"] == {
        "base": {"file": "frozen.base.safetensors"}
    }
    restored, _ = load_checkpoint(path, _state({"base": _tree(9)}))
    assert_trees_equal(restored.frozen["base"], base)


def test_a_frozen_tree_from_a_folder_is_recorded_not_copied(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "base", "qwen2", vocab_size=300)
    source = FrozenSource.of(folder)
    base = _tree(2)
    path = save_checkpoint(
        tmp_path / "ckpt", _state({"base": base}), step=1, frozen_sources={"base": source}
    )
    entry = json.loads((path / "state.json").read_text())["frozen"]["base"]
    assert entry == {"path": source.path, "fingerprint": source.fingerprint}
    assert not list(path.glob("frozen.*"))  # adapter-only checkpoints
    restored, _ = load_checkpoint(path, _state({"base": base}), {"base": FrozenSource.of(folder)})
    assert restored.frozen["base"] is base

    # the same weights copied elsewhere fingerprint the same: a moved folder still resumes
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert folder_fingerprint(copy) == source.fingerprint

    # other weights in the folder: one line naming the tree, the folder and what to do
    weights = next(Path(folder).glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"frozen tree 'base' was .* holds other weights"
    ) as e:
        load_checkpoint(path, _state({"base": base}), {"base": FrozenSource.of(folder)})
    assert "\n" not in str(e.value)


def test_a_format_1_checkpoint_keeps_the_runs_frozen_trees(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _state({}), step=2)
    meta = json.loads((path / "state.json").read_text())
    meta["format_version"] = 1
    del meta["frozen"]
    (path / "state.json").write_text(json.dumps(meta))
    base = _tree(5)
    restored, meta = load_checkpoint(path, _state({"base": base}))
    assert meta["step"] == 2 and restored.frozen["base"] is base
