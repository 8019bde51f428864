"""Fused linear cross-entropy against the plain PyTorch definition, in values and gradients.

Tolerances (fp32 inputs, interpreter on CPU): loss sums and gradients agree with
``linear_cross_entropy_reference`` to ``rtol=atol=1e-5`` (observed differences are ~3e-6 on
gradients of size ~1: the chunked sums and the online log-sum-exp round in a different order).
fp64 through the chunked PyTorch path agrees to 1e-12. bf16 inputs: the loss to 1e-3 relative, the
gradients to one bf16 ulp of their scale (both round to bf16 at the same points, the logits
before the loss and ``dlogits`` before the gradient matmuls).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tscale.errors import ShapeError
from tscale.kernels import (
    KernelError,
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from tscale.kernels import cross_entropy as ce

N, H, V = 16, 32, 50
TOL = {"rtol": 1e-5, "atol": 1e-5}
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": -1},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 2.5, "ignore_index": 7},
}
# Small chunks so the tiny problem still takes several token and vocabulary chunks with tails.
SMALL_CHUNKS = 6 * V * 4


def _problem(seed: int = 0, dtype: torch.dtype = torch.float32, ignore: int = -100, n: int = N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = ignore  # some tokens are not trained
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, grad_out=None, **kw):
    loss, tokens = fn(hidden, weight, labels, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out
    gh, gw = torch.autograd.grad(loss, (hidden, weight), g)
    return loss.detach(), tokens, gh, gw


def _triton(hidden, weight, labels, **kw):
    return linear_cross_entropy(hidden, weight, labels, backend="triton", **kw)


IMPLS = {"triton": _triton, "chunked": linear_cross_entropy_chunked}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_reference(impl: str, option: str):
    if impl == "triton":
        pytest.importorskip("triton")
    kw = OPTIONS[option]
    hidden, weight, labels = _problem(ignore=kw.get("ignore_index", -100))
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, **kw)
    out = _run(IMPLS[impl], hidden, weight, labels, chunk_bytes=SMALL_CHUNKS, **kw)
    assert int(out[1]) == int(ref[1]) == int((labels != kw.get("ignore_index", -100)).sum())
    for a, b in zip(out[:1] + out[2:], ref[:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reductions(impl: str, reduction: str):
    """``none`` returns per-token losses; a non-uniform upstream gradient scales each token."""
    if impl == "triton":
        pytest.importorskip("triton")
    hidden, weight, labels = _problem(seed=1)
    hidden3 = hidden.detach().reshape(2, N // 2, H).requires_grad_()
    labels3 = labels.reshape(2, N // 2)
    grad_out = None
    if reduction == "none":
        grad_out = torch.linspace(-1.0, 2.0, N).reshape(2, N // 2)
    kw = {"reduction": reduction, "z_loss": 1e-3, "label_smoothing": 0.05}
    ref = _run(linear_cross_entropy_reference, hidden3, weight, labels3, grad_out, **kw)
    out = _run(IMPLS[impl], hidden3, weight, labels3, grad_out, chunk_bytes=SMALL_CHUNKS, **kw)
    assert out[0].shape == ref[0].shape == ((2, N // 2) if reduction == "none" else ())
    for a, b in zip(out[:1] + out[2:], ref[:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_is_a_finite_zero(impl: str):
    if impl == "triton":
        pytest.importorskip("triton")
    hidden, weight, labels = _problem()
    labels = torch.full_like(labels, -100)
    for reduction in ("sum", "mean"):
        loss, tokens, gh, gw = _run(IMPLS[impl], hidden, weight, labels, reduction=reduction)
        assert float(loss) == 0.0 and int(tokens) == 0
        assert not gh.any() and not gw.any()


def test_bf16_triton_matches_reference():
    pytest.importorskip("triton")
    hidden, weight, labels = _problem(dtype=torch.bfloat16)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=4.0)
    out = _run(_triton, hidden, weight, labels, softcap=4.0, chunk_bytes=SMALL_CHUNKS)
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(out[2:], ref[2:], strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=b.abs().max().item() / 64)


def test_float64_chunked_is_exact():
    hidden, weight, labels = _problem(dtype=torch.float64)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, **kw)
    out = _run(linear_cross_entropy_chunked, hidden, weight, labels, chunk_bytes=64, **kw)
    assert out[0].dtype == torch.float64
    for a, b in zip(out[:1] + out[2:], ref[:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Largest tensor any op produced (not counting the interpreter's host copies of storages)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.set_.source_Storage, torch.ops.aten.copy_.default):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_never_materialises_all_logits(impl: str):
    """No tensor of the forward or backward reaches N x V elements (the reference does)."""
    if impl == "triton":
        pytest.importorskip("triton")
    n, h, v = 32, 4, 128
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    with _LargestTensor() as mode:
        out = _run(IMPLS[impl], hidden, weight, labels, chunk_bytes=8 * v * 4)
    assert mode.largest <= n * v // 4
    with _LargestTensor() as ref_mode:
        ref = _run(linear_cross_entropy_reference, hidden, weight, labels)
    assert ref_mode.largest >= n * v
    torch.testing.assert_close(out[0], ref[0], **TOL)


def test_auto_dispatch_on_cpu(monkeypatch: pytest.MonkeyPatch):
    """CPU: the reference for small problems, the chunked algorithm above the threshold."""
    hidden, weight, labels = _problem()
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels)
    small = _run(linear_cross_entropy, hidden, weight, labels)
    monkeypatch.setattr(ce, "REFERENCE_MAX_LOGITS", 0)
    calls = []
    real = ce._LinearCrossEntropy.apply

    def spy(*args):
        calls.append(args[-1].impl)
        return real(*args)

    monkeypatch.setattr(ce._LinearCrossEntropy, "apply", spy)
    large = _run(linear_cross_entropy, hidden, weight, labels, chunk_bytes=SMALL_CHUNKS)
    assert calls == ["torch"]
    for a, b, c in zip(small, large, ref, strict=True):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)


def test_torch_func_grad_matches_autograd():
    """The autograd.Function is new-style, so ``torch.func.grad`` differentiates through it."""
    hidden, weight, labels = _problem()

    def loss_fn(h, w):
        return linear_cross_entropy_chunked(h, w, labels, z_loss=1e-3, chunk_bytes=SMALL_CHUNKS)[0]

    gh, gw = torch.func.grad(loss_fn, argnums=(0, 1))(hidden.detach(), weight.detach())
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, z_loss=1e-3)
    torch.testing.assert_close(gh, ref[2], **TOL)
    torch.testing.assert_close(gw, ref[3], **TOL)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    hidden, weight, labels = _problem()
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"label_smoothing": 1.5}, KernelError, "label_smoothing"),
        ({"z_loss": -1.0}, KernelError, "z_loss"),
        ({"softcap": 0.0}, KernelError, "softcap"),
        ({"reduction": "avg"}, KernelError, "reduction"),
        ({"backend": "cuda"}, KernelError, "backend"),
    ],
)
def test_bad_options(kwargs, error, match):
    hidden, weight, labels = _problem()
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_shapes():
    hidden, weight, labels = _problem()
    with pytest.raises(ShapeError, match="agree in H"):
        linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ShapeError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ShapeError, match="dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_gradient(impl: str):
    """A frozen head (LoRA) gets no gradient; the hidden states still get theirs."""
    if impl == "triton":
        pytest.importorskip("triton")
    hidden, weight, labels = _problem()
    frozen = weight.detach()
    loss, _ = IMPLS[impl](hidden, frozen, labels, chunk_bytes=SMALL_CHUNKS)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(gh, ref[2], **TOL)
