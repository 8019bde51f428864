"""Does each preference method learn the preference without destroying generation?

From the quickstart stopped early (``configs/quickstart.yaml`` with ``train.max_steps=300
scheduler.warmup_steps=50``, exported; ~32% held-out exact match), each method trains on pairs of
the quickstart's tasks (the chosen answer correct, the rejected one with one item corrupted; KTO
on the same answers as labelled completions) and is evaluated on the held-out pairs every
``eval_every`` steps: pairwise accuracy of the method's own implicit reward (DPO/IPO/KTO:
β·log-ratio; SimPO/CPO: β·mean log-prob; ORPO: λ·mean log-prob), its mean margin, and greedy
exact match of the chosen answers (the generation check). Settings per method are in
:data:`METHODS`; docs/preference.md reports the figures.

Writes ``benchmarks/results/preference_methods.json``; ``--smoke`` runs the same path at tiny
sizes (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _smoke import SMOKE_TRAIN_OVERRIDES, add_smoke_flag
from preference import base_model, make_pairs, timed_process

from tscale.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_BAR = 0.95

COMMON: dict[str, Any] = {
    "optimizer.type": "adamw",
    "optimizer.weight_decay": 0.0,
    "optimizer.max_grad_norm": 1.0,
    "scheduler.type": "linear",
    "scheduler.warmup_steps": 10,
    "data.batch_size": 16,
    "data.max_length": 64,
}

METHODS: dict[str, dict[str, Any]] = {
    # TRL's DPOTrainer settings of the measurement (sigmoid alone, lr 5e-5)
    "dpo_trl_settings": {"task.type": "dpo", "task.beta": 0.1, "optimizer.lr": 5e-5},
    # DPO with the chosen answer's NLL (MPO-style list) and a larger learning rate
    "dpo_sft": {
        "task.type": "dpo",
        "task.beta": 0.1,
        "task.loss_type": ["sigmoid", "sft"],
        "task.loss_weights": [1.0, 1.0],
        "optimizer.lr": 5e-4,
    },
    # IPO's target gap is 1/(2β) nats per token: β 0.1 asks for 5, which wrecks generation
    "ipo": {"task.type": "dpo", "task.beta": 0.5, "task.loss_type": ["ipo"], "optimizer.lr": 1e-4},
    "simpo": {
        "task.type": "simpo",
        "task.beta": 2.0,
        "task.gamma": 0.5,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
    },
    "orpo": {"task.type": "orpo", "task.beta": 0.5, "optimizer.lr": 5e-4},
    "kto": {"task.type": "kto", "task.beta": 0.1, "optimizer.lr": 5e-5, "kto": True},
    # the sweep after the first table: longer runs, and KTO with the desirable completions' NLL
    "dpo_sft_3ep": {
        "task.type": "dpo",
        "task.beta": 0.1,
        "task.loss_type": ["sigmoid", "sft"],
        "task.loss_weights": [1.0, 1.0],
        "optimizer.lr": 5e-4,
        "train.epochs": 3.0,
    },
    "orpo_2ep": {"task.type": "orpo", "task.beta": 0.5, "optimizer.lr": 5e-4, "train.epochs": 2.0},
    # KTO on both halves of every pair (TRL's unpair_preference_dataset), with the NLL term
    "kto_both_sft": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 1e-4,
        "kto": "both",
    },
    "kto_both_sft_3ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 1e-4,
        "train.epochs": 3.0,
        "kto": "both",
    },
    # the KTO sweep: DPO+sft's learning rate, and a larger beta with the desirable NLL
    "kto_both_sft_lr5e-4_2ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
        "train.epochs": 2.0,
        "kto": "both",
    },
    "kto_both_sft_b0.5_2ep": {
        "task.type": "kto",
        "task.beta": 0.5,
        "task.sft_weight": 1.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 2.0,
        "kto": "both",
    },
    "kto_both_sft_uw2_2ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "task.undesirable_weight": 2.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 2.0,
        "kto": "both",
    },
    # three corrupted answers of each problem (undesirable) to its correct one, weighted 3:1
    "kto_neg3_sft": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "task.desirable_weight": 3.0,
        "optimizer.lr": 1e-4,
        "kto": "both+3",
    },
    # KTO's terms 4x against the NLL (its per-sequence gradient is ~β/4, the NLL's ~1/|y| per token)
    "kto_both_sft_w4": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "task.desirable_weight": 4.0,
        "task.undesirable_weight": 4.0,
        "optimizer.lr": 1e-4,
        "kto": "both",
    },
    "kto_both_nosft": {
        "task.type": "kto",
        "task.beta": 0.1,
        "optimizer.lr": 1e-4,
        "kto": "both",
    },
    "kto_both_sft4": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 4.0,
        "optimizer.lr": 1e-4,
        "kto": "both",
    },
    "kto_both_sft2_lr2e-4": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 2.0,
        "optimizer.lr": 2e-4,
        "kto": "both",
    },
    # each pair's two rows in one batch (the file's order): the shared tokens' gradients cancel
    "kto_both_sft_paired_order": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 1e-4,
        "data.shuffle": False,
        "data.group_by_length": False,
        "kto": "both",
    },
    "kto_both_nosft_paired_order": {
        "task.type": "kto",
        "task.beta": 0.1,
        "optimizer.lr": 1e-4,
        "data.shuffle": False,
        "data.group_by_length": False,
        "kto": "both",
    },
    # KTO on the pairs themselves: each pair one document (its prompt once, the chosen answer a
    # desirable completion, the rejected one an undesirable completion), so both are in one batch
    "kto_pairs_sft": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 1e-4,
    },
    "kto_pairs_sft_lr2e-4_2ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 2.0,
    },
    "kto_pairs_sft_lr2e-4_4ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 4.0,
    },
    "kto_pairs_sft_w2_lr2e-4_2ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "task.desirable_weight": 2.0,
        "task.undesirable_weight": 2.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 2.0,
    },
    "kto_pairs_sft_lr5e-4_3ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
        "train.epochs": 3.0,
    },
    "kto_pairs_sft_b0.3_lr2e-4_4ep": {
        "task.type": "kto",
        "task.beta": 0.3,
        "task.sft_weight": 1.0,
        "optimizer.lr": 2e-4,
        "train.epochs": 4.0,
    },
    # the control of kto_pairs_sft_lr5e-4_3ep: the same settings on the unpaired rows (shuffled)
    "kto_both_sft_lr5e-4_3ep": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
        "train.epochs": 3.0,
        "kto": "both",
    },
    "kto_pairs_sft_lr5e-4_3ep_seed1": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
        "train.epochs": 3.0,
        "run.seed": 1,
    },
    "kto_sft": {
        "task.type": "kto",
        "task.beta": 0.1,
        "task.sft_weight": 1.0,
        "optimizer.lr": 5e-4,
        "train.epochs": 2.0,
        "kto": True,
    },
}


def write_kto(work: Path, pairs_train: Path, *, both: bool = False, negatives: int = 1) -> Path:
    """The training pairs as KTO's labelled completions: one per problem (the correct or the
    corrupted answer, half desirable per task), or ``both`` — each pair as two rows, its chosen
    answer desirable and its rejected one undesirable (TRL's ``unpair_preference_dataset``) —
    and with ``negatives`` > 1 that many distinct corrupted answers of each problem as
    undesirable rows (:func:`tscale.data.synthetic.corrupt_answer` under further seeds; the
    imbalanced data KTO is meant to take, weighted by ``task.desirable_weight``)."""
    rows = [json.loads(x) for x in pairs_train.read_text().splitlines()]
    kto = []
    for i, r in enumerate(rows):
        labels = (True, False) if both else (i % 2 == 0,)
        kto += [
            {
                "prompt": r["prompt"],
                "completion": r["chosen"] if good else r["rejected"],
                "label": good,
                "task": r["task"],
                "answer": r["chosen"],
            }
            for good in labels
        ]
        wrong = {r["rejected"]}
        for k in range(1, 4 * negatives):  # a few draws more: two draws can give one answer
            if len(wrong) >= negatives:
                break
            other = synthetic.corrupt_answer(r["task"], r["chosen"], seed=k, prompt=r["prompt"])
            if other not in wrong:
                wrong.add(other)
                kto.append({**kto[-1], "completion": other, "label": False})
    name = "kto-both-train.jsonl" if both else "kto-train.jsonl"
    if negatives > 1:
        name = name.replace(".jsonl", f"-neg{negatives}.jsonl")
    return synthetic.write_jsonl(kto, work / name)


def method_config(
    name: str,
    settings: dict[str, Any],
    *,
    model: Path,
    train: Path,
    held_out: Path,
    work: Path,
    epochs: float,
    eval_every: int,
    threads: int,
    max_new_tokens: int,
    extra: list[str],
) -> Path:
    """The YAML of one method's run (dotted keys → nested), written beside its run folder."""
    cfg: dict[str, Any] = {}
    flat = {
        **COMMON,
        "run.name": name,
        "run.output_dir": str(work / name),
        "run.seed": 0,
        "run.threads": threads,
        "model.path": str(model),
        "data.train_files": [str(train)],
        "data.eval_files": [str(held_out)],
        "train.epochs": epochs,
        "train.log_every": 5,
        "train.eval_every": eval_every,
        "train.save_every": 0,
        "train.progress": False,
        "eval.num_samples": 200,
        "eval.max_new_tokens": max_new_tokens,
        **{k: v for k, v in settings.items() if k != "kto"},
    }
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for override in extra:  # --smoke: the tiny-run overrides, as the command line gives them
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_run(run: Path) -> dict[str, Any]:
    """The eval rows (held-out pairwise accuracy, margin, exact match) and the train rows."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    steps = [r for r in rows if "loss" in r and "eval/loss" not in r]
    pick = (
        "step",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/exact_match",
        "eval/exact_match/reverse",
        "eval/exact_match/sort",
        "eval/logps/chosen",
        "eval/logps/rejected",
    )
    return {
        "evals": [{k: r.get(k) for k in pick} for r in evals],
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "steps": len(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/preference_methods.json")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench-preference")
    ap.add_argument("--methods", nargs="*", default=None, help="default: all (--smoke: dpo_sft)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--pairs", type=int, default=10000, help="training pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--collect",
        action="store_true",
        help="record the named methods' finished runs in --work without training again (wall "
        "time from the files' times)",
    )
    add_smoke_flag(ap)
    args = ap.parse_args()
    extra = list(SMOKE_TRAIN_OVERRIDES) if args.smoke else []
    work = (args.out.resolve().parent / "preference-methods-work") if args.smoke else args.work
    work.mkdir(parents=True, exist_ok=True)
    steps, warmup = (3, 1) if args.smoke else (300, 50)
    num_pairs, num_eval = (32, 8) if args.smoke else (args.pairs, 200)
    model, base = base_model(work, steps=steps, warmup=warmup, threads=args.threads, extra=extra)
    train, held_out, data_info = make_pairs(
        work, num_pairs=num_pairs, num_eval=num_eval, extra=extra
    )
    kto_train = {
        True: write_kto(work, train),
        "both": write_kto(work, train, both=True),
        "both+3": write_kto(work, train, both=True, negatives=3),
    }
    epochs = 1.0 if args.smoke else args.epochs
    eval_every = 2 if args.smoke else 50
    new_tokens = 4 if args.smoke else 20
    names = args.methods or (["dpo_sft"] if args.smoke else list(METHODS))
    results: dict[str, Any] = {}
    for name in names:
        settings = METHODS[name]
        cfg = method_config(
            name,
            settings,
            model=model,
            train=kto_train[settings["kto"]] if settings.get("kto") else train,
            held_out=held_out,
            work=work,
            epochs=epochs,
            eval_every=eval_every,
            threads=args.threads,
            max_new_tokens=new_tokens,
            extra=extra,
        )
        rss: float | None
        if args.collect:  # a finished run: from its start (config.yaml) to its last metrics row
            run_dir = work / name
            seconds = (run_dir / "metrics.jsonl").stat().st_mtime
            seconds -= (run_dir / "config.yaml").stat().st_mtime
            rss = None
        else:
            exe = Path(sys.executable).with_name("tscale")
            seconds, rss = timed_process(
                [str(exe), "train", str(cfg), "--overwrite"],
                dict(os.environ),
                work / f"{name}.log",
            )
        run = read_run(work / name)
        last = run["evals"][-1] if run["evals"] else {}
        accuracy = last.get("eval/rewards/accuracies")
        margins = [e["eval/rewards/margins"] for e in run["evals"]]
        results[name] = {
            "settings": settings,
            "pairs": num_pairs,
            "epochs": settings.get("train.epochs", epochs),
            "wall_s": round(seconds, 1),
            "peak_rss_mib": None if rss is None else round(rss),
            **({"collected": "wall time from the run's file times"} if args.collect else {}),
            **run,
            "held_out_pairwise_accuracy": accuracy,
            "margin_grows": bool(len(margins) > 1 and margins[-1] > margins[0]),
            "exact_match": last.get("eval/exact_match"),
            "exact_match_change": (
                None
                if last.get("eval/exact_match") is None
                else last["eval/exact_match"] - base["tscale_eval"]["exact_match"]
            ),
            # float32 metrics: 190/200 reads 0.9499999881; compare at 6 decimals
            "meets_accuracy_bar": accuracy is not None and round(accuracy, 6) >= ACCURACY_BAR,
        }
        print(
            f"{name}: {seconds:.0f} s, held-out accuracy {accuracy}, exact match "
            f"{last.get('eval/exact_match')} (base {base['tscale_eval']['exact_match']})",
            flush=True,
        )
        write_results(args, results, base=base, data_info=data_info, epochs=epochs)


def write_results(
    args: argparse.Namespace,
    results: dict[str, Any],
    *,
    base: dict[str, Any],
    data_info: dict[str, Any],
    epochs: float,
) -> None:
    """The JSON, rewritten after each method (a stopped sweep keeps what it finished); a rerun
    of some methods keeps the others and the hand-written ``note``."""
    kept: dict[str, Any] = {}
    if args.methods and args.out.is_file():
        before = json.loads(args.out.read_text())
        results = {**before.get("methods", {}), **results}
        kept = {k: before[k] for k in ("note",) if k in before}
    out = {
        "benchmark": "preference_methods",
        "when": time.strftime("%Y-%m-%d"),
        "base": base,
        "data": data_info,
        "epochs": epochs,
        "accuracy_bar": ACCURACY_BAR,
        "common": COMMON,
        "methods": results,
        **({"smoke": True} if args.smoke else {}),
        **kept,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
