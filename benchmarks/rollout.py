"""RL rollout sampling tokens/s: ``sample_completions`` vs ``generate`` vs HF ``generate``.

The quickstart-sized model (0.89M params, vocab 384) samples G = 8 completions of each of 64
prompts (16-32 tokens), 24 new tokens each at T = 1 over the full softmax (no stop ids, so every
variant makes the same 64 × 8 × 24 tokens), three ways in one process, alternated per round:

- ``tscale_rollout``: :func:`tscale.rl.sample_completions` (one prefill per prompt, cache
  repeated G times, keyed Gumbel-max draws, full-softmax log-probs recorded);
- ``tscale_generate``: :func:`tscale.models.generate` over the 512 repeated prompts (one prefill
  per row, ``torch.multinomial``, no log-probs);
- ``hf_generate``: ``transformers`` ``LlamaForCausalLM.generate`` with the same weights,
  ``do_sample=True, top_k=0, num_return_sequences=8`` (what TRL's GRPOTrainer runs without
  vLLM), left-padded.

One thread by default: on this small machine shared with other jobs, two OpenMP threads stall
whenever another process holds a core (rounds of the same variant measured 4 s to 24 s).

Writes ``benchmarks/results/rollout.json`` and prints one summary line. The median of the rounds
is compared (the fastest round is recorded too: with two threads on a shared machine a round
can stall several-fold); the machine is shared, so the ratios are the figures to read.

Usage: python benchmarks/rollout.py [--rounds 3] [--threads 1]
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
import transformers
from _smoke import add_smoke_flag, parse_args

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.models import Transformer, TransformerConfig, generate
from tscale.rl import sample_completions

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"
SMOKE = {"rounds": 1, "prompts": 2, "samples": 2, "new_tokens": 3, "layers": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    config = TransformerConfig(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=384,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        init_std=0.05,
    )
    model = Transformer(config)
    params = model.init(R.key(0))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    hf.load_state_dict(T.flatten(params), strict=True)
    hf.eval()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 33, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(1, 384, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    hf_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    hf_mask = (torch.arange(width)[None] >= (width - torch.tensor(lengths))[:, None]).long()
    n_new = args.new_tokens

    def tscale_rollout(key: torch.Tensor) -> int:
        out = sample_completions(
            model, params, prompts, num_samples=args.samples, key=key, max_new_tokens=n_new,
            pad_id=0,
        )  # fmt: skip
        return int(out.lengths.sum())

    def tscale_generate(key: torch.Tensor) -> int:
        rows = [p for p in prompts for _ in range(args.samples)]
        out = generate(
            model, params, rows, max_new_tokens=n_new, pad_id=0, temperature=1.0, key=key
        )
        return sum(len(r) for r in out)

    def hf_generate(key: torch.Tensor) -> int:
        torch.manual_seed(R.seed_of(key))
        with torch.no_grad():
            out = hf.generate(
                hf_ids, attention_mask=hf_mask, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                num_return_sequences=args.samples, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        return int(out[:, width:].numel())

    variants = {"tscale_rollout": tscale_rollout, "tscale_generate": tscale_generate}
    variants["hf_generate"] = hf_generate
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            tokens[name] = fn(R.fold_in(R.key(1), r))
            times[name].append(time.perf_counter() - start)
    expected = args.prompts * args.samples * n_new
    tps = {name: expected / statistics.median(t) for name, t in times.items()}
    best = {name: expected / min(t) for name, t in times.items()}
    result = {
        "benchmark": "rollout",
        "date": datetime.date.today().isoformat(),
        "note": (
            "CPU on a machine shared with other jobs: absolute figures are noisy; the ratios of "
            "the runs (alternated in one process) are the figures to read."
        ),
        "device": f"cpu ({platform.machine()}), {args.threads} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {"layers": args.layers, "vocab": 384, "params": model.num_params()},
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "prompt_lengths": lengths,
        "new_tokens": n_new,
        "rounds": args.rounds,
        "seconds": times,
        "tokens_per_s": tps,
        "best_tokens_per_s": best,
        "all_tokens_made": all(n == expected for n in tokens.values()),
        "rollout_vs_generate": tps["tscale_rollout"] / tps["tscale_generate"],
        "rollout_vs_hf": tps["tscale_rollout"] / tps["hf_generate"],
    }
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"rollout: {model.num_params() / 1e6:.2f}M params, {args.prompts} prompts x "
        f"{args.samples} samples x {n_new} tokens: sample_completions "
        f"{tps['tscale_rollout']:.0f} tok/s ({statistics.median(times['tscale_rollout']):.2f} s), "
        f"generate {tps['tscale_generate']:.0f} tok/s, HF generate {tps['hf_generate']:.0f} "
        f"tok/s; rollout/HF {result['rollout_vs_hf']:.2f}x"
    )


if __name__ == "__main__":
    main()
