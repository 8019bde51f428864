"""Generation tokens/s with the KV cache vs without, same model, prompts and process.

A ~10M-parameter Llama-style model decodes 8 left-padded prompts greedily for 128 new tokens, once
through ``generate`` with the KV cache (one prefill, then one token per step) and once with
``use_cache=False`` (the whole sequence re-run each step). Runs alternate (to cancel drift) and the
median time of each is compared; both must produce the same tokens. Writes
``benchmarks/results/generate.json`` and prints one summary line.

One thread by default: on a small machine shared with other jobs, two OpenMP threads stall (by
up to 100x per matmul, measured) whenever another process holds a core.

Usage: python benchmarks/generate.py [--rounds 2] [--threads 1] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _smoke import add_smoke_flag, parse_args

from tscale.core import rng as R
from tscale.models import Transformer, TransformerConfig, generate

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {"rounds": 1, "batch": 2, "new_tokens": 4, "hidden": 64, "layers": 1, "vocab": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    torch.set_num_threads(args.threads)

    config = TransformerConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_layers=args.layers,
        num_heads=args.hidden // 32,
        num_kv_heads=args.hidden // 64,
        max_position_embeddings=512,
        init_std=0.05,
    )
    model = Transformer(config)
    params = model.init(R.key(0))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]
    kw = {"max_new_tokens": args.new_tokens, "pad_id": 0}

    times: dict[str, list[float]] = {"cache": [], "no_cache": []}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, use_cache in (("cache", True), ("no_cache", False)):
            start = time.perf_counter()
            outputs[name] = generate(model, params, prompts, use_cache=use_cache, **kw)
            times[name].append(time.perf_counter() - start)
    new_tokens = args.batch * args.new_tokens
    tps = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "generate",
        "date": datetime.date.today().isoformat(),
        "note": (
            "CPU on a machine shared with other jobs: absolute figures are noisy; the ratio of "
            "the two runs (alternated in one process) is the figure to read."
        ),
        "device": f"cpu ({platform.machine()}), {args.threads} threads",
        "torch": torch.__version__,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "params": model.num_params(),
        },
        "batch_size": args.batch,
        "prompt_lengths": lengths,
        "new_tokens_per_prompt": args.new_tokens,
        "rounds": args.rounds,
        "cache_s": times["cache"],
        "no_cache_s": times["no_cache"],
        "cache_tokens_per_s": tps["cache"],
        "no_cache_tokens_per_s": tps["no_cache"],
        "speedup": tps["cache"] / tps["no_cache"],
        "same_tokens": outputs["cache"] == outputs["no_cache"],
    }
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"generate: {result['model']['params'] / 1e6:.1f}M params, batch {args.batch}, "
        f"{args.new_tokens} new tokens: KV cache {tps['cache']:.0f} tok/s, no cache "
        f"{tps['no_cache']:.0f} tok/s, speedup {result['speedup']:.1f}x, "
        f"same tokens: {result['same_tokens']}"
    )


if __name__ == "__main__":
    main()
