"""Hypothesis strategies for params trees, batches and train states."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core.state import TrainState

_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)


def float_dtypes(include_half: bool = False) -> st.SearchStrategy[torch.dtype]:
    """float32/float64 (and bfloat16/float16 when ``include_half``)."""
    choices = [torch.float32, torch.float64]
    if include_half:
        choices += [torch.bfloat16, torch.float16]
    return st.sampled_from(choices)


def shapes(max_dims: int = 3, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes, including 0-d scalars."""
    return st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims).map(tuple)


@st.composite
def _tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, scale: float) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@st.composite
def trees(
    draw,
    *,
    min_leaves: int = 1,
    max_leaves: int = 6,
    max_depth: int = 2,
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] | None = None,
    scale: float = 1.0,
    locked: bool = False,
) -> TensorDict:
    """Nested params-like TensorDicts of random float tensors (``batch_size=[]``)."""
    n = draw(st.integers(min_leaves, max_leaves))
    dt_strategy = dtype if isinstance(dtype, st.SearchStrategy) else st.just(dtype or torch.float32)
    td = TensorDict({}, batch_size=[])
    used: set[tuple[str, ...]] = set()
    while len(used) < n:
        depth = draw(st.integers(0, max_depth))
        key = (*(draw(_NAMES) for _ in range(depth)), f"w{len(used)}")
        if any(key[: i + 1] in used for i in range(len(key))):
            continue
        if any(u[: len(key)] == key for u in used):
            continue
        shape = draw(shapes())
        td.set(key, draw(_tensor(shape, draw(dt_strategy), scale)))
        used.add(key)
    if locked:
        td.lock_()
    return td


@st.composite
def batches(
    draw,
    *,
    vocab_size: int = 32,
    max_batch: int = 4,
    max_len: int = 12,
    ignore_index: int = -100,
) -> TensorDict:
    """Token batches ``{input_ids, labels}`` with pre-shifted labels and some masked positions."""
    b = draw(st.integers(1, max_batch))
    s = draw(st.integers(2, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (b, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = ignore_index
    mask = torch.rand((b, s), generator=g) < draw(st.floats(0.0, 0.5))
    labels[mask] = ignore_index
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[b])


@st.composite
def train_states(
    draw, *, init=None, params: st.SearchStrategy[TensorDict] | None = None
) -> TrainState:
    """Train states over random params; ``init(params) -> opt_state`` defaults to an empty state."""
    p = draw(params if params is not None else trees())
    opt_state = init(p) if init is not None else TensorDict({}, batch_size=[])
    seed = draw(st.integers(0, 2**31 - 1))
    return TrainState.create(p, opt_state, R.key(seed))
