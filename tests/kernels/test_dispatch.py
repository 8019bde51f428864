"""Backend dispatch and the per-mode loading of the Triton halves (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tscale.kernels import _dispatch


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)],
)
def test_interpret_enabled_reads_the_environment_now(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _dispatch.interpret_enabled() is expected


def test_conftest_sets_the_interpreter_per_test():
    assert _dispatch.interpret_enabled()


def test_compiled_and_interpreted_modules_coexist(monkeypatch: pytest.MonkeyPatch):
    """Each mode gets its own module object, so its jit functions are all of one kind."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted = _dispatch.triton_module("_rmsnorm_triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = _dispatch.triton_module("_rmsnorm_triton")
    assert interpreted is not compiled
    assert isinstance(interpreted._rms_fwd, InterpretedFunction)
    assert isinstance(compiled._rms_fwd, JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.triton_module("_rmsnorm_triton") is interpreted


def test_importing_kernels_does_not_import_triton():
    code = "import sys, tscale.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_backend_is_an_error():
    import torch

    with pytest.raises(_dispatch.KernelError, match="backend must be one of"):
        _dispatch.use_triton("gpu", "k", torch.zeros(1), supported=None)


def test_auto_never_picks_triton_for_cpu_tensors():
    import torch

    assert not _dispatch.use_triton("auto", "k", torch.zeros(1), supported=None)
