"""The YAML schema: frozen attrs records, one per top-level section.

Every field has a default, so an empty YAML file is a valid (tiny) run. Unknown keys are errors
(see :mod:`tscale.config.load`). Choices are ``Literal`` types: the loader names the valid ones.
Field docstrings live in ``metadata["help"]`` and feed ``docs/config.md``.
"""

# ruff: noqa: RUF009 - `field` returns an attrs field (a default declaration), not a shared value

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import attrs

from tscale.core.fields import field
from tscale.errors import ConfigError

# The optimizer and scheduler sections are tagged unions of records that live beside their
# factories (tscale.optim) and build themselves; config may import those record modules.
from tscale.optim.alias import AdamWConfig, OptimizerConfig
from tscale.optim.schedules import CosineConfig, SchedulerConfig
from tscale.tasks.base import TASKS, resolve_task_class
from tscale.tasks.sft import SFTTask


@attrs.frozen(kw_only=True)
class RunConfig:
    """Where the run writes and how it is seeded."""

    name: str = field("run", "Name of the run, shown in logs.")
    output_dir: str = field(
        "runs/run", "Run directory: metrics.jsonl, config.yaml, checkpoints/, data/."
    )
    seed: int = field(
        0,
        "Seed of everything: init, data order, synthetic data.",
        ge=0,
        le=2**32 - 1,  # numpy and datasets take seeds in [0, 2^32)
    )
    device: str = field("cpu", "Torch device: cpu, cuda, cuda:1, or auto (cuda when available).")
    threads: int | None = field(
        None,
        "torch.set_num_threads for CPU runs (None: torch's default).",
        ge=1,
        le=2**31 - 1,  # a C int
    )


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The model: a Llama-style decoder initialised at random, or an HF checkpoint (``path``)."""

    path: str | None = field(
        None,
        "HF checkpoint directory (config.json + safetensors) to start from; its config.json "
        "sets the architecture, so the architecture keys below must stay at their defaults.",
    )
    vocab_size: int | None = field(None, "Vocabulary size; None takes the tokenizer's.", ge=1)
    hidden_size: int = field(128, "Width of the residual stream.", ge=1)
    intermediate_size: int = field(384, "Width of the SwiGLU MLP.", ge=1)
    num_layers: int = field(4, "Number of decoder layers.", ge=1)
    num_heads: int = field(4, "Number of query heads.", ge=1)
    num_kv_heads: int | None = field(
        None, "Number of key/value heads (GQA); a divisor of num_heads; None: num_heads.", ge=1
    )
    head_dim: int | None = field(
        None, "Per-head width (even: RoPE rotates pairs); None: hidden_size // num_heads.", ge=1
    )
    max_position_embeddings: int = field(2048, "Longest sequence the RoPE tables cover.", ge=1)
    rope_theta: float = field(10000.0, "RoPE base frequency.", gt=0)
    rms_norm_eps: float = field(1e-6, "Epsilon of RMSNorm.", gt=0)
    tie_word_embeddings: bool = field(True, "Share the input embedding with the output head.")
    init_std: float = field(0.02, "Standard deviation of the normal init of weight matrices.", ge=0)
    dtype: Literal["float32", "bfloat16"] = field("float32", "Parameter and compute dtype.")
    attention_backend: Literal["sdpa", "auto", "triton", "torch"] = field(
        "sdpa",
        "Attention: sdpa (PyTorch SDPA with masks), or tscale.kernels.attention with "
        "backend auto (Triton FlashAttention-2 on CUDA, PyTorch on CPU), triton or torch.",
    )
    checkpoint_layers: bool = field(
        False, "Activation checkpointing: recompute each layer in the backward (less memory)."
    )
    norm_backend: Literal["torch", "auto", "triton"] = field(
        "torch", "RMSNorm: torch, or tscale.kernels.rms_norm (auto: Triton on CUDA)."
    )


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """The built-in instruction task, generated into the run directory as JSONL."""

    tasks: list[Literal["reverse", "sort", "add"]] = field(
        ["reverse", "sort"], "Tasks mixed in equal shares."
    )
    num_train: int = field(20000, "Training examples.", ge=1)
    num_eval: int = field(200, "Held-out examples (disjoint from training).", ge=0)
    min_items: int = field(3, "Fewest items (letters/digits) in a problem (add: at least 2).", ge=1)
    max_items: int = field(8, "Most items in a problem (at least min_items).", ge=1)
    kind: Literal["sft", "preference", "kto"] = field(
        "sft",
        "Records written: sft {prompt, completion}; preference {prompt, chosen, rejected} "
        "(chosen the correct answer, rejected the answer with one item changed or an adjacent "
        "pair swapped); kto {prompt, completion, label} (half of each task's records correct "
        "and desirable, half corrupted). All keep task and the correct answer.",
    )


@attrs.frozen(kw_only=True)
class TokenizerConfig:
    """The tokenizer: an HF tokenizer folder (given, or model.path's), or a byte-level BPE
    trained on the training data and cached (only when there is no pretrained model)."""

    path: str | None = field(
        None,
        "An HF tokenizer folder (tokenizer.json + tokenizer_config.json, its special tokens "
        "and chat template) or a tokenizer.json; None: model.path's tokenizer, or without "
        "model.path a BPE trained on the training data.",
    )
    vocab_size: int = field(
        384,
        "Vocabulary size when training: the 256-byte alphabet and 3 special tokens (pad, bos, "
        "eos) included, the rest learned merges.",
        ge=259,
    )
    add_tokens: list[str] = field(
        [],
        "Special tokens to add (e.g. chat markers for a base model); with model.path the "
        "embedding and head grow to cover them (new rows: the mean of the old ones).",
    )


@attrs.frozen(kw_only=True)
class PackingConfig:
    """Best-fit-decreasing packing of examples into rows of data.max_length tokens."""

    enabled: bool = field(False, "Pack several examples per row (attention isolated by doc_ids).")
    split_overflow: bool = field(
        False,
        "Split examples longer than data.max_length into chunks (else data.length.excess "
        "fits them).",
    )
    buffer_size: int = field(
        256,
        "With data.streaming: rows kept open by the streaming packer (a full or the fullest "
        "row is emitted when a new one must open); memory is buffer_size x max_length tokens.",
        ge=1,
    )


_FORMAT = Literal[
    "auto",
    "prompt_completion",
    "alpaca",
    "chat",
    "sharegpt",
    "preference",
    "preference_chat",
    "unpaired_preference",
    "unpaired_preference_chat",
]
_STRATEGY = Literal["smart", "sentence_boundary", "word_boundary", "hard"]


@attrs.frozen(kw_only=True)
class SourceConfig:
    """One dataset of a weighted mixture (data.sources)."""

    path: str | None = field(
        None,
        "A file (json, jsonl, csv, parquet, arrow, txt), a directory of them, or a "
        "save_to_disk directory. Set path or hf, not both.",
    )
    hf: str | None = field(None, "A Hugging Face hub dataset name (owner/name); needs the network.")
    hf_config: str | None = field(
        None, "The hub dataset's configuration (subset), when it has several."
    )
    split: str = field(
        "train", "The split to read (datasets slicing such as train[:1000] is allowed)."
    )
    weight: float = field(
        1.0,
        "Mixture weight: each training row comes from this source with probability "
        "weight / sum of weights (smaller sources repeat until every one is seen whole).",
        gt=0,
    )
    column_map: dict[str, str] = field(
        {},
        "Canonical field -> this source's column (e.g. {prompt: question, completion: "
        "answer}); overrides data.column_map and the synonym table.",
    )
    format: _FORMAT = field("auto", "Record format; auto detects it from the columns.")


@attrs.frozen(kw_only=True)
class LengthConfig:
    """Length budget of each record, fitted on the raw text before templating (data.length)."""

    max_total_length: int | None = field(
        None,
        "Token budget of a record's finished sample (template + BOS/EOS + text, as "
        "data.max_length counts), when it should be below data.max_length; over it, the "
        "record is fitted per excess. null: data.max_length alone.",
        ge=1,
    )
    per_column_limits: dict[str, int] = field(
        {},
        "Character limit per text column (prompt, completion, instruction, input, output).",
        ge=1,
    )
    strategy: _STRATEGY = field(
        "smart",
        "Where text is cut: smart (sentences, else words, else characters), "
        "sentence_boundary, word_boundary, hard (at the character).",
    )
    side: Literal["auto", "right", "left"] = field(
        "auto",
        "The end that is cut away: right keeps the beginning, left keeps the end; auto: left "
        "for the prompt side (prompt, instruction, input, a chat's last user message), right "
        "for the answer (completion, output, the last assistant turn).",
    )
    column_strategy: dict[str, _STRATEGY] = field(
        {}, "Per-column strategy, overriding strategy (e.g. {input: hard})."
    )
    column_side: dict[str, Literal["right", "left"]] = field(
        {}, "Per-column side, overriding side (e.g. {prompt: left})."
    )
    content_distribution: Literal["balanced", "proportional", "priority", "ratio"] = field(
        "balanced",
        "How the token budget is shared: balanced (the prompt side is cut first; the answer is "
        "cut only when it needs more than half), proportional (same fraction each), priority "
        "(least important column cut first), ratio (fixed shares).",
    )
    priority: list[str] | None = field(
        None, "content_distribution priority: columns, most important first (all of them)."
    )
    ratios: dict[str, float] | None = field(
        None, "content_distribution ratio: a positive share per column.", gt=0
    )
    excess: Literal["truncate", "drop", "raise"] = field(
        "truncate",
        "A record over data.max_length, max_total_length or a character limit: truncate (chat: "
        "oldest turns left out, then the last exchange cut; others: prompt side, then answer), "
        "drop (counted as dropped in the data report), raise (stop the run).",
    )


@attrs.frozen(kw_only=True)
class DataConfig:
    """Training and evaluation data (prompt/completion records)."""

    train_files: list[str] = field(
        [], "JSONL files of {prompt, completion}; empty: synthetic data."
    )
    eval_files: list[str] = field([], "Held-out JSONL files; empty: synthetic eval data.")
    synthetic: SyntheticConfig = field(
        SyntheticConfig(), "The built-in task (when no files are given)."
    )
    tokenizer: TokenizerConfig = field(TokenizerConfig(), "Tokenizer settings.")
    template: str = field(
        "auto",
        "Chat template: auto (the tokenizer's chat_template; without one, plain for "
        "prompt/completion data and an error for chat data), a built-in (plain, alpaca, chatml, "
        "llama-3, mistral, gemma, qwen), a path to a .jinja file, or a Jinja2 template string.",
    )
    template_date: str = field(
        "2026-01-01",
        "The date (YYYY-MM-DD) the template's strftime_now formats (Llama-3.x writes it), "
        "fixed so that the same data gives the same tokens.",
    )
    loss_mode: Literal["auto", "completion_only", "assistant_only", "last_turn_only"] = field(
        "auto",
        "Which tokens are trained (masks come from rendering prefixes); auto: assistant_only "
        "with model.path (every assistant turn of chat data, exactly the completion of "
        "prompt/completion records), completion_only from random init.",
    )
    system_prompt: str | None = field(None, "System prompt for records that have none.")
    max_length: int | None = field(
        None,
        "Longest example in tokens, template and bos/eos included (the packed row length); "
        "a longer record is fitted per data.length.excess (truncated by default), unless "
        "data.packing.split_overflow splits it. null: min(1024, the model's "
        "max_position_embeddings) with model.path, 64 from random init.",
        ge=1,
    )
    packing: PackingConfig = field(PackingConfig(), "Packing.")
    group_by_length: bool | None = field(
        None,
        "Batch examples of similar length (less padding; batches still drawn at random). null: "
        "true when fine-tuning model.path (without data.streaming), false from random init and "
        "for the online-RL tasks (grpo, rloo, ppo: prompts of one length in a batch would "
        "correlate its rollouts).",
    )
    drop_last: bool | None = field(
        None,
        "Drop the rows left over after an epoch's last full batch (true), or train them in a last "
        "batch completed with the epoch's first rows (false). null: false when fine-tuning "
        "model.path (every row trains each epoch), true from random init.",
    )
    longest_first: bool = field(
        False, "Put the batch with the longest example first (OOM at once)."
    )
    max_tokens: int | None = field(
        None,
        "Token-budget batching: at most this many padded tokens per batch (single process).",
        ge=1,
    )
    batch_size: int = field(
        64, "Examples per optimizer step (split into train.microbatches).", ge=1
    )
    shuffle: bool = field(True, "Shuffle each epoch, deterministically from (seed, epoch).")
    sources: list[SourceConfig] = field(
        [],
        "Training datasets mixed by weight (instead of train_files); each is read through "
        "datasets, its format detected and its columns mapped to the canonical fields.",
    )
    format: _FORMAT = field(
        "auto", "Record format of train_files/eval_files/sources; auto detects it."
    )
    column_map: dict[str, str] = field(
        {},
        "Canonical field -> column for every source (e.g. {prompt: question}); overrides the "
        "synonym table. Setting it (or format) reads train_files through the same path.",
    )
    streaming: bool = field(
        False,
        "Read, template, tokenize and pack the training data on the fly (bounded memory); "
        "the loader's cursor holds the stream position and packer buffer, so resume is exact.",
    )
    length: LengthConfig = field(LengthConfig(), "Length budget (truncation before templating).")
    max_error_rate: float | None = field(
        0.05,
        "Stop before training when more than this fraction of the training rows is "
        "quarantined (malformed; dropped rows do not count); null: never stop.",
        ge=0,
        le=1,
    )
    cache: bool = field(
        True,
        "Cache the processed (tokenized, packed) data under a fingerprint of the data config, "
        "input files and tokenizer; a second run with the same inputs skips preprocessing.",
    )
    cache_dir: str | None = field(
        None, "Where the processed-data cache lives; null: <run.output_dir>/data/cache."
    )


@attrs.frozen(kw_only=True)
class TrainConfig:
    """The training loop."""

    max_steps: int | None = field(
        None,
        "Optimizer steps to take; null: train.epochs passes over the data, or 100 steps from "
        "random init without train.epochs. With train.epochs too, the run stops at whichever "
        "comes first.",
        ge=1,
    )
    epochs: float | None = field(
        None,
        "Passes over the training data (steps = ceil(epochs x steps per epoch), printed at the "
        "start; may be fractional); null: 1 with model.path unless train.max_steps is set. "
        "Not with data.streaming (the number of steps per epoch is unknown).",
        gt=0,
    )
    microbatches: int = field(
        1, "Gradient accumulation: data.batch_size is split into this many.", ge=1
    )
    donate: bool = field(True, "The step updates the state in place (False: clone it first).")
    compile: bool = field(
        False,
        "torch.compile the train step (forward, backward and optimizer update in one graph); "
        "the first steps are slow while it compiles.",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = field(
        "inductor",
        "Backend of train.compile: inductor (generated kernels; on CPU it needs a C++ "
        "compiler), aot_eager (traced graphs run by eager kernels: quick to compile, for "
        "checking), eager.",
    )
    log_every: int = field(10, "Read metrics from the device and log them every N steps.", ge=1)
    eval_every: int = field(
        0,
        "Evaluate every N steps (0: only at the end; nothing without held-out data).",
        ge=1,
        sentinels={0: "only at the end"},
    )
    save_every: int = field(
        0,
        "Checkpoint every N steps (0: only at the end).",
        ge=1,
        sentinels={0: "only at the end"},
    )
    keep_last: int = field(
        2,
        "Checkpoints to keep (oldest are deleted); 0 keeps all.",
        ge=1,
        sentinels={0: "keep all"},
    )
    progress: bool = field(
        True, "Show a rich progress bar on a terminal (else a log line every 5 s)."
    )
    max_nonfinite_steps: int = field(
        10,
        "Stop the run (exit 2, no save: the last checkpoint stays the last good one) after this "
        "many consecutive steps whose gradients were non-finite (skipped) or whose loss was "
        "NaN/inf; 0: never stop.",
        ge=1,
        sentinels={0: "never stop"},
    )


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Held-out evaluation (data.eval_files, or the synthetic task's held-out split): loss and
    perplexity, and exact match of greedy answers."""

    num_samples: int = field(
        200,
        "Held-out records to answer greedily and score by exact match against their reference "
        "answer (0: loss and perplexity only); records without one are skipped.",
        ge=1,
        sentinels={0: "loss and perplexity only"},
    )
    batch_size: int = field(100, "Problems decoded at once.", ge=1)
    max_new_tokens: int = field(24, "Longest answer generated.", ge=1)
    num_show: int = field(
        3,
        "Sample generations printed at the end of the run (prompts through data.template).",
        ge=0,
    )


@attrs.frozen(kw_only=True)
class LossConfig:
    """The training loss: token cross-entropy, summed and normalised by the batch's tokens."""

    fused: bool = field(
        False,
        "Fused linear cross-entropy (tscale.kernels): never materialises tokens x vocab "
        "logits. Not with lora.enabled.",
    )
    backend: Literal["auto", "triton", "torch"] = field("auto", "Kernel backend of the fused loss.")
    chunk_bytes: int | None = field(
        None, "Memory per chunk of the fused loss; null: its default.", ge=1
    )
    label_smoothing: float = field(0.0, "Label smoothing of the cross-entropy.", ge=0, le=1)
    z_loss: float = field(0.0, "Weight of the z-loss (logsumexp^2 per trained token).", ge=0)
    trained_positions_only: bool = field(
        True,
        "Run the LM head only at trained positions (labels != -100): the same loss with less "
        "compute when prompts are long. False: logits at every position.",
    )


@attrs.frozen(kw_only=True)
class LoraSection:
    """Parameter-efficient fine-tuning: only LoRA adapters are trained (see docs/lora.md)."""

    enabled: bool = field(False, "Train LoRA adapters instead of the model's weights.")
    rank: int = field(8, "Rank r of each B @ A update.", ge=1)
    alpha: float = field(16.0, "Scale numerator: updates are (alpha / r) * B @ A.", gt=0)
    dropout: float = field(
        0.0, "Dropout on the LoRA input path (keys from the run's rng and step).", ge=0, lt=1
    )
    targets: list[str] | None = field(
        None,
        "Weights that get adapters (module names, globs or re:<regex>); null: attention "
        "and MLP projections.",
    )
    use_dora: bool = field(False, "DoRA: also learn a magnitude vector per target.")
    use_rslora: bool = field(False, "Rank-stabilised scale alpha / sqrt(r).")
    qlora: bool = field(False, "QLoRA: store the frozen target weights as NF4 (bitsandbytes).")
    qlora_block_size: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = field(
        64, "NF4 quantisation block size."
    )


@attrs.frozen(kw_only=True)
class DeepSpeedSection:
    """DeepSpeed's engine instead of tscale's own DDP/FSDP (parallel.deepspeed; see
    docs/distributed.md). Needs ``pip install 'tscale[deepspeed]'``."""

    enabled: bool = field(
        False,
        "Run the step through deepspeed.initialize (ZeRO); parallel.dp_replicate/dp_shard must "
        "stay at their defaults (DeepSpeed shards over all ranks).",
    )
    zero_stage: Literal[0, 1, 2, 3] = field(
        2,
        "ZeRO stage: 0 replicated (DDP), 1 optimizer state, 2 + gradients, 3 + params "
        "partitioned over the ranks (each layer gathered when it runs).",
    )
    offload_optimizer: Literal["none", "cpu"] = field(
        "none", "ZeRO-Offload: keep the optimizer state and step on the CPU (zero_stage >= 1)."
    )
    offload_param: Literal["none", "cpu"] = field(
        "none", "ZeRO-Infinity: keep the param partitions on the CPU (zero_stage 3)."
    )
    config: dict[str, Any] = field(
        {},
        "Extra DeepSpeed config keys merged into the one tscale builds (e.g. zero_optimization."
        "overlap_comm); keys tscale sets itself (batch sizes, clipping, optimizer, bf16, stage, "
        "offload) are refused with the tscale key to use.",
    )


@attrs.frozen(kw_only=True)
class ParallelConfig:
    """Data parallelism under torchrun (see docs/distributed.md); one process ignores it."""

    dp_replicate: int = field(
        -1,
        "Replicas (DDP degree); -1: the processes left over by dp_shard.",
        ge=1,
        sentinels={-1: "fill"},
    )
    dp_shard: int = field(
        1,
        "Ranks each replica's params and optimizer state are sharded over (FSDP degree); "
        "1: DDP; -1: all processes left over by dp_replicate.",
        ge=1,
        sentinels={-1: "fill"},
    )
    backend: Literal["auto", "gloo", "nccl"] = field(
        "auto", "Process-group backend: auto is nccl on CUDA, gloo on CPU."
    )
    bucket_mb: float = field(25.0, "DDP: gradient all-reduce bucket size in MiB.", gt=0)
    overlap_reduce: bool = field(
        False,
        "DDP: start each layer's gradient all-reduce in the backward as soon as the layer is "
        "done (train.microbatches 1, no param_dtype, no LoRA, no loss.fused). Measured no gain "
        "on CPU/gloo, where the reduction competes for the same cores.",
    )
    reshard_after_forward: bool = field(
        True,
        "FSDP: free each gathered layer after its forward and all-gather it again in the "
        "backward (False: keep it, one all-gather per layer and step, more memory).",
    )
    param_dtype: Literal["float32", "bfloat16"] | None = field(
        None,
        "Mixed precision: dtype the params are cast to for forward and backward (the master "
        "params and the optimizer stay in model.dtype); null: no cast. Applies to one process too.",
    )
    reduce_dtype: Literal["float32", "bfloat16"] = field(
        "float32", "Dtype of the gradient all-reduce / reduce-scatter across ranks."
    )
    timeout_s: float = field(600.0, "Seconds a collective may wait before the run fails.", gt=0)
    deepspeed: DeepSpeedSection = field(DeepSpeedSection(), "DeepSpeed ZeRO backend.")


@attrs.frozen(kw_only=True)
class LogConfig:
    """Where metrics go besides metrics.jsonl (see docs/logging.md): TensorBoard, Weights &
    Biases, MLflow; rank 0 only. Each logger is an extra: ``pip install 'tscale[tensorboard]'``."""

    to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = field(
        ["jsonl"],
        "Loggers: jsonl (metrics.jsonl, always written), tensorboard "
        "(run.output_dir/tensorboard), wandb (WANDB_MODE=offline works without a network), "
        "mlflow (a local SQLite store, run.output_dir/mlflow.db, unless "
        "log.mlflow_tracking_uri or MLFLOW_TRACKING_URI says otherwise).",
    )
    project: str | None = field(
        None,
        "W&B project and MLflow experiment; null: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, "
        "else 'tscale'.",
    )
    name: str | None = field(
        None, "Run name in W&B and MLflow; null: WANDB_NAME for W&B when set, else run.name."
    )
    tags: list[str] = field([], "Tags of the W&B run and the MLflow run.")
    tensorboard_dir: str | None = field(
        None, "TensorBoard event directory; null: run.output_dir/tensorboard."
    )
    mlflow_tracking_uri: str | None = field(
        None,
        "MLflow tracking URI (a server, sqlite:///path.db, a folder); null: "
        "MLFLOW_TRACKING_URI, else sqlite in run.output_dir/mlflow.db (artifacts in "
        "run.output_dir/mlartifacts).",
    )
    plot: bool = field(
        True,
        "Write run.output_dir/curves.png (loss, lr, grad norm, tokens/s) at the end of the "
        "run when matplotlib is installed (tscale[plot]).",
    )


@attrs.frozen(kw_only=True)
class Config:
    """A whole run."""

    run: RunConfig = field(RunConfig(), "Run directory, seed, device.")
    task: Any = attrs.field(
        default=SFTTask(),
        metadata={
            "help": "The training objective: task.type (sft, or module:ClassName of your own "
            "task record, see docs/tasks.md) and that task's own keys.",
            "resolve": resolve_task_class,
            "registry": TASKS,  # the built-in types, for docs/config.md
        },
    )
    model: ModelConfig = field(ModelConfig(), "Model architecture.")
    data: DataConfig = field(DataConfig(), "Data.")
    optimizer: OptimizerConfig = field(
        AdamWConfig(),
        "Optimizer: optimizer.type picks the record (tscale.optim.OPTIMIZER_CONFIGS).",
    )
    scheduler: SchedulerConfig = field(
        CosineConfig(),
        "Learning-rate schedule: scheduler.type picks the record (tscale.optim.SCHEDULE_CONFIGS).",
    )
    loss: LossConfig = field(LossConfig(), "Loss.")
    lora: LoraSection = field(LoraSection(), "LoRA / QLoRA adapters.")
    train: TrainConfig = field(TrainConfig(), "Training loop.")
    eval: EvalConfig = field(EvalConfig(), "Evaluation.")
    parallel: ParallelConfig = field(ParallelConfig(), "Data parallelism (DDP / FSDP / HSDP).")
    log: LogConfig = field(LogConfig(), "Loggers: TensorBoard, W&B, MLflow, the end-of-run plot.")


# ---- defaults that depend on the run ------------------------------------------------------------

RANDOM_INIT_DEFAULTS: dict[str, Any] = {
    "optimizer.lr": 1e-3,
    "data.max_length": 64,
    "data.loss_mode": "completion_only",
    "data.group_by_length": False,
    "data.drop_last": True,
    "train.max_steps": 100,
}
"""What the null/auto keys become for a model trained from random init (the quickstart's)."""

PRETRAINED_DEFAULTS: dict[str, Any] = {
    "optimizer.lr": 2e-5,
    "optimizer.lr with lora.enabled": 2e-4,
    "data.max_length": 1024,  # at most: the model's max_position_embeddings caps it
    "data.loss_mode": "assistant_only",
    "data.group_by_length": True,  # in-memory data only: streaming reads in order
    "data.drop_last": False,
    "train.epochs": 1.0,
}
"""What the null/auto keys become when fine-tuning ``model.path`` (what TRL/Axolotl users
expect: a small learning rate (TRL's SFT default; ten times more for LoRA adapters, which
start at zero: the QLoRA paper's and Axolotl's LoRA examples' 2e-4), the model's context up to
1024 tokens, one pass over the data in which every row trains, loss on the assistant turns,
batches of similar lengths
(HF Trainer's ``group_by_length``): benchmarks/e2e_sft.py measured half the epoch time of
random batches, whose padding the model computes)."""

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_max_positions(path: str | Path) -> int | None:
    """The longest sequence the checkpoint at ``path`` supports, from its ``config.json``
    (``max_position_embeddings`` or a family's synonym); None when unreadable or absent."""
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _POSITION_KEYS:
        value = hf.get(key) if isinstance(hf, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def task_run_defaults(task: Any) -> dict[str, Any]:
    """The task record's own defaults of the run-dependent keys (its class's ``run_defaults``,
    e.g. online RL's ``{"data.group_by_length": False}``), which win over
    :data:`PRETRAINED_DEFAULTS` / :data:`RANDOM_INIT_DEFAULTS`.

    Raises:
        ConfigError: it names a key that has no run-dependent default.
    """
    own = dict(getattr(task, "run_defaults", None) or {})
    known = PRETRAINED_DEFAULTS.keys() | RANDOM_INIT_DEFAULTS.keys()
    for key in own:
        if key not in known:
            name = getattr(task, "type", type(task).__name__)
            raise ConfigError(
                f"task.type {name}: run_defaults names {key!r}, which has no run-dependent "
                f"default (those are: {', '.join(sorted(known))})"
            )
    return own


def resolve_defaults(cfg: Config, *, max_positions: int | None = None) -> Config:
    """``cfg`` with its null/auto keys (optimizer.lr, data.max_length, data.loss_mode,
    data.group_by_length, data.drop_last, train.max_steps / train.epochs) set for this run:
    the task's own defaults first (:func:`task_run_defaults`: online RL's batches are not
    grouped by length), then :data:`PRETRAINED_DEFAULTS` when ``model.path`` is set
    (``data.max_length`` capped by ``max_positions``, read from the checkpoint's config.json
    when not given), else :data:`RANDOM_INIT_DEFAULTS`. Keys the user set are kept; resolving
    twice changes nothing.

    ``train.max_steps`` stays null when ``train.epochs`` decides the length: the steps per epoch
    are known once the data is read (:func:`steps_for_epochs`).
    """
    pretrained = cfg.model.path is not None
    table = {
        **(PRETRAINED_DEFAULTS if pretrained else RANDOM_INIT_DEFAULTS),
        **task_run_defaults(cfg.task),
    }
    opt, data, train = cfg.optimizer, cfg.data, cfg.train
    if opt.lr is None:
        lora = pretrained and cfg.lora.enabled
        opt = attrs.evolve(
            opt, lr=table["optimizer.lr with lora.enabled" if lora else "optimizer.lr"]
        )
    if data.max_length is None:
        length = table["data.max_length"]
        if pretrained:
            limit = max_positions or model_max_positions(cfg.model.path)  # type: ignore[arg-type]
            length = min(length, limit) if limit else length
        data = attrs.evolve(data, max_length=length)
    if data.group_by_length is None:
        group = table["data.group_by_length"] and not data.streaming
        data = attrs.evolve(data, group_by_length=group)
    if data.drop_last is None:
        data = attrs.evolve(data, drop_last=table["data.drop_last"])
    if data.loss_mode == "auto":
        data = attrs.evolve(data, loss_mode=table["data.loss_mode"])
    if train.max_steps is None and train.epochs is None:
        if pretrained:
            train = attrs.evolve(train, epochs=table["train.epochs"])
        else:
            train = attrs.evolve(train, max_steps=table["train.max_steps"])
    return attrs.evolve(cfg, optimizer=opt, data=data, train=train)


def steps_for_epochs(cfg: Config, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``ceil(train.epochs x steps_per_epoch)``, or
    ``train.max_steps`` when that comes first (or alone)."""
    t = cfg.train
    if t.epochs is None:
        if t.max_steps is None:
            raise ValueError("train.max_steps and train.epochs are both null: resolve first")
        return t.max_steps
    by_epochs = max(1, math.ceil(t.epochs * steps_per_epoch - 1e-9))
    return by_epochs if t.max_steps is None else min(t.max_steps, by_epochs)
