"""Optimizer update time against torch.optim, and optimizer state bytes per parameter.

1. Update time on ~50M float32 parameters in 100 tensors (CPU): tscale ``adamw``
   (``tx.update`` + ``apply_updates``) against ``torch.optim.AdamW(foreach=True).step()`` with the
   same hyper-parameters (weight decay on every tensor), timed in alternating rounds in one
   process, median per step; the ratio tscale / torch must be <= 1.05. For information, the same
   for ``skip_nonfinite(adamw)`` (the config's default wrapper), and ``adamw_8bit`` against
   ``bitsandbytes.optim.AdamW8bit`` on its CPU backend. tscale's update consumes its gradients
   (ownership), so each tscale step first copies fixed gradients into a buffer, untimed.
2. State bytes per parameter after ``init`` for every ``optimizer.type`` of the config schema that
   is registered in ``tscale.optim.OPTIMIZERS`` (others are listed as not registered).

Writes ``benchmarks/results/optimizers.json`` and prints one summary line.

Usage: python benchmarks/optimizers.py [--rounds 10] [--steps-per-round 2] [--threads 2]
       [--tensors 100] [--numel 500000] [--rounds-8bit 3] [--no-8bit]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _smoke import add_smoke_flag, parse_args

from tscale.core import tree as T

RESULTS = Path(__file__).resolve().parent / "results" / "optimizers.json"
BAR = 1.05
LR, WD, BETAS, EPS = 1e-4, 0.1, (0.9, 0.999), 1e-8
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {
    "rounds": 1,
    "steps_per_round": 1,
    "threads": 1,
    "tensors": 3,
    "numel": 1000,
    "rounds_8bit": 1,
}


def _params(n: int, numel: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = 500 if numel % 500 == 0 else 1
    shape = (rows, numel // rows)
    return {f"model.layers.{i}.weight": torch.randn(shape, generator=g) * 0.02 for i in range(n)}


def _tscale_runner(tx, flat: dict[str, torch.Tensor], grads: list[torch.Tensor]) -> Callable:
    """One timed step of a tscale transform: copy the fixed gradients in (untimed), update."""
    from tscale import optim

    params = T.unflatten({k: v.clone() for k, v in flat.items()})
    buffer = params.apply(torch.empty_like)
    state = tx.init(params)

    def step() -> float:
        nonlocal state
        torch._foreach_copy_(T.leaves(buffer), grads)
        t0 = time.perf_counter()
        updates, state = tx.update(buffer, state, params)
        optim.apply_updates(params, updates)
        return time.perf_counter() - t0

    return step


def _torch_runner(make_opt, flat: dict[str, torch.Tensor], grads: list[torch.Tensor]) -> Callable:
    params = [torch.nn.Parameter(v.clone()) for v in flat.values()]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt = make_opt(params)

    def step() -> float:
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    return step


def _time(runners: dict[str, Callable], rounds: int, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each runner, one entry per round, runners alternating (rotated)."""
    for run in runners.values():
        run()  # warm-up: state allocation, first-touch page faults
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(sum(runners[name]() for _ in range(steps)) / steps)
    return times


def _load_average() -> float | None:
    """The 1-minute load average: other processes on the machine make the timings noisy."""
    try:
        import os

        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _state_bytes(flat: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[str], dict]:
    """Bytes of optimizer state per parameter for each config optimizer.type."""
    from tscale import optim

    names = list(optim.OPTIMIZER_TYPES)  # every optimizer.type of the config
    params = T.unflatten(flat)
    numel = T.num_elements(params)
    out: dict[str, float] = {}
    missing: list[str] = []
    errors: dict[str, str] = {}
    for name in names:
        factory = optim.OPTIMIZERS.get(name)
        if factory is None:
            missing.append(name)
            continue
        try:
            state = factory(LR).init(params)
        except Exception as err:  # report, do not hide: one optimizer failing is a finding
            errors[name] = f"{type(err).__name__}: {err}"
            continue
        out[name] = T.num_bytes(state) / numel
        del state
    state = optim.skip_nonfinite(optim.adamw(LR)).init(params)
    out["skip_nonfinite(adamw)"] = T.num_bytes(state) / numel
    return out, missing, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--numel", type=int, default=500_000, help="elements per tensor")
    ap.add_argument("--rounds-8bit", type=int, default=3, help="rounds of the 8-bit timing")
    ap.add_argument("--no-8bit", action="store_true", help="skip the 8-bit timing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    torch.set_num_threads(args.threads)

    from tscale import optim

    flat = _params(args.tensors, args.numel, seed=0)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(v.shape, generator=g) * 1e-3 for v in flat.values()]

    adamw = lambda: optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD, mask=None)  # noqa: E731
    # phase 1: the AdamW comparison (the bar), alone so that its rounds stay short
    runners = {
        "torch_adamw": _torch_runner(
            lambda ps: torch.optim.AdamW(
                ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True
            ),
            flat,
            grads,
        ),
        "tscale_adamw": _tscale_runner(adamw(), flat, grads),
        "tscale_skip_nonfinite_adamw": _tscale_runner(optim.skip_nonfinite(adamw()), flat, grads),
    }
    times = _time(runners, args.rounds, args.steps_per_round)
    del runners
    # phase 2 (information): 8-bit AdamW against bitsandbytes' CPU backend
    bnb_version = None
    if not args.no_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            bnb_version = bnb.__version__
            tx8 = optim.adamw_8bit(
                LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD, mask=None
            )
            runners = {
                "bnb_adamw8bit": _torch_runner(
                    lambda ps: bnb.optim.AdamW8bit(
                        ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD
                    ),
                    flat,
                    grads,
                ),
                "tscale_adamw_8bit": _tscale_runner(tx8, flat, grads),
            }
            times |= _time(runners, args.rounds_8bit, 1)
            del runners
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "adamw": median["tscale_adamw"] / median["torch_adamw"],
        "skip_nonfinite_adamw": median["tscale_skip_nonfinite_adamw"] / median["torch_adamw"],
    }
    if "bnb_adamw8bit" in median:
        ratios["adamw_8bit_vs_bnb"] = median["tscale_adamw_8bit"] / median["bnb_adamw8bit"]
    per_param, missing, errors = _state_bytes(flat)

    numel = args.tensors * args.numel
    result = {
        "benchmark": "optimizers",
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "params": {"tensors": args.tensors, "numel_per_tensor": args.numel, "total": numel},
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "rounds_8bit": args.rounds_8bit,
        "load_average_1m": _load_average(),
        "update_s": times,
        "median_update_s": median,
        "ratio": ratios,
        "bar": BAR,
        "pass": ratios["adamw"] <= BAR,
        "state_bytes_per_param": per_param,
        "not_registered": missing,
        "errors": errors,
    }
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    extra = f", skip_nonfinite(adamw) {ratios['skip_nonfinite_adamw']:.3f}"
    if "adamw_8bit_vs_bnb" in ratios:
        extra += f", adamw_8bit / bnb AdamW8bit {ratios['adamw_8bit_vs_bnb']:.3f}"
    sizes = ", ".join(f"{k} {v:.3f}" for k, v in per_param.items())
    print(
        f"optimizers: tscale adamw / torch AdamW(foreach) update time {ratios['adamw']:.3f} "
        f"(bar <= {BAR}; median of {args.rounds} rounds, {numel / 1e6:.0f}M params in "
        f"{args.tensors} tensors, {args.threads} threads){extra}; state bytes/param: {sizes}"
        + (f"; not registered: {', '.join(missing)}" if missing else "")
        + (f"; failed: {', '.join(errors)}" if errors else "")
    )


if __name__ == "__main__":
    main()
