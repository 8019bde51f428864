"""One TRL ``GRPOTrainer`` run for ``benchmarks/rl.py``: a whole process, as a user's script is.

``python benchmarks/_trl_grpo_worker.py '<payload json>'``; the payload names the prompt file
(JSONL: ``prompt``, ``completion`` (the answer), ``task``), the HF folder, the thread count,
GRPOConfig's settings and where to write the result; optionally a wall-clock budget
(``budget_s``: stop at the first step end that many seconds after the process started) and a
folder to save the trained policy in (``save_to``). Besides TRL's own log (one row per step) it
records, per optimizer step, the wall time between step ends (everything the step did: generation,
scoring, forward/backward, optimizer) and the time inside TRL's ``_generate_single_turn`` (the
``transformers`` ``generate`` call and its EOS masking: TRL's generation, as tscale's
``time/generation_s`` covers ``sample_completions``).
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402


def exact_match(
    prompts: list, completions: list, completion_ids: list, answer: list, **kwargs: object
) -> list[float | None]:
    """TRL's reward signature scoring what tscale's built-in ``exact_match`` scores: 1.0 where
    the completion equals the record's answer, both stripped at the ends (None: no answer).

    The answer is the file's ``completion`` column, renamed ``answer``: TRL hands every dataset
    column but ``prompt``, ``completion`` and ``completion_ids`` to the reward functions."""
    return [
        None if a is None else float(str(c).strip() == str(a).strip())
        for c, a in zip(completions, answer, strict=True)
    ]


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with the seconds of every generation call recorded."""

    generation_seconds: list[float]

    def _generate_single_turn(self, *args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        out = super()._generate_single_turn(*args, **kwargs)
        self.generation_seconds.append(time.perf_counter() - t0)
        return out


class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step, from the end of the previous one (the first from
    the start of training)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.seconds: list[float] = []

    def on_train_begin(self, args: object, state: object, control: object, **kw: object) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


class WallClockBudget(TrainerCallback):
    """Stop training at the first step end at least ``seconds`` after the process started
    (``T0``, before the imports), as a run given a fixed wall-clock budget stops."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
        if time.perf_counter() - T0 >= self.seconds:
            control.should_training_stop = True  # type: ignore[attr-defined]


def main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    ds = load_dataset("json", data_files=args["data"], split="train")
    ds = ds.select_columns(["prompt", "completion"]).rename_column("completion", "answer")
    tok = AutoTokenizer.from_pretrained(args["model"])
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    clock = StepClock()
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=GRPOConfig(output_dir=args["out"], **args["settings"]),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[clock]
        + ([WallClockBudget(args["budget_s"])] if args.get("budget_s") is not None else []),
    )
    trainer.generation_seconds = []
    t_train = time.perf_counter()
    out = trainer.train()
    t_end = time.perf_counter()
    if args.get("save_to"):  # the trained policy and tokenizer, for a held-out evaluation
        trainer.save_model(args["save_to"])
    log = [h for h in trainer.state.log_history if "reward" in h]
    result = {
        "steps": int(out.global_step),
        "in_process_s": t_end - T0,
        "train_s": t_end - t_train,
        "step_s": clock.seconds,
        "generation_s": trainer.generation_seconds,
        "log": log,
    }
    with open(args["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
