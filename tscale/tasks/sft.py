"""Supervised fine-tuning: next-token cross-entropy on the trained tokens of each example.

The example stage is the data pipeline's own (template, loss mask, truncation, packing); the
loss is :func:`tscale.losses.lm.make_lm_loss` (or the fused linear cross-entropy with
``loss.fused``); eval is held-out loss and perplexity plus exact match of greedy answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import torch
from tensordict import TensorDict, TensorDictBase

from tscale.core.fields import field
from tscale.data.length import LengthBudget, LengthReport
from tscale.data.loader import batch_iter
from tscale.data.preference import refuse_preference_records
from tscale.data.prepare import prepare_examples
from tscale.losses.lm import make_fused_lm_loss, make_lm_loss
from tscale.models.generate import greedy
from tscale.models.protocol import frozen_kw
from tscale.step.compose import make_eval_step
from tscale.tasks.base import LossFn, TaskContext, TaskDefaults, register_task

__all__ = ["SFTTask", "evaluate_lm", "question_and_answer", "reference_answer", "sft_examples"]


@register_task
@attrs.frozen(kw_only=True)
class SFTTask(TaskDefaults):
    """Supervised fine-tuning (the loss is set in the ``loss`` section)."""

    type: Literal["sft"] = field("sft", "The objective: sft, or module:ClassName of your own.")

    def loss(self, ctx: TaskContext) -> LossFn:
        """Token cross-entropy over ``ctx.apply_fn``'s logits, or fused over the model's hidden
        states and head weight (``loss.fused``)."""
        lc = ctx.config.loss
        if lc.fused:
            return make_fused_lm_loss(
                ctx.model,
                backend=lc.backend,
                chunk_bytes=lc.chunk_bytes,
                label_smoothing=lc.label_smoothing,
                z_loss=lc.z_loss,
            )
        return make_lm_loss(ctx.apply_fn, label_smoothing=lc.label_smoothing, z_loss=lc.z_loss)

    def examples(self, cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
        """The per-record data stage: the template, the loss mask, the length budget."""
        return sft_examples(cfg, encoder, template)

    def has_eval(self, data: Any, config: Any) -> bool:
        """Held-out loss needs eval examples; exact match, records with a reference answer."""
        return bool(data.eval_examples) or (
            config.eval.num_samples > 0
            and any(reference_answer(r) is not None for r in data.eval_records)
        )

    def evaluate(
        self, ctx: TaskContext, params: TensorDictBase, frozen: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Held-out loss/perplexity and exact match (see :func:`evaluate_lm`)."""
        ev = ctx.config.eval
        return evaluate_lm(
            ctx.model,
            params,
            ctx.data,
            num_samples=ev.num_samples,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            device=ctx.device,
            prepare_batch=ctx.prepare_batch,
            frozen=frozen,
        )


def sft_examples(cfg: Any, encoder: Any, template: Any) -> Callable[..., Any]:
    """Supervised fine-tuning's example stage (``tscale.train.data_build``): fit each record to
    the length budget, render it with the run's template (a ``SelectedTemplate``) and tokenize it
    with its loss mask (batched, each text encoded once). Preference records are refused in one
    line naming the ``task.type`` to set."""
    d = cfg.data

    def stage(
        records: Sequence[dict],
        places: Sequence[str],
        *,
        budget: LengthBudget | None,
        max_length: int | None,
    ) -> tuple[list[Any], LengthReport]:
        refuse_preference_records(records, places)  # one line: the task.type to set
        template.check(records, encoder)
        return prepare_examples(
            records,
            template.template,
            encoder,
            add_bos=encoder.adds_bos,  # the BOS/EOS rule of docs/data.md
            add_eos=True,
            system=d.system_prompt,
            loss_mode=d.loss_mode,
            max_length=max_length,
            budget=budget,
            where=list(places),
        )

    return stage


def evaluate_lm(
    model: Any,
    params: TensorDictBase,
    bundle: Any,
    *,
    num_samples: int,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    prepare_batch: Callable[[TensorDict], TensorDict] = lambda batch: batch,
    frozen: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out loss and perplexity over all eval examples, and exact match of greedy answers
    on the first ``num_samples`` eval records that carry a reference answer (overall, and per
    ``task`` when records carry one); returns ``(metrics, samples)``. No eval data: ``({}, [])``.

    Each sample's ``prompt`` is the decoded generation prompt, i.e. the record as the template
    (``bundle.encode_prompt``) gave it to the model. ``model`` is a protocol model (decoded with
    its KV cache) or an ``apply`` function; ``frozen`` the state's frozen trees (the LoRA base)."""
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    if bundle.eval_examples:
        apply_fn = model.apply if hasattr(model, "apply_with_cache") else model
        eval_step = make_eval_step(make_lm_loss(apply_fn))
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.int64)
        for batch in batch_iter(bundle.eval_examples, batch_size, bundle.encoder.pad_id):
            out = eval_step(params, prepare_batch(batch).to(device), **frozen_kw(frozen))
            loss_sum += out["loss_sum"].double().cpu()
            tokens += out["tokens"].cpu()
        metrics["loss"] = float(loss_sum / tokens.clamp_min(1))
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))  # finite in float64
    answerable = [r for r in bundle.eval_records if reference_answer(r) is not None]
    records = answerable[:num_samples] if num_samples > 0 else []
    if records:
        enc = bundle.encoder
        correct = 0
        by_task: dict[str, list[bool]] = {}
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [bundle.encode_prompt(r) for r in chunk]
            outs = greedy(
                model,
                params,
                prompts,
                max_new_tokens=max_new_tokens,
                eos_id=enc.eos_id,
                pad_id=enc.pad_id,
                device=device,
                frozen=frozen,
            )
            for r, prompt, out in zip(chunk, prompts, outs, strict=True):
                answer = enc.decode(out)
                expected = reference_answer(r) or ""
                ok = answer.strip() == expected.strip()
                correct += ok
                if "task" in r:
                    by_task.setdefault(str(r["task"]), []).append(ok)
                shown = prompt[1:] if prompt[:1] == [enc.bos_id] else prompt
                samples.append(
                    {
                        "prompt": enc.tokenizer.decode(shown, skip_special_tokens=False),
                        "expected": expected,
                        "answer": answer,
                        "correct": ok,
                    }
                )
        metrics["exact_match"] = correct / len(records)
        for task, oks in sorted(by_task.items()):
            metrics[f"exact_match/{task}"] = sum(oks) / len(oks)
    return metrics, samples


def question_and_answer(record: dict) -> tuple[str, str]:
    """The prompt text and the expected answer of an eval record: ``prompt``/``completion``, or
    for chat records the last user turn before the final turn and that final turn."""
    if "completion" in record:
        return str(record.get("prompt", "")), str(record["completion"])
    if "output" in record:  # alpaca
        inp = record.get("input") or ""
        instruction = str(record.get("instruction", ""))
        return (f"{instruction}\n\n{inp}" if inp else instruction), str(record["output"])
    turns = record.get("messages") or record.get("conversations") or []
    text = [str(t.get("content", t.get("value", ""))) for t in turns if isinstance(t, dict)]
    return (text[-2] if len(text) > 1 else ""), (text[-1] if text else "")


def reference_answer(record: dict) -> str | None:
    """The reference answer of an eval record (``completion``, alpaca ``output``, or a chat's
    final turn when it is the assistant's), None when it has none to compare with."""
    # a file mixing formats gives every record every column, None where it has none
    if record.get("completion") is not None or record.get("output") is not None:
        return question_and_answer(record)[1]
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return None
    role = turns[-1].get("role", turns[-1].get("from"))
    if role not in ("assistant", "gpt", "model", "bot"):
        return None
    return question_and_answer(record)[1]
