"""tscale's SFT train step vs a plain eager PyTorch loop, same model size and batch, same process.

Baseline: ``transformers.LlamaForCausalLM`` (sdpa attention) + ``torch.optim.AdamW(foreach=True)``,
``loss.backward(); opt.step(); opt.zero_grad()``. tscale: ``make_train_step`` over the pure
Llama ``apply`` and the ``adamw`` transform chain, with the same initial weights and batch.
The two are timed in alternating rounds (to cancel drift) and the median step time of each is
compared. Writes ``benchmarks/results/step_throughput.json`` and prints one summary line.

Usage: python benchmarks/step_throughput.py [--rounds 6] [--steps-per-round 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from _smoke import add_smoke_flag, parse_args
from tensordict import TensorDict

from tscale.core import rng as R
from tscale.core import tree as T
from tscale.core.state import TrainState
from tscale.losses import make_lm_loss
from tscale.models.transformer import Transformer, TransformerConfig
from tscale.optim import adamw
from tscale.step import make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "step_throughput.json"
# --smoke: the same code path at tiny sizes (tests/benchmarks runs it), unless given explicitly
SMOKE = {
    "rounds": 1,
    "steps_per_round": 1,
    "threads": 1,
    "batch": 2,
    "seq": 16,
    "hidden": 128,
    "layers": 1,
    "vocab": 256,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_smoke_flag(ap)
    args = parse_args(ap, SMOKE, RESULTS)
    torch.set_num_threads(args.threads)

    cfg = TransformerConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 128,
        max_position_embeddings=args.seq,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        init_std=0.02,
    )
    model = Transformer(cfg)
    params = model.init(R.key(0))

    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**cfg.to_hf_dict(), attn_implementation="sdpa")
    )
    hf.load_state_dict({k: v.clone() for k, v in T.flatten(params).items()}, strict=True)
    hf.train()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    batch = TensorDict({"input_ids": ids, "labels": labels}, batch_size=[args.batch])
    hf_labels = ids.clone()  # HF shifts inside its loss: same trained positions as `labels`

    lr, wd = 1e-4, 0.1
    tx = adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=None)
    state = TrainState.create(params, tx.init(params), R.key(1))
    step = make_train_step(make_lm_loss(model.apply), tx)
    opt = torch.optim.AdamW(
        hf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=True
    )

    def run_tscale(n: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = step(state, batch)
        float(m["loss"])  # one sync at the end, as the trainer does every log_every steps
        return (time.perf_counter() - t0) / n

    def run_hf(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out = hf(input_ids=ids, labels=hf_labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        float(out.loss)
        return (time.perf_counter() - t0) / n

    run_tscale(1), run_hf(1)  # warm-up
    ts, hs = [], []
    for _ in range(args.rounds):
        ts.append(run_tscale(args.steps_per_round))
        hs.append(run_hf(args.steps_per_round))
    tokens = args.batch * args.seq
    t_med, h_med = statistics.median(ts), statistics.median(hs)
    result = {
        "benchmark": "step_throughput",
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "params": T.num_elements(params),
        },
        "batch": {"batch_size": args.batch, "seq_len": args.seq, "tokens": tokens},
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "tscale_step_s": ts,
        "baseline_step_s": hs,
        "tscale_tokens_per_s": tokens / t_med,
        "baseline_tokens_per_s": tokens / h_med,
        "ratio": h_med / t_med,
    }
    if args.smoke:
        result["smoke"] = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"step_throughput: tscale {result['tscale_tokens_per_s']:,.0f} tok/s, eager HF+AdamW "
        f"{result['baseline_tokens_per_s']:,.0f} tok/s, ratio {result['ratio']:.3f} "
        f"(median of {args.rounds} rounds; ≥ 0.95 is the bar)"
    )


if __name__ == "__main__":
    main()
