"""Online RL from the policy's own samples: GRPO (with the Dr. GRPO, DAPO, BNPO and GSPO
variants) and RLOO, end to end from YAML (``task.type: grpo`` or ``rloo``).

One batch of the loop, in order:

1. **data** (:meth:`GRPOTask.examples`): each prompt record becomes the encoded generation
   prompt (the template's, with its generation prompt) with labels -100 and ``record_ids``,
   a per-token field holding the record's key (a hash of where it came from); the record's
   columns travel beside the tokens as the example's ``columns`` entry (kept in memory and in
   the processed-data cache) and the rewards read them host-side by that key.
2. **rollout** (:meth:`GRPOTask.rollout`, a pure function of ``(state, batch, key)``): G
   completions of every prompt with the KV cache (:func:`tscale.rl.sample_completions`, keys
   per (step, global prompt index, sample, position)); rewards from ``task.rewards``; group
   advantages over the whole batch's groups (gathered over ranks); the loss mask (truncated
   completions and groups without reward spread optionally masked, shapes static); the
   reference log-probs when β > 0 and the old-policy log-probs for μ > 1, both without a graph;
   the rollout's statistics (rewards, lengths, generation time). Its output is the training
   batch: one row per completion.
3. **loss** (:meth:`GRPOTask.loss`), ``num_iterations`` (μ) optimizer steps on that batch: the
   training forward's log π at T over the completion tokens (logits only there, through
   ``logits_index``) → :func:`tscale.losses.rl.policy_loss`; the log-prob mismatch against the
   sampler's recorded values and the rollout statistics as metrics.

How rollout metrics reach ``metrics.jsonl``: the rollout writes its global statistics into the
batch as ``rollout_stats`` (one float64 row per completion, every row the same values) and the
loss returns column k as a mean over its rows (``M.mean(Σ rows, n)``): that is the value itself
for any microbatch split and world size, and the step's metric reduction carries it to the log
without another seam.
"""

# ruff: noqa: RUF009 - `field` returns an attrs field (a default declaration), not a shared value
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core import metrics as M
from tscale.core.fields import field
from tscale.core.result import Err, Ok
from tscale.core.state import TrainState
from tscale.data.length import Dropped, LengthReport
from tscale.data.prompt import BUILTIN_TEMPLATES, render_messages, to_messages
from tscale.errors import ConfigError, DataError
from tscale.losses.rl import (
    group_advantages,
    kl_penalty,
    policy_loss,
    rloo_advantages,
    rloo_policy_loss,
    zero_std_groups,
)
from tscale.models.protocol import frozen_kw
from tscale.rewards import (
    RewardsConfig,
    RewardSet,
    build_reward_set,
    check_fingerprint,
    failure_limit_error,
    fingerprint_rewards,
    make_probe,
)
from tscale.rl.contract import logprob_mismatch
from tscale.rl.rollout import sample_completions
from tscale.rl.sampling import prompt_keys, scaled_scores
from tscale.rl.stats import (
    all_gather_rows,
    completion_stats,
    gather_present,
    rank_and_world,
    reward_stats,
    stats_rows,
)
from tscale.tasks.base import (
    FrozenTree,
    LossFn,
    RolloutFn,
    StatefulRollout,
    TaskContext,
    TaskDefaults,
    register_task,
)
from tscale.tasks.reference import frozen_copy, lora_base_reference, reference_apply
from tscale.tasks.sft import evaluate_lm, reference_answer

__all__ = [
    "GRPOTask",
    "RLOOTask",
    "completion_logits",
    "prompt_examples",
    "record_key",
    "rollout_metrics",
    "stop_ids_of",
]

logger = logging.getLogger("tscale.rl")

RECORD_IDS = "record_ids"
COLUMNS = "columns"
TIMING_PREFIX = "time/"
"""Metrics that are timings (left out of resume comparisons)."""


# --------------------------------------------------------------------------------------------
# Data: prompt records → prompt examples
# --------------------------------------------------------------------------------------------


def record_key(place: str) -> int:
    """A record's key: 62 bits of the SHA-256 of where it came from (``file:line``), stable
    across processes, runs and the processed-data cache."""
    return int.from_bytes(hashlib.sha256(place.encode("utf-8")).digest()[:8], "little") >> 2


def prompt_examples(
    cfg: Any, encoder: Any, template: Any, *, max_prompt_length: int | None
) -> Callable[..., Any]:
    """The online-RL example stage: each record → ``{"input_ids": its generation prompt,
    "labels": -100 …, "record_ids": its key …, "columns": the record}``.

    The prompt is the template's rendering of the record without its answer, with the
    template's generation prompt (:func:`tscale.train.data_template.prompt_encoder`, the same
    one evaluation uses); a prompt longer than ``max_prompt_length`` (or ``data.max_length``)
    is dropped (counted and written to the dropped-rows file), never cut: its reward would judge
    a question the model did not see."""
    encode = _prompt_encoder(cfg.data.system_prompt, encoder, template.template)

    def stage(
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: Any,
        max_length: int | None,
    ) -> tuple[list[Any], LengthReport]:
        template.check(records, encoder)
        limit = min(x for x in (max_prompt_length, max_length, 1 << 62) if x is not None)
        out: list[Any] = []
        for record, place in zip(records, places, strict=True):
            try:
                ids = encode(record)
            except DataError as err:
                out.append(Err(f"{place}: {err}"))
                continue
            if not ids:
                out.append(Err(f"{place}: empty prompt"))
                continue
            if len(ids) > limit:
                out.append(Dropped(f"too long: prompt of {len(ids)} tokens > {limit}"))
                continue
            key = record_key(place)
            out.append(
                Ok(
                    {
                        "input_ids": ids,
                        "labels": [-100] * len(ids),
                        RECORD_IDS: [key] * len(ids),
                        COLUMNS: dict(record),
                    }
                )
            )
        return out, LengthReport()

    return stage


def _prompt_encoder(system: str | None, encoder: Any, tpl: Any) -> Callable[[dict], list[int]]:
    """``record -> ids`` of its generation prompt, as evaluation encodes it
    (``tscale.train.data_template.prompt_encoder``): plain ``prompt`` records as the encoder's
    prompt; chat records rendered without their last turn when it is the answer (all of them
    when the record ends on the user), with the template's generation prompt; BOS first when
    the tokenizer adds one and the template did not write it."""
    plain = tpl.source == BUILTIN_TEMPLATES["plain"].source
    bos = [encoder.bos_id] if encoder.adds_bos and encoder.bos_id is not None else []

    def encode(record: dict) -> list[int]:
        if plain and "prompt" in record:
            return encoder.encode_prompt(record["prompt"])
        messages = to_messages(record, system=system)
        if not isinstance(messages, Ok):
            raise DataError(f"record cannot be rendered: {messages.reason}")
        turns = messages.value
        if turns and turns[-1].get("role") == "assistant":
            turns = turns[:-1]
        text = render_messages(tpl, turns, add_generation_prompt=True)
        ids = encoder.tokenizer.encode(text, add_special_tokens=False).ids
        return ids if not bos or ids[:1] == bos else [*bos, *ids]

    return encode


def stop_ids_of(encoder: Any, template: Any) -> list[int]:
    """EOS and the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>`` …) when it is one
    token of the tokenizer."""
    ids = [encoder.eos_id]
    eot = getattr(template, "eos_token", "") if template is not None else ""
    if eot:
        tid = encoder.tokenizer.token_to_id(eot)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

Reference = Literal["auto", "copy", "lora_base"]


class _MismatchWarning:
    """A callback (:class:`tscale.train.callbacks.Callback`'s hooks) that warns, once per flush,
    when the training forward's log-probs leave the sampler's by more than ``threshold``
    (max |exp(Δ) − 1|)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def on_train_start(self, info: dict[str, Any]) -> None:
        pass

    def on_eval(self, info: dict[str, Any]) -> None:
        pass

    def on_save(self, info: dict[str, Any]) -> None:
        pass

    def on_train_end(self, info: dict[str, Any]) -> None:
        pass

    def on_step_end(self, info: dict[str, Any]) -> None:
        worst = [
            (r["step"], r["logprob_mismatch"])
            for r in info.get("rows", [])
            if isinstance(r.get("logprob_mismatch"), float)
            and r["logprob_mismatch"] > self.threshold
        ]
        if worst:
            step, value = max(worst, key=lambda x: x[1])
            logger.warning(
                "step %d: the training forward's log-probs differ from the sampler's by up to "
                "|exp(Δ)−1| = %.3g (task.mismatch_warning %.3g): the first update is off-policy; "
                "check model.dtype and the attention backend (docs/rl.md)",
                step,
                value,
                self.threshold,
            )


@register_task
@attrs.frozen(kw_only=True)
class GRPOTask(TaskDefaults):
    """GRPO from the policy's own samples (TRL's GRPOTrainer options)."""

    type: Literal["grpo"] = field("grpo", "Online RL: GRPO (rloo: leave-one-out baseline).")
    num_generations: int = field(8, "G: completions sampled per prompt (a group).", ge=2)
    max_completion_length: int = field(24, "Most tokens per completion.", ge=1)
    max_prompt_length: int | None = field(
        None, "Prompts longer than this are dropped (null: data.max_length).", ge=1
    )
    temperature: float = field(1.0, "Sampling temperature T (π is softmax(logits / T)).", gt=0.0)
    top_k: int | None = field(None, "Sample among the k most likely tokens (null: all).", ge=1)
    top_p: float | None = field(
        None, "Sample from the nucleus of this mass (null: all).", gt=0.0, le=1.0
    )
    num_iterations: int = field(
        1,
        "μ: optimizer steps per generation batch (μ > 1 recomputes the old-policy log-probs "
        "once, without a graph; μ = 1 uses the sampler's).",
        ge=1,
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(
        "dapo",
        "grpo (per-sequence token mean), dapo/bnpo (token mean over the global batch), dr_grpo "
        "(sum / (completions × max_completion_length)).",
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", "Divide the centred rewards by the group's std, the batch's, or nothing."
    )
    epsilon: float = field(0.2, "ε_low of the clipped ratio.", ge=0.0)
    epsilon_high: float | None = field(None, "ε_high (clip-higher); null: epsilon.", ge=0.0)
    delta: float | None = field(None, "Upper bound of the unclipped ratio (two-sided clip).")
    importance_sampling_level: Literal["token", "sequence"] = field(
        "token", "token, or sequence (GSPO: one weight per completion)."
    )
    beta: float = field(0.0, "β of the k3 KL to the reference (0: no reference pass).", ge=0.0)
    reference: Reference = field(
        "auto", "The reference when beta > 0: auto (the LoRA base with LoRA, else a copy)."
    )
    share_prompt: bool = field(
        False,
        "Lay out each group as one document for the training forward: the prompt once, its G "
        "completions after it (a block mask keeps them apart), so the forward runs over the "
        "prompt once per group instead of G times; false: one row per completion.",
    )
    mask_truncated_completions: bool = field(
        False, "Leave completions that hit max_completion_length out of the loss."
    )
    mask_zero_std_groups: bool = field(
        False,
        "DAPO's dynamic sampling without resampling: groups whose rewards have no spread are "
        "left out of the loss and its normaliser (shapes stay static).",
    )
    mismatch_warning: float = field(
        1e-3, "Warn when the log-prob mismatch (max |exp(Δ)−1|) exceeds this.", gt=0.0
    )
    rewards: RewardsConfig = field(
        RewardsConfig(), "The reward functions (default: exact_match on the completion column)."
    )

    key_metrics: ClassVar[tuple[str, ...]] = ("reward", "frac_reward_zero_std")
    run_defaults: ClassVar[Mapping[str, Any]] = {"data.group_by_length": False}
    """Batches of random prompts even when fine-tuning: prompts of one length in a batch would
    correlate its rollouts (RLOO and PPO inherit it)."""

    # ---------------------------------------------------------------- options

    @property
    def updates_per_batch(self) -> int:  # type: ignore[override]
        """μ optimizer steps on each rollout batch."""
        return self.num_iterations

    def reward_set(self, ctx: TaskContext | None = None) -> RewardSet:
        run = {} if ctx is None else {"device": ctx.device, "tokenizer": ctx.data.encoder.tokenizer}
        return build_reward_set(
            self.rewards,
            key="task.rewards",
            run_kwargs=None,
            max_completion_length=self.max_completion_length,
            **run,
        )

    def check(self, config: Any) -> None:
        d, t = config.data, config.train
        if d.packing.enabled:
            raise ConfigError(
                f"data.packing: task.type {self.type} samples completions of one prompt per row; "
                "set data.packing.enabled: false"
            )
        if getattr(d, "streaming", False):
            raise ConfigError(
                f"data.streaming: task.type {self.type} reads each prompt's record columns from "
                "memory; set data.streaming: false"
            )
        if d.batch_size is None:
            raise ConfigError(
                f"data.batch_size: task.type {self.type} needs a number of prompts per step "
                "(data.max_tokens batches are not supported)"
            )
        if d.batch_size % max(t.microbatches, 1):
            raise ConfigError(
                f"train.microbatches ({t.microbatches}) must divide data.batch_size "
                f"({d.batch_size}): a group (the G completions of a prompt) is never split"
            )
        if config.parallel.dp_shard != 1 or config.parallel.deepspeed.enabled:
            raise ConfigError(
                f"task.type {self.type}: generation needs the whole params on every rank; "
                "FSDP/DeepSpeed are refused (use DDP, or LoRA on one device)"
            )
        if self.delta is not None and self.delta <= 1 + (self.epsilon_high or self.epsilon):
            raise ConfigError(f"task.delta ({self.delta}) must exceed 1 + task.epsilon_high")
        self.reward_set()  # one clear line for an unknown reward or setting

    def reference_strategy(self, ctx: TaskContext) -> str:
        if self.beta == 0.0:
            return "none"
        if self.reference == "auto":
            return "lora_base" if "base" in ctx.frozen else "copy"
        return self.reference

    # ---------------------------------------------------------------- the contract

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        return prompt_examples(cfg, encoder, template, max_prompt_length=self.max_prompt_length)

    def prepare(self, ctx: TaskContext) -> Mapping[str, FrozenTree]:
        """β > 0: the reference (a frozen copy, or the LoRA base at no cost); β = 0: nothing."""
        strategy = self.reference_strategy(ctx)
        if strategy == "copy":
            return frozen_copy(ctx)
        if strategy == "lora_base":
            return lora_base_reference(ctx)
        return {}

    def callbacks(self, ctx: TaskContext) -> list[Any]:
        """The task's own callbacks: the log-prob mismatch warning."""
        return [_MismatchWarning(self.mismatch_warning)]

    def checkpoint_meta(self, ctx: TaskContext) -> dict[str, Any]:
        """What every checkpoint records: each reward function's fingerprint on a probe made
        from the first training records (:mod:`tscale.rewards.fingerprint`; a function that
        scores the probe twice differently stops the run here, before any step)."""
        enc = ctx.data.encoder
        records = [ex[COLUMNS] for ex in ctx.data.train_examples[:8] if COLUMNS in ex]
        if not records:
            return {}
        probe = make_probe(
            records, encode=lambda s: enc.tokenizer.encode(s, add_special_tokens=False).ids
        )
        return {"reward_fingerprint": fingerprint_rewards(self.reward_set(), probe)}

    def check_resume(self, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        """Refuse to resume when the rewards changed since the checkpoint (one line)."""
        if "reward_fingerprint" in saved and "reward_fingerprint" in current:
            check_fingerprint(saved["reward_fingerprint"], current["reward_fingerprint"])

    def stat_names(self) -> list[str]:
        names = ["reward", "reward_std"]
        rewards = self.reward_set()
        for name in rewards.names:
            names += [f"reward/{name}", f"reward/{name}/std"]
        names += rewards.count_names  # e.g. reward/<name>/truncated of a reward model
        names += [
            "reward/unscorable",
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/min_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "advantages/mean",
            "advantages/std",
            "time/generation_s",
            "time/rollout_s",
        ]
        return names

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of the gathered batch's rewards ``[N_global * G]``."""
        return group_advantages(rewards, self.num_generations, self.scale_rewards)

    def rollout(self, ctx: TaskContext) -> RolloutFn | None:
        bundle = ctx.data
        enc = bundle.encoder
        table = _columns_table(bundle.train_examples)
        reward_set = self.reward_set(ctx)
        names = self.stat_names()
        stops = stop_ids_of(enc, bundle.template)
        ref = reference_apply(ctx) if self.reference_strategy(ctx) != "none" else None
        model = ctx.model
        g, temp = self.num_generations, self.temperature
        microbatches = ctx.config.train.microbatches

        def stage(state: TrainState, batch: TensorDictBase, key: torch.Tensor) -> TensorDictBase:
            t0 = time.perf_counter()
            rank, world = rank_and_world()
            ids, rid = batch["input_ids"].cpu(), batch[RECORD_IDS].cpu()
            n = ids.shape[0]
            if n % microbatches:  # this rank's prompts: each microbatch holds whole groups
                raise ConfigError(
                    f"train.microbatches ({microbatches}) must divide each rank's {n} prompts "
                    "(data.batch_size / world size): a group is never split"
                )
            lengths = (rid >= 0).sum(1).tolist()
            prompts = [row[:k] for row, k in zip(ids.tolist(), lengths, strict=True)]
            records = [_lookup(table, int(r)) for r in rid[:, 0].tolist()]
            keys = prompt_keys(key, n * world)[rank * n : (rank + 1) * n]  # global prompt index
            frozen = state.frozen or None
            ro = sample_completions(
                model,
                state.params,
                prompts,
                num_samples=g,
                key=keys,
                max_new_tokens=self.max_completion_length,
                pad_id=enc.pad_id,
                temperature=temp,
                top_k=self.top_k,
                top_p=self.top_p,
                stop_ids=stops,
                device=ctx.device,
                frozen=frozen,
            )
            completions = ro.completions()
            texts = [enc.decode(c) for c in completions]
            prompt_texts = [enc.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
            columns = _columns(records, g)
            scores = reward_set.score(
                [prompt_texts[i // g] for i in range(n * g)],
                texts,
                completions,
                columns,
                prompt_ids=[prompts[i // g] for i in range(n * g)],
                raise_over_limit=world == 1,  # one process: raises at the crossing itself
            )
            # each rank's window counts its own calls; the ranks stop together when any
            # rank's crossed (one tiny all-gather per step; none in one process)
            over = gather_present(scores.over_limit or None, ctx.device)
            if over:
                raise failure_limit_error(over)
            if self.share_prompt:
                out = _group_rows(ro, self.max_completion_length)
            else:
                out = _training_rows(ro, self.max_completion_length)
            self._extra_inputs(out, state, ctx, ref)
            adv, adv_stats = self.rollout_advantages(scores.total.to(ctx.device), out)
            total = all_gather_rows(scores.total.to(ctx.device)).cpu()
            per_fn = all_gather_rows(scores.per_function.to(ctx.device)).cpu()
            zero_all = zero_std_groups(total, g)
            zero = zero_all[rank * n : (rank + 1) * n]

            mask = out["completion_mask"].clone()
            if self.mask_truncated_completions:
                mask &= ~out["truncated"][:, None]
            if self.mask_zero_std_groups:
                mask &= ~zero.repeat_interleave(g).to(mask.device)[:, None]
            out["loss_mask"] = mask
            out["advantages"] = adv.to(torch.float32).to(mask.device)
            out["rewards"] = scores.total.to(mask.device)
            stats = {
                **reward_stats(total, per_fn, reward_set.names, zero_all),
                **_summed_counts(scores.counts, ctx.device),
                **completion_stats(
                    all_gather_rows(ro.lengths),
                    all_gather_rows(ro.truncated.to(torch.int64)).cpu(),  # gloo: no bool
                ),
                **adv_stats,
                "time/generation_s": ro.generation_seconds,
                "time/rollout_s": time.perf_counter() - t0,
            }
            out["rollout_stats"] = stats_rows(stats, names, n * g).to(mask.device)
            return out

        # the failure window travels in the checkpoint: a resumed run stops where the
        # uninterrupted one does
        return StatefulRollout(
            stage,
            state_dict=lambda: {"reward_failures": reward_set.state_dict()},
            load_state_dict=lambda saved: reward_set.load_state_dict(saved["reward_failures"]),
        )

    def rollout_advantages(
        self, total: torch.Tensor, batch: TensorDict
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's advantages (``[n]`` per completion; PPO's are ``[n, T]`` per token) from
        its rows' total rewards and rollout batch, and their statistics over the global batch
        (``advantages/mean``, ``advantages/std``). GRPO and RLOO: the advantages of the gathered
        (shaped) rewards, this rank's rows kept."""
        rank, _ = rank_and_world()
        rows = total.shape[0]
        adv_all = self.advantages(all_gather_rows(self.shaped_rewards(total, batch)).cpu())
        adv = adv_all[rank * rows : (rank + 1) * rows]
        stats = {
            "advantages/mean": float(adv_all.double().mean()),
            "advantages/std": float(adv_all.double().std()) if adv_all.numel() > 1 else 0.0,
        }
        return adv.to(torch.float32), stats

    def shaped_rewards(self, total: torch.Tensor, batch: TensorDict) -> torch.Tensor:
        """The rewards the advantages are computed from (GRPO: the total; its KL is in the
        loss)."""
        return total

    def _extra_inputs(
        self,
        out: TensorDict,
        state: TrainState,
        ctx: TaskContext,
        ref: Callable[..., torch.Tensor] | None,
    ) -> None:
        """The old-policy log-probs (the sampler's for μ = 1, recomputed once for μ > 1) and the
        reference's (β > 0), both without a graph."""
        g = self.num_generations
        with torch.no_grad():
            if self.num_iterations > 1:
                logits = completion_logits(
                    lambda b: ctx.apply_fn(state.params, b, **frozen_kw(state.frozen or None)),
                    out,
                    g,
                )
                out["old_logps"] = _logps(logits, out, self.temperature)[0].detach()
            else:
                out["old_logps"] = out["sampler_logps"]
            if ref is not None:
                logits = completion_logits(lambda b: ref(b, state.frozen), out, g)
                out["ref_logps"] = _logps(logits, out, self.temperature)[0]

    def policy_terms(
        self, logps: torch.Tensor, batch: Mapping[str, torch.Tensor], entropies: torch.Tensor
    ) -> Any:
        return policy_loss(
            logps,
            batch["old_logps"],
            batch["advantages"],
            batch["loss_mask"],
            loss_type=self.loss_type,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            ref_logps=batch.get("ref_logps", None),
            beta=self.beta,
            entropies=entropies,
        )

    def loss(self, ctx: TaskContext) -> LossFn:
        apply_fn, temp, g = ctx.apply_fn, self.temperature, self.num_generations
        names = self.stat_names()

        def loss_fn(
            params: TensorDictBase,
            batch: Mapping[str, torch.Tensor],
            *,
            frozen: Mapping[str, Any] | None = None,
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            logits = completion_logits(  # at logits_index only
                lambda b: apply_fn(params, b, **frozen_kw(frozen)), batch, g
            )
            logps, entropies = _logps(logits, batch, temp, entropy=True)
            out = self.policy_terms(logps, batch, entropies)
            aux: dict[str, Any] = {M.NORMALISER: out.normaliser, **out.metrics}
            aux |= rollout_metrics(logps, batch, names)
            return out.loss_sum, aux

        return loss_fn

    # ---------------------------------------------------------------- eval

    def has_eval(self, data: Any, config: Any) -> bool:
        return config.eval.num_samples > 0 and any(
            reference_answer(r) is not None for r in data.eval_records
        )

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Held-out exact match of greedy answers (:func:`evaluate_lm`, no held-out loss: the
        prompt rows train nothing) and the mean total reward of those answers."""
        ev = ctx.config.eval
        bundle = attrs.evolve(ctx.data, eval_examples=[])
        metrics, samples = evaluate_lm(
            ctx.model,
            params,
            bundle,
            num_samples=ev.num_samples,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            device=ctx.device,
            prepare_batch=ctx.prepare_batch,
            frozen=frozen,
        )
        records = [r for r in bundle.eval_records if reference_answer(r) is not None]
        records = records[: len(samples)]
        if records:
            enc = bundle.encoder
            answers = [s["answer"] for s in samples]
            scores = self.reward_set(ctx).score(
                [s["prompt"] for s in samples],
                answers,
                [enc.tokenizer.encode(a, add_special_tokens=False).ids for a in answers],
                _columns(records, 1),
                track_failures=False,
            )
            total = scores.total[~scores.total.isnan()]
            metrics["reward"] = float(total.mean()) if total.numel() else float("nan")
        return metrics, samples


@register_task
@attrs.frozen(kw_only=True)
class RLOOTask(GRPOTask):
    """RLOO: the leave-one-out baseline, PPO's clip on whole-sequence ratios, the KL to the
    reference (k1, summed over the completion) subtracted from the reward (TRL's RLOOTrainer)."""

    type: Literal["rloo"] = field("rloo", "Online RL: REINFORCE leave-one-out.")
    normalize_advantages: bool = field(False, "Whiten the advantages over the batch.")
    beta: float = field(0.05, "β of the sequence-level k1 KL in the reward (0: none).", ge=0.0)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return rloo_advantages(rewards, self.num_generations, normalize=self.normalize_advantages)

    def shaped_rewards(self, total: torch.Tensor, batch: TensorDict) -> torch.Tensor:
        """``R − β Σ_t (log π_old − log π_ref)`` (the k1 KL of the sampled completion)."""
        if "ref_logps" not in batch or self.beta == 0.0:
            return total
        m = batch["completion_mask"].to(torch.float32)
        kl = ((batch["old_logps"].float() - batch["ref_logps"].float()) * m).sum(-1)
        return total - self.beta * kl.to(total.device)

    def policy_terms(
        self, logps: torch.Tensor, batch: Mapping[str, torch.Tensor], entropies: torch.Tensor
    ) -> Any:
        out = rloo_policy_loss(
            logps,
            batch["old_logps"],
            batch["advantages"],
            batch["loss_mask"],
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
        )
        m = batch["loss_mask"].to(logps.dtype)
        out.metrics["entropy"] = M.mean((entropies.detach() * m).sum(), m.sum())
        if "ref_logps" in batch:
            kl = kl_penalty(logps.detach(), batch["ref_logps"], "k1")
            out.metrics["kl"] = M.mean((kl * m).sum(), m.sum())
        return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def rollout_metrics(
    logps: torch.Tensor, batch: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, Any]:
    """The metrics every online-RL loss returns beside its own: ``logprob_mismatch`` of the
    training forward's log π against the sampler's, and the rollout's statistics (the
    ``rollout_stats`` columns ``names``, each the value itself for any microbatch split)."""
    aux: dict[str, Any] = {
        "logprob_mismatch": M.maximum(
            logprob_mismatch(
                logps.detach(), batch["sampler_logps"], batch["completion_mask"].bool()
            )
        )
    }
    stats = batch["rollout_stats"]
    rows = torch.tensor(stats.shape[0], device=stats.device, dtype=stats.dtype)
    for k, name in enumerate(names):
        aux[name] = M.mean(stats[:, k].sum(), rows)
    return aux


def _summed_counts(counts: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """The reward functions' counts of this batch summed over the ranks (a collective)."""
    if not counts:
        return {}
    local = torch.tensor([list(counts.values())], dtype=torch.float64, device=device)
    total = all_gather_rows(local).sum(0).tolist()
    return dict(zip(counts, total, strict=True))


def _columns_table(examples: Sequence[dict]) -> dict[int, dict]:
    """``record key -> columns`` of the training examples."""
    table: dict[int, dict] = {}
    for ex in examples:
        if RECORD_IDS in ex and COLUMNS in ex:
            table[int(ex[RECORD_IDS][0])] = ex[COLUMNS]
    return table


def _lookup(table: Mapping[int, dict], key: int) -> dict:
    try:
        return table[key]
    except KeyError:
        raise DataError(
            f"a prompt row's record key {key} has no columns: the batch does not come from this "
            "task's example stage (record_ids and columns), or the processed-data cache lost "
            "them; delete the cache folder (data.cache_dir) and run again"
        ) from None


def _columns(records: Sequence[dict], repeat: int) -> dict[str, list[Any]]:
    """The records' columns, one list per column, each record's entry ``repeat`` times."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return {k: [r.get(k) for r in records for _ in range(repeat)] for k in keys}


def _training_rows(ro: Any, width: int) -> TensorDict:
    """The rollout's training rows (:func:`tscale.rl.rollout_batch`, right layout), with every
    per-completion tensor at completion positions [N*G, width]: ``completion_ids``,
    ``sampler_logps`` (the sampler's recorded log π), ``completion_mask``, and ``logits_index``
    (= ``completion_index``: the model computes logits at the completion positions only)."""
    from tscale.rl.contract import rollout_batch

    rows = rollout_batch(ro, layout="right")
    dev = rows["input_ids"].device
    out = TensorDict(
        {
            "input_ids": rows["input_ids"],
            "position_ids": rows["position_ids"],
            "doc_ids": rows["doc_ids"],
            "logits_index": rows["completion_index"],
            "completion_ids": ro.completion_ids.to(dev),
            "completion_mask": rows["completion_mask"],
            "sampler_logps": ro.sampler_logps.to(dev),
            "truncated": rows["truncated"],
            "group": rows["group"],
        },
        batch_size=rows.batch_size,
    )
    assert out["completion_ids"].shape[1] == width
    return out


def _group_rows(ro: Any, width: int) -> TensorDict:
    """The rollout's training rows with each group as one document (``task.share_prompt``).

    Group p's document is its prompt but the last token (branch 0), then for each completion k
    the prompt's last token followed by the completion without its last token (branch k + 1,
    positions restarting at P - 1): every completion token is predicted at the position it has
    in ``prompt + completion``, and the model's block mask (``doc_ids``, ``branch_ids``) keeps
    the completions apart, so each one computes what it computes in a row of its own. The
    document (width rounded up to a multiple of G, padded with doc id 0) is stored folded as
    G consecutive rows of width W / G, so that the batch keeps one row per completion
    (microbatches and ranks split whole groups) and :func:`completion_logits` unfolds it.
    ``logits_index`` [N*G, M] holds each completion token's position in its group's document;
    the per-completion tensors are those of :func:`_training_rows`."""
    g = ro.num_samples
    lengths, comps = ro.lengths.tolist(), ro.completion_ids.tolist()
    docs: list[tuple[list[int], list[int], list[int]]] = []
    index: list[list[int]] = []
    for p, prompt in enumerate(ro.prompt_ids):
        last = len(prompt) - 1
        ids, pos, branch = list(prompt[:-1]), list(range(last)), [0] * last
        for k in range(g):
            r = p * g + k
            n = lengths[r]
            index.append([*range(len(ids), len(ids) + n), *[0] * (width - n)])
            ids += [prompt[-1], *comps[r][: n - 1]]
            pos += range(last, last + n)
            branch += [k + 1] * n
        docs.append((ids, pos, branch))
    doc_width = max((len(d[0]) for d in docs), default=0)
    doc_width = -(-doc_width // g) * g  # G folded rows per document
    real = [len(d[0]) for d in docs]
    # [N, 4, W]: input_ids (pad_id after the end), position_ids, branch_ids, doc_ids (1 real)
    fields = torch.tensor(
        [
            [
                [*ids, *[ro.pad_id] * (doc_width - n)],
                [*pos, *[0] * (doc_width - n)],
                [*branch, *[0] * (doc_width - n)],
                [*[1] * n, *[0] * (doc_width - n)],
            ]
            for (ids, pos, branch), n in zip(docs, real, strict=True)
        ],
        dtype=torch.int64,
    ).reshape(len(docs), 4, doc_width)
    dev = ro.completion_ids.device
    rows = len(lengths)

    def folded(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows, doc_width // g).to(dev)

    return TensorDict(
        {
            "input_ids": folded(fields[:, 0]),
            "position_ids": folded(fields[:, 1]),
            "doc_ids": folded(fields[:, 3]),
            "branch_ids": folded(fields[:, 2]),
            "logits_index": torch.tensor(index, dtype=torch.int64).reshape(rows, width).to(dev),
            "completion_ids": ro.completion_ids,
            "completion_mask": ro.completion_mask(),
            "sampler_logps": ro.sampler_logps,
            "truncated": ro.truncated,
            "group": ro.group,
        },
        batch_size=[rows],
    )


FORWARD_KEYS = ("input_ids", "position_ids", "doc_ids", "branch_ids")


def completion_logits(
    forward: Callable[[Any], torch.Tensor], batch: Mapping[str, torch.Tensor], g: int
) -> torch.Tensor:
    """Logits [B, M, V] at the completion positions of a rollout batch of B completion rows:
    ``forward(batch)`` itself for one row per completion, or, for the group layout of
    :func:`_group_rows` (the batch has ``branch_ids``), ``forward`` over the B / G unfolded
    group documents with every completion's ``logits_index`` side by side, folded back to one
    row per completion (reshapes only: no host sync)."""
    if "branch_ids" not in batch:
        return forward(batch)
    b, m = batch["logits_index"].shape
    docs = {k: batch[k].reshape(b // g, -1) for k in FORWARD_KEYS}
    docs["logits_index"] = batch["logits_index"].reshape(b // g, g * m)
    logits = forward(TensorDict(docs, batch_size=[b // g]))
    return logits.reshape(b, m, logits.shape[-1])


def _logps(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    temperature: float,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π at T of the completion tokens from logits at ``logits_index`` [B, M, V] (0 off the
    completion), and the per-position entropy of π when asked."""
    logp = scaled_scores(logits, temperature).log_softmax(dim=-1)
    tokens = batch["completion_ids"]
    mask = batch["completion_mask"].bool()
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(mask, picked, 0.0)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
    return picked, ent
