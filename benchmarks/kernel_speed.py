"""tscale's Triton kernels against PyTorch baselines on one CUDA device, in the same process.

* Fused linear cross-entropy, forward + backward (loss, gradients of hidden and weight), bf16:
  tokens 8192 x hidden 4096 x vocab 128256 (Llama 3 8B head) and x hidden 2304 x vocab 256000
  (Gemma 2 2B head). Baselines: eager ``F.cross_entropy((x @ W.T).float(), y)`` and the same
  function under ``torch.compile``; also tscale's chunked pure-PyTorch path. Reported: median time
  and peak memory (total, and above the resident inputs).
* Attention, forward and forward + backward, causal, head dim 128, 16 heads, bf16, 16384 tokens
  as 8 x 2048 and 2 x 8192. Baseline: SDPA restricted to its FlashAttention backend. TFLOP/s with
  the usual causal count (4·B·H·S²·D / 2 forward; backward 2.5x the forward).
* Document-masked attention: one packed row of 16384 tokens with alpaca-like document lengths
  (synthetic: log-normal, median 170 tokens, sigma 0.75, clipped to 16..1024; seeded). Useful
  TFLOP/s counts only within-document causal pairs. Baselines: SDPA with the boolean block-diagonal
  mask (what the model does today), FlexAttention with a document block mask when available, and
  plain causal attention over the whole row (no isolation: the cost of ignoring documents).

Candidates are timed in alternating rounds (CUDA events, median) so clock drift hits all alike.
Writes ``benchmarks/results/kernels-<device>.json`` with the device, torch and triton versions,
and prints one summary line per case. Without CUDA it prints why and exits 0 (nothing measured).

Usage: python benchmarks/kernel_speed.py [--only flce,attention,packed] [--rounds 5] [--iters 5]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _smoke import add_smoke_flag, parse_args

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
# --smoke: the quick shapes, one timing each (tests/benchmarks runs it), unless given explicitly
SMOKE = {"quick": True, "rounds": 1, "iters": 1}


@dataclass(frozen=True)
class Where:
    """Where the candidates run: CUDA (the benchmark), or a CPU smoke run (``--smoke`` without
    CUDA: the Triton kernels under ``TRITON_INTERPRET=1``, float32, tiny shapes, no
    ``torch.compile`` candidates, host timers, no memory figures)."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    backend: str = "auto"  # tscale's kernels: "triton" forces the interpreter on CPU
    compile: bool = True


CUDA = Where()
CPU_SMOKE = Where(device="cpu", dtype=torch.float32, backend="triton", compile=False)
ON = CUDA


def _dtype_name() -> str:
    return str(ON.dtype).removeprefix("torch.")


def _sync() -> None:
    if ON.device == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if ON.device == "cuda":
        torch.cuda.empty_cache()


def _time_ms(fn: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls (CUDA events; host timer on CPU)."""
    times = []
    for _ in range(iters):
        if ON.device != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        _sync()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak(fn: Callable[[], Any]) -> dict[str, float]:
    """Peak allocated memory during one call: total and above what was resident before."""
    if ON.device != "cuda":
        return {}
    _sync()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_total_gib": peak / GIB, "peak_extra_gib": (peak - before) / GIB}


def _compare(
    cands: dict[str, Callable[[], Any]], rounds: int, iters: int, memory: bool = True
) -> dict[str, dict[str, Any]]:
    """Warm up, measure memory once, then time the candidates in alternating rounds."""
    out: dict[str, dict[str, Any]] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in cands.items():
        try:
            fn()  # warm-up (compiles Triton kernels / torch.compile graphs)
            if ON.device == "cuda":  # (once is enough for the CPU smoke run's interpreter)
                fn()
            _sync()
            out[name] = _peak(fn) if memory else {}
            live[name] = fn
        except torch.cuda.OutOfMemoryError:
            out[name] = {"error": "out of memory"}
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        _sync()
        _empty_cache()
    samples: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(rounds):
        for name, fn in live.items():
            samples[name].append(_time_ms(fn, iters))
    for name, ts in samples.items():
        out[name].update({"ms": statistics.median(ts), "ms_rounds": ts})
    return out


# ------------------------------------------------------------------------------------------
# fused linear cross-entropy


def bench_flce(n: int, h: int, v: int, rounds: int, iters: int) -> dict[str, Any]:
    from tscale.kernels import linear_cross_entropy, linear_cross_entropy_chunked

    g = torch.Generator(device=ON.device).manual_seed(0)
    x = torch.randn(n, h, device=ON.device, generator=g).to(ON.dtype).requires_grad_()
    w = (torch.randn(v, h, device=ON.device, generator=g) * h**-0.5).to(ON.dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=ON.device, generator=g)
    y[::10] = -100

    def eager_loss(x, w, y):
        return F.cross_entropy((x @ w.T).float(), y, reduction="sum")

    compiled_loss = torch.compile(eager_loss)

    def step(loss_fn: Callable[..., Any]) -> Callable[[], Any]:
        def run():
            loss = loss_fn(x, w, y)
            if isinstance(loss, tuple):
                loss = loss[0]
            return torch.autograd.grad(loss, (x, w))

        return run

    cands = {
        "tscale_triton": step(partial(linear_cross_entropy, backend=ON.backend)),
        "eager": step(eager_loss),
        "torch_compile": step(compiled_loss),
        "tscale_chunked_torch": step(linear_cross_entropy_chunked),
    }
    if not ON.compile:
        del cands["torch_compile"]
    res = _compare(cands, rounds, iters)
    base = res["eager"].get("ms")
    for r in res.values():
        if base and "ms" in r:
            r["speedup_vs_eager"] = base / r["ms"]
    return {"tokens": n, "hidden": h, "vocab": v, "dtype": _dtype_name(), "results": res}


# ------------------------------------------------------------------------------------------
# attention


def _causal_flops(lengths: list[int], heads: int, d: int) -> float:
    """Forward FLOPs of causal attention over independent sequences (two matmuls, half used)."""
    return sum(4.0 * heads * d * s * s / 2 for s in lengths)


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def bench_attention(total: int, seq: int, heads: int, d: int, rounds: int, iters: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tscale.kernels import attention

    b = total // seq
    g = torch.Generator(device=ON.device).manual_seed(0)
    q, k, v = (
        torch.randn(b, heads, seq, d, device=ON.device, generator=g).to(ON.dtype).requires_grad_()
        for _ in range(3)
    )
    do = torch.randn_like(q)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd(fn):
        return lambda: fn(q, k, v)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    flops = _causal_flops([seq] * b, heads, d)
    out: dict[str, Any] = {
        "tokens": total,
        "batch": b,
        "seq": seq,
        "heads": heads,
        "head_dim": d,
        "causal": True,
        "dtype": _dtype_name(),
        "fwd_flops": flops,
    }
    for mode, wrap, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.5)):
        res = _compare(
            {
                "tscale_triton": wrap(partial(attention, backend=ON.backend)),
                "sdpa_flash": wrap(sdpa),
            },
            rounds,
            iters,
            memory=False,
        )
        for r in res.values():
            r["tflops"] = _tflops(mult * flops, r.get("ms"))
        if res["tscale_triton"].get("ms") and res["sdpa_flash"].get("ms"):
            res["tscale_triton"]["speedup_vs_sdpa_flash"] = (
                res["sdpa_flash"]["ms"] / res["tscale_triton"]["ms"]
            )
        out[mode] = res
    return out


def alpaca_like_lengths(total: int, seed: int = 0) -> list[int]:
    """Synthetic document lengths filling ``total`` tokens (log-normal, median 170, 16..1024)."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        z = torch.randn((), generator=g).item()
        lengths.append(int(min(max(math.exp(math.log(170) + 0.75 * z), 16), 1024)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 1:
        lengths.pop()
        lengths[-1] += total - sum(lengths)
    return lengths


def bench_packed(total: int, heads: int, d: int, rounds: int, iters: int) -> dict[str, Any]:
    from tscale.kernels import attention

    lengths = alpaca_like_lengths(total)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc = doc.to(ON.device)[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=ON.device)
    g = torch.Generator(device=ON.device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, total, d, device=ON.device, generator=g).to(ON.dtype).requires_grad_()
        for _ in range(3)
    )
    do = torch.randn_like(q)
    idx = torch.arange(total, device=ON.device)
    tk = ON.backend
    mask = ((doc[0, :, None] == doc[0, None, :]) & (idx[None, :] <= idx[:, None]))[None, None]

    def sdpa_mask(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    cands: dict[str, Callable[..., Any]] = {
        "tscale_triton_doc_ids": lambda q, k, v: attention(q, k, v, doc_ids=doc, backend=tk),
        "tscale_triton_cu_seqlens": lambda q, k, v: attention(q, k, v, cu_seqlens=cu, backend=tk),
        "sdpa_bool_mask": sdpa_mask,
        "tscale_triton_causal_no_isolation": lambda q, k, v: attention(q, k, v, backend=tk),
    }
    try:
        if not ON.compile:
            raise RuntimeError("left out of the CPU smoke run (torch.compile)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc0 = doc[0]

        def doc_causal(b, h, qi, ki):
            return (doc0[qi] == doc0[ki]) & (ki <= qi)

        block_mask = create_block_mask(doc_causal, None, None, total, total, device="cuda")
        flex = torch.compile(flex_attention)
        cands["flex_attention"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    except Exception as e:  # older torch: no FlexAttention
        print(f"flex_attention unavailable: {e}", file=sys.stderr)

    useful = _causal_flops(lengths, heads, d)
    out: dict[str, Any] = {
        "tokens": total,
        "heads": heads,
        "head_dim": d,
        "dtype": _dtype_name(),
        "documents": len(lengths),
        "mean_doc_len": total / len(lengths),
        "max_doc_len": max(lengths),
        "useful_fwd_flops": useful,
        "lengths": "synthetic alpaca-like: log-normal(median 170, sigma 0.75), clipped 16..1024",
    }
    for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        if mode == "fwd":
            wrapped = {n: (lambda f=f: f(q, k, v)) for n, f in cands.items()}
        else:
            wrapped = {
                n: (lambda f=f: torch.autograd.grad(f(q, k, v), (q, k, v), do))
                for n, f in cands.items()
            }
        res = _compare(wrapped, rounds, iters, memory=mode == "fwd_bwd")
        for r in res.values():
            r["useful_tflops"] = _tflops(mult * useful, r.get("ms"))
        out[mode] = res
    return out


# ------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt(r: dict[str, Any], key: str = "ms") -> str:
    if "error" in r:
        return r["error"]
    s = f"{r[key]:.2f} ms"
    if r.get("peak_total_gib") is not None:
        s += f", peak {r['peak_total_gib']:.2f} GiB"
    for k in ("tflops", "useful_tflops"):
        if r.get(k):
            s += f", {r[k]:.0f} TFLOP/s"
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="flce,attention,packed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, None)
    global ON
    cpu_smoke = args.smoke and not torch.cuda.is_available()
    if not torch.cuda.is_available() and not cpu_smoke:
        print(
            "benchmarks/kernel_speed.py: no CUDA device here; the kernel benchmarks need a GPU. "
            "Nothing was measured and no result file was written."
        )
        return 0
    if cpu_smoke:  # the kernels under Triton's interpreter: set before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
        ON = CPU_SMOKE
    try:
        import triton
    except ImportError:
        print("benchmarks/kernel_speed.py: triton is not installed (pip install 'tscale[triton]').")
        return 0

    torch.backends.cuda.matmul.allow_tf32 = False
    parts = set(args.only.split(","))
    dev = "cpu (Triton interpreter)" if cpu_smoke else torch.cuda.get_device_name()
    result: dict[str, Any] = {
        "benchmark": "kernels",
        "device": dev,
        "capability": None if cpu_smoke else ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rounds": args.rounds,
        "iters_per_round": args.iters,
        "quick": args.quick,
    }
    if args.smoke:
        result["smoke"] = True
    q = args.quick
    heads, d = (1, 16) if cpu_smoke else (16, 128)
    if "flce" in parts:
        shapes = [(1024, 512, 32000)] if q else [(8192, 4096, 128256), (8192, 2304, 256000)]
        shapes = [(32, 16, 128)] if cpu_smoke else shapes
        result["linear_cross_entropy"] = []
        for n, h, v in shapes:
            r = bench_flce(n, h, v, args.rounds, args.iters)
            result["linear_cross_entropy"].append(r)
            line = "; ".join(f"{k} {_fmt(x)}" for k, x in r["results"].items())
            print(f"flce N={n} H={h} V={v}: {line}")
    if "attention" in parts:
        total = 4096 if q else 16384
        seqs = [2048] if q else [2048, 8192]
        total, seqs = (64, [32]) if cpu_smoke else (total, seqs)
        result["attention"] = []
        for seq in seqs:
            r = bench_attention(total, seq, heads, d, args.rounds, args.iters)
            result["attention"].append(r)
            for mode in ("fwd", "fwd_bwd"):
                line = "; ".join(f"{k} {_fmt(x)}" for k, x in r[mode].items())
                print(f"attention seq={seq} {mode}: {line}")
    if "packed" in parts:
        total = 64 if cpu_smoke else 4096 if q else 16384
        r = bench_packed(total, heads, d, args.rounds, args.iters)
        result["packed_attention"] = r
        for mode in ("fwd", "fwd_bwd"):
            line = "; ".join(f"{k} {_fmt(x)}" for k, x in r[mode].items())
            print(f"packed {r['documents']} docs {mode}: {line}")

    out = args.out or RESULTS / f"kernels-{_slug(dev)}{'-quick' if q else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
