"""tscale.testing: the strategies produce what they promise; the assertions can fail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from tensordict import TensorDict

from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.optim import adamw
from tscale.testing import (
    assert_no_alias,
    assert_transform_contract,
    assert_trees_close,
    assert_trees_equal,
    batches,
    float_dtypes,
    train_states,
    trees,
)


@given(trees(min_leaves=2, max_leaves=5, dtype=float_dtypes(), locked=True))
def test_trees_are_locked_float_trees(t):
    assert t.is_locked and t.batch_size == torch.Size([])
    assert 2 <= len(T.leaves(t)) <= 5
    assert all(x.dtype in (torch.float32, torch.float64) for x in T.leaves(t))


@given(batches(vocab_size=11, max_batch=3, max_len=7))
def test_batches_have_shifted_labels(b):
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape and ids.max() < 11
    trained = labels != -100
    assert torch.equal(labels[:, :-1][trained[:, :-1]], ids[:, 1:][trained[:, :-1]])
    assert (labels[:, -1] == -100).all()


@given(train_states(init=adamw(1e-3).init))
def test_train_states_hold_optimizer_state(s):
    assert isinstance(s, TrainState) and s.params.is_locked and int(s.step) == 0
    assert T.leaf_keys(s.opt_state["0", "mu"]) == T.leaf_keys(s.params)


def test_assertions_fail_when_they_should():
    a = TensorDict({"x": torch.zeros(3)}, [])
    b = TensorDict({"x": torch.tensor([0.0, 0.0, 1e-3])}, [])
    with pytest.raises(AssertionError, match="'x'"):
        assert_trees_close(a, b, atol=1e-6, rtol=0)
    assert_trees_close(a, b, atol=1e-2, rtol=0)
    with pytest.raises(AssertionError, match="bitwise"):
        assert_trees_equal(a, TensorDict({"x": torch.tensor([0.0, 0.0, -0.0])}, []))
    nan = TensorDict({"x": torch.tensor([float("nan")])}, [])
    assert_trees_equal(nan, nan.clone())
    with pytest.raises(AssertionError, match="aliases"):
        assert_no_alias(a, TensorDict({"y": a["x"][1:]}, []))
    assert_no_alias(a, a.clone())


def test_assert_transform_contract_catches_a_transform_that_edits_params():
    from tscale.optim import GradientTransformation, adamw, empty_state

    params = TensorDict({"w": torch.ones(3), "m": torch.ones(2, 2)}, [])
    assert_transform_contract(adamw(1e-2), params, check_finite=True)

    def bad_update(updates, state, p):
        p["w"].add_(1.0)  # breaks the contract: params belong to apply_updates
        return updates, state

    with pytest.raises(AssertionError, match="modified params leaf 'w'"):
        assert_transform_contract(
            GradientTransformation(lambda p: empty_state(), bad_update), params.clone()
        )

    def reshaping(updates, state, p):
        return updates.apply(lambda u: u.double()), state

    with pytest.raises(AssertionError, match="structure"):
        assert_transform_contract(
            GradientTransformation(lambda p: empty_state(), reshaping), params.clone()
        )
