"""Compile the Triton kernels for a GPU target ahead of time, on a machine without a GPU.

The interpreter checks what the kernels compute but not that Triton's compiler accepts them (it
rejects loop-carried type changes, unsupported ops, shapes the target cannot tile). ``capture``
runs a launcher of a kernel module with CPU tensors while each ``kernel[grid](...)`` is recorded
instead of launched; ``compile_launch`` compiles one recorded call with ``triton.compile`` for
``cuda:<capability>`` through the ``ptxas`` bundled with Triton (no CUDA driver needed), and
``resource_usage`` reads the registers and stack (spill) bytes of the result with ``cuobjdump``.
Used by the kernel tests and to pick the block sizes in ``_flash_attention_triton._configs``.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}

Launch = tuple[Any, tuple, dict]


class _Recorder:
    def __init__(self, kernel: Any, calls: list[Launch]) -> None:
        self.kernel = kernel
        self.calls = calls

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def capture(module: ModuleType, *names: str) -> Iterator[list[Launch]]:
    """Within the block, launches of ``module.<name>`` are recorded as (kernel, args, kwargs)."""
    calls: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], calls))
        yield calls
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def bundled_tool(name: str) -> Path | None:
    """Path of a CUDA tool (``ptxas``, ``cuobjdump``) shipped with the Triton wheel, if any."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def _sig(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(kernel: Any, args: tuple, kwargs: dict, *, capability: int = 90) -> Any:
    """``triton.compile`` one recorded launch for ``cuda:<capability>``; returns the kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = kernel.arg_names
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    const_names = {names[i] for i in kernel.constexprs}
    signature = {n: ("constexpr" if n in const_names else _sig(values[n])) for n in names}
    constexprs = {n: values[n] for n in names if n in const_names}
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def resource_usage(compiled: Any) -> dict[str, int]:
    """``{"registers", "stack", "shared"}`` of a compiled kernel (stack > 0 means spilling)."""
    tool = bundled_tool("cuobjdump")
    usage = {"registers": -1, "stack": -1, "shared": int(compiled.metadata.shared)}
    if tool is None:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m:
        usage["registers"], usage["stack"] = int(m.group(1)), int(m.group(2))
    return usage
