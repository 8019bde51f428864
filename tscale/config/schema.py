"""The YAML schema: frozen attrs records, one per top-level section.

Every field has a default, so an empty YAML file is a valid (tiny) run. Unknown keys are errors
(see :mod:`tscale.config.load`). Choices are ``Literal`` types: the loader names the valid ones.
Field docstrings live in ``metadata["help"]`` and feed ``docs/config.md``.
"""

# ruff: noqa: RUF009 - `_f` returns an attrs field (a default declaration), not a shared value

from __future__ import annotations

from typing import Literal

import attrs


def _f(default, help: str, **kw):  # "help": the metadata key
    if isinstance(default, list | dict):
        return attrs.field(factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return attrs.field(default=default, metadata={"help": help}, **kw)


@attrs.frozen(kw_only=True)
class RunConfig:
    """Where the run writes and how it is seeded."""

    name: str = _f("run", "Name of the run, shown in logs.")
    output_dir: str = _f(
        "runs/run", "Run directory: metrics.jsonl, config.yaml, checkpoints/, data/."
    )
    seed: int = _f(0, "Seed of everything: init, data order, synthetic data.")
    device: str = _f("cpu", "Torch device: cpu, cuda, cuda:1, or auto (cuda when available).")
    threads: int | None = _f(None, "torch.set_num_threads for CPU runs (None: torch's default).")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The model: a Llama-style decoder initialised at random, or an HF checkpoint (``path``)."""

    path: str | None = _f(
        None,
        "HF checkpoint directory (config.json + safetensors) to start from; its config.json "
        "sets the architecture, so the architecture keys below must stay at their defaults.",
    )
    vocab_size: int | None = _f(None, "Vocabulary size; None takes the tokenizer's.")
    hidden_size: int = _f(128, "Width of the residual stream.")
    intermediate_size: int = _f(384, "Width of the SwiGLU MLP.")
    num_layers: int = _f(4, "Number of decoder layers.")
    num_heads: int = _f(4, "Number of query heads.")
    num_kv_heads: int | None = _f(None, "Number of key/value heads (GQA); None: num_heads.")
    head_dim: int | None = _f(None, "Per-head width; None: hidden_size // num_heads.")
    max_position_embeddings: int = _f(2048, "Longest sequence the RoPE tables cover.")
    rope_theta: float = _f(10000.0, "RoPE base frequency.")
    rms_norm_eps: float = _f(1e-6, "Epsilon of RMSNorm.")
    tie_word_embeddings: bool = _f(True, "Share the input embedding with the output head.")
    init_std: float = _f(0.02, "Standard deviation of the normal init of weight matrices.")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "Parameter and compute dtype.")
    attention_backend: Literal["sdpa", "auto", "triton", "torch"] = _f(
        "sdpa",
        "Attention: sdpa (PyTorch SDPA with masks), or tscale.kernels.attention with "
        "backend auto (Triton FlashAttention-2 on CUDA, PyTorch on CPU), triton or torch.",
    )
    checkpoint_layers: bool = _f(
        False, "Activation checkpointing: recompute each layer in the backward (less memory)."
    )
    norm_backend: Literal["torch", "auto", "triton"] = _f(
        "torch", "RMSNorm: torch, or tscale.kernels.rms_norm (auto: Triton on CUDA)."
    )


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """The built-in instruction task, generated into the run directory as JSONL."""

    tasks: list[Literal["reverse", "sort", "add"]] = _f(
        ["reverse", "sort"], "Tasks mixed in equal shares."
    )
    num_train: int = _f(20000, "Training examples.")
    num_eval: int = _f(200, "Held-out examples (disjoint from training).")
    min_items: int = _f(3, "Fewest items (letters/digits) in a problem.")
    max_items: int = _f(8, "Most items in a problem.")


@attrs.frozen(kw_only=True)
class TokenizerConfig:
    """A byte-level BPE tokenizer: loaded from a file or trained on the training data and cached."""

    path: str | None = _f(None, "A tokenizer.json to load; None trains one on the training data.")
    vocab_size: int = _f(384, "Vocabulary size when training (byte alphabet of 256 included).")


@attrs.frozen(kw_only=True)
class PackingConfig:
    """Best-fit-decreasing packing of examples into rows of data.max_length tokens."""

    enabled: bool = _f(False, "Pack several examples per row (attention isolated by doc_ids).")
    split_overflow: bool = _f(
        False, "Split examples longer than data.max_length into chunks (else drop and count)."
    )


@attrs.frozen(kw_only=True)
class DataConfig:
    """Training and evaluation data (prompt/completion records)."""

    train_files: list[str] = _f([], "JSONL files of {prompt, completion}; empty: synthetic data.")
    eval_files: list[str] = _f([], "Held-out JSONL files; empty: synthetic eval data.")
    synthetic: SyntheticConfig = _f(
        SyntheticConfig(), "The built-in task (when no files are given)."
    )
    tokenizer: TokenizerConfig = _f(TokenizerConfig(), "Tokenizer settings.")
    template: str = _f(
        "plain",
        "Prompt template: plain, alpaca, chatml, llama-3, mistral, gemma, qwen, or a "
        "Jinja2 chat template string.",
    )
    loss_mode: Literal["completion_only", "assistant_only", "last_turn_only"] = _f(
        "completion_only", "Which tokens are trained (masks come from rendering prefixes)."
    )
    system_prompt: str | None = _f(None, "System prompt for records that have none.")
    max_length: int = _f(
        64,
        "Longest example in tokens, template and bos/eos included (the packed row length); "
        "longer examples are quarantined with their row unless packing splits them.",
    )
    packing: PackingConfig = _f(PackingConfig(), "Packing.")
    group_by_length: bool = _f(False, "Batch examples of similar length (less padding).")
    longest_first: bool = _f(False, "Put the batch with the longest example first (OOM at once).")
    max_tokens: int | None = _f(
        None, "Token-budget batching: at most this many padded tokens per batch (single process)."
    )
    batch_size: int = _f(64, "Examples per optimizer step (split into train.microbatches).")
    shuffle: bool = _f(True, "Shuffle each epoch, deterministically from (seed, epoch).")


@attrs.frozen(kw_only=True)
class OptimizerConfig:
    """The optimizer (a chain of transforms, see tscale.optim and docs/optimizers.md).

    Fields marked with an optimizer's name are used by that optimizer only: setting one for
    another type is an error. ``null`` means the optimizer's own default.
    """

    type: Literal[
        "adamw", "adamw_8bit", "lion", "prodigy", "sophia_g", "schedule_free_adamw", "muon"
    ] = _f("adamw", "Optimizer (the registry tscale.optim.OPTIMIZERS).")
    lr: float = _f(1e-3, "Peak learning rate (prodigy: a factor on its estimated step size).")
    betas: tuple[float, float] | None = _f(
        None, "Moment decay rates [b1, b2]; null: the optimizer's own (adamw: [0.9, 0.999])."
    )
    eps: float | None = _f(
        None, "Denominator epsilon of the Adam family; null: the optimizer's own (1e-8)."
    )
    weight_decay: float = _f(0.0, "Decoupled weight decay, scaled by the learning rate.")
    no_decay: list[str] | None = _f(
        None,
        "Regexes (re.search on dotted param names) of the params exempt from weight decay, e.g. "
        "['\\.bias$', 'norm', 'embed_tokens']; null: 1-D params and embed_tokens; []: none.",
    )
    max_grad_norm: float | None = _f(
        1.0, "Clip gradients to this global L2 norm; null: no clipping."
    )
    skip_nonfinite: bool = _f(
        True,
        "Drop a step whose gradients or updates hold NaN/inf: params and optimizer state stay "
        "as they were, and the step counts in the 'skipped' metric.",
    )
    block_size: int | None = _f(
        None, "adamw_8bit: elements per quantisation block (64 to 4096); null: 256."
    )
    min_8bit_size: int | None = _f(
        None, "adamw_8bit: params with fewer elements keep float32 moments; null: 4096."
    )
    momentum: float | None = _f(None, "muon: momentum coefficient; null: muon's own.")
    nesterov: bool | None = _f(None, "muon: Nesterov momentum; null: muon's own.")
    ns_steps: int | None = _f(None, "muon: Newton-Schulz iterations; null: muon's own (5).")
    rho: float | None = _f(None, "sophia_g: clipping threshold of the update; null: its own.")
    update_every: int | None = _f(
        None, "sophia_g: steps between Hessian estimates; null: its own (10)."
    )
    d0: float | None = _f(None, "prodigy: initial step-size estimate; null: its own (1e-6).")
    d_coef: float | None = _f(
        None, "prodigy: factor on the estimated step size; null: its own (1.0)."
    )
    safeguard_warmup: bool | None = _f(
        None, "prodigy: keep the lr out of the step-size estimate (use with warmup); null: off."
    )


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    """The learning-rate schedule, a pure function of the step (see docs/optimizers.md).

    Every type warms up linearly from 0 over ``warmup_steps``; decaying types reach their end at
    ``train.max_steps``. Fields marked with a type's name are used by that type only.
    """

    type: Literal[
        "constant",
        "cosine",
        "cosine_restarts",
        "linear",
        "wsd",
        "rex",
        "inverse_sqrt",
        "polynomial",
    ] = _f("cosine", "Schedule after warmup.")
    warmup_steps: int = _f(0, "Linear warmup from 0 to the peak learning rate.")
    min_lr_ratio: float = _f(
        0.0, "Final learning rate as a fraction of the peak (all but constant and inverse_sqrt)."
    )
    num_cycles: int = _f(1, "cosine_restarts: cosine cycles, each restarting at the peak.")
    decay_fraction: float = _f(0.2, "wsd: fraction of train.max_steps spent decaying at the end.")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = _f("1-sqrt", "wsd: shape of the decay.")
    power: float = _f(1.0, "polynomial: exponent of the decay (1: linear).")
    timescale: int | None = _f(
        None,
        "inverse_sqrt: lr = peak / sqrt((step - warmup_steps + timescale) / timescale); "
        "null: warmup_steps (10000 without warmup).",
    )


@attrs.frozen(kw_only=True)
class TrainConfig:
    """The training loop."""

    max_steps: int = _f(100, "Optimizer steps to take.")
    microbatches: int = _f(1, "Gradient accumulation: data.batch_size is split into this many.")
    donate: bool = _f(True, "The step updates the state in place (False: clone it first).")
    compile: bool = _f(
        False,
        "torch.compile the train step (forward, backward and optimizer update in one graph); "
        "the first steps are slow while it compiles.",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = _f(
        "inductor",
        "Backend of train.compile: inductor (generated kernels; on CPU it needs a C++ "
        "compiler), aot_eager (traced graphs run by eager kernels: quick to compile, for "
        "checking), eager.",
    )
    log_every: int = _f(10, "Read metrics from the device and log them every N steps.")
    eval_every: int = _f(0, "Evaluate every N steps (0: only at the end).")
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = _f(2, "Checkpoints to keep (oldest are deleted); 0 keeps all.")
    progress: bool = _f(True, "Show a rich progress bar on a terminal (else a log line every 5 s).")


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Held-out evaluation: loss, and exact match of greedy answers."""

    num_samples: int = _f(200, "Held-out problems to answer greedily (0: loss only).")
    batch_size: int = _f(100, "Problems decoded at once.")
    max_new_tokens: int = _f(24, "Longest answer generated.")
    num_show: int = _f(3, "Sample generations printed at the end of the run.")


@attrs.frozen(kw_only=True)
class LossConfig:
    """The training loss: token cross-entropy, summed and normalised by the batch's tokens."""

    fused: bool = _f(
        False,
        "Fused linear cross-entropy (tscale.kernels): never materialises tokens x vocab "
        "logits. Not with lora.enabled or optimizer.type=sophia_g.",
    )
    backend: Literal["auto", "triton", "torch"] = _f("auto", "Kernel backend of the fused loss.")
    chunk_bytes: int | None = _f(None, "Memory per chunk of the fused loss; null: its default.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy.")
    z_loss: float = _f(0.0, "Weight of the z-loss (logsumexp^2 per trained token).")


@attrs.frozen(kw_only=True)
class LoraSection:
    """Parameter-efficient fine-tuning: only LoRA adapters are trained (see docs/lora.md)."""

    enabled: bool = _f(False, "Train LoRA adapters instead of the model's weights.")
    rank: int = _f(8, "Rank r of each B @ A update.")
    alpha: float = _f(16.0, "Scale numerator: updates are (alpha / r) * B @ A.")
    dropout: float = _f(0.0, "Dropout on the LoRA input path (keys from the run's rng and step).")
    targets: list[str] | None = _f(
        None,
        "Weights that get adapters (module names, globs or re:<regex>); null: attention "
        "and MLP projections.",
    )
    use_dora: bool = _f(False, "DoRA: also learn a magnitude vector per target.")
    use_rslora: bool = _f(False, "Rank-stabilised scale alpha / sqrt(r).")
    qlora: bool = _f(False, "QLoRA: store the frozen target weights as NF4 (bitsandbytes).")
    qlora_block_size: int = _f(64, "NF4 quantisation block size.")


@attrs.frozen(kw_only=True)
class Config:
    """A whole run."""

    run: RunConfig = _f(RunConfig(), "Run directory, seed, device.")
    model: ModelConfig = _f(ModelConfig(), "Model architecture.")
    data: DataConfig = _f(DataConfig(), "Data.")
    optimizer: OptimizerConfig = _f(OptimizerConfig(), "Optimizer.")
    scheduler: SchedulerConfig = _f(SchedulerConfig(), "Learning-rate schedule.")
    loss: LossConfig = _f(LossConfig(), "Loss.")
    lora: LoraSection = _f(LoraSection(), "LoRA / QLoRA adapters.")
    train: TrainConfig = _f(TrainConfig(), "Training loop.")
    eval: EvalConfig = _f(EvalConfig(), "Evaluation.")
