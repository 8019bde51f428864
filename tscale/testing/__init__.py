"""Public hypothesis strategies and assertions for testing your own transforms.

Example::

    from hypothesis import given
    from tscale.testing import trees, assert_trees_close

    @given(trees())
    def test_my_transform_keeps_structure(params):
        out = my_transform(params)
        assert_trees_close(out, params, atol=1e-6)
"""

from tscale.testing.assertions import (
    assert_no_alias,
    assert_transform_contract,
    assert_trees_close,
    assert_trees_equal,
)
from tscale.testing.reference import max_abs_diff, random_case
from tscale.testing.strategies import batches, float_dtypes, shapes, train_states, trees

__all__ = [
    "assert_no_alias",
    "assert_transform_contract",
    "assert_trees_close",
    "assert_trees_equal",
    "batches",
    "float_dtypes",
    "max_abs_diff",
    "random_case",
    "shapes",
    "train_states",
    "trees",
]
