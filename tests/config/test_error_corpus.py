"""A corpus of broken configs, run in-process through the CLI's ``main(argv)``.

Each case is a config file (or a path that is not one) and command-line arguments, run as
``tscale config show`` or ``tscale train``. Every one must end with exit status 2 and exactly one
line on stderr that names the key path or the file:line, with no traceback; a ``train`` case must
stop before it writes a run directory. Every case fails while the config is read or checked, so
the corpus trains nothing and runs in seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from tscale.cli import main


@attrs.frozen
class Case:
    id: str
    command: str  # "show" or "train"
    yaml: str | bytes | None  # the config file's text (None: no file is written)
    args: tuple[str, ...]  # overrides and flags after the config path
    expect: str  # a regex the stderr line must contain; {cfg} and {tmp} are filled in
    config: str = "{cfg}"  # the config argument


def show(id: str, yaml: str | bytes | None, expect: str, *args: str, **kw) -> Case:
    return Case(id, "show", yaml, args, expect, **kw)


def train(id: str, yaml: str | bytes | None, expect: str, *args: str, **kw) -> Case:
    return Case(id, "train", yaml, args, expect, **kw)


CASES = [
    # ---- typos at every depth --------------------------------------------------------------
    show("typo-section", "modle:\n  hidden_size: 64\n", r"{cfg}:1: unknown key 'modle'; did you"),
    show("typo-key", "model:\n  hiden_size: 64\n", r"{cfg}:2: unknown key 'model\.hiden_size'"),
    show(
        "typo-nested",
        "data:\n  synthetic:\n    num_trian: 5\n",
        r"{cfg}:3: unknown key 'data\.synthetic\.num_trian'; did you mean 'data\.synthetic\.num_",
    ),
    show(
        "typo-length",
        "data:\n  length:\n    stratgy: hard\n",
        r"{cfg}:3: unknown key 'data\.length\.stratgy'; did you mean 'data\.length\.strategy'",
    ),
    show(
        "typo-deepspeed",
        "parallel:\n  deepspeed:\n    zero_stag: 2\n",
        r"{cfg}:3: unknown key 'parallel\.deepspeed\.zero_stag'",
    ),
    show(
        "typo-in-list-item",
        "data:\n  sources:\n    - path: a.jsonl\n      wieght: 2\n",
        r"{cfg}:4: unknown key 'data\.sources\[0\]\.wieght'; did you mean 'data\.sources\[0\]\.we",
    ),
    show("key-in-wrong-section", "train:\n  lr: 0.1\n", r"{cfg}:2: .*did you mean 'optimizer\.lr'"),
    show("typo-case", "train:\n  Max_Steps: 5\n", r"{cfg}:2: unknown key 'train\.Max_Steps'"),
    show(
        "typo-override",
        "",
        r"override 'optimizer\.lr_rate=0\.1': unknown key",
        "optimizer.lr_rate=0.1",
    ),
    show("typo-override-section", "", r"unknown key 'trian'", "trian.max_steps=5"),
    show(
        "typo-override-nested",
        "",
        r"unknown key 'data\.packing\.enable'",
        "data.packing.enable=true",
    ),
    # ---- wrong types ---------------------------------------------------------------------
    show(
        "type-int-word",
        "model:\n  hidden_size: big\n",
        r"{cfg}:2: model\.hidden_size: expected an integer, got 'big'",
    ),
    show(
        "type-int-fraction",
        "model:\n  num_layers: 2.5\n",
        r"{cfg}:2: model\.num_layers: expected an integer",
    ),
    show(
        "type-bool-string",
        "train:\n  progress: 'yes'\n",
        r"{cfg}:2: train\.progress: expected true or false",
    ),
    show("type-string-number", "run:\n  name: 123\n", r"{cfg}:2: run\.name: expected a string"),
    show(
        "type-list-string",
        "data:\n  train_files: a.jsonl\n",
        r"{cfg}:2: data\.train_files: expected a list",
    ),
    show(
        "type-tuple-length",
        "optimizer:\n  betas: [0.9]\n",
        r"{cfg}:2: optimizer\.betas: expected a list of 2",
    ),
    show("type-section-scalar", "model: 5\n", r"{cfg}:1: model: expected a mapping, got 5"),
    show(
        "type-tasks-string",
        "data:\n  synthetic:\n    tasks: sort\n",
        r"{cfg}:3: data\.synthetic\.tasks: expected a list",
    ),
    show(
        "type-float-word", "optimizer:\n  lr: fast\n", r"{cfg}:2: optimizer\.lr: expected a number"
    ),
    show(
        "type-mapping-value",
        "data:\n  length:\n    per_column_limits: {prompt: many}\n",
        r"{cfg}:3: data\.length\.per_column_limits\.prompt: expected an integer",
    ),
    show(
        "type-free-mapping",
        "parallel:\n  deepspeed:\n    config: 5\n",
        r"{cfg}:3: parallel\.deepspeed\.config: expected a mapping",
    ),
    show("type-top-level-list", "- model\n- data\n", r"{cfg}:1: the top level must be a mapping"),
    show(
        "type-epochs-word", "train:\n  epochs: many\n", r"{cfg}:2: train\.epochs: expected a number"
    ),
    show(
        "type-null-number",
        "loss:\n  z_loss: null\n",
        r"{cfg}:2: loss\.z_loss: expected a number, got null",
    ),
    # ---- out-of-range values (every numeric key: tests/config/test_domains.py) -------------
    show(
        "range-zero-heads",
        "model:\n  num_heads: 0\n",
        r"{cfg}:2: model\.num_heads must be >= 1, got 0",
    ),
    show(
        "range-zero-kv-heads",
        "model:\n  num_kv_heads: 0\n",
        r"{cfg}:2: model\.num_kv_heads must be >= 1",
    ),
    show(
        "range-keep-last",
        "train:\n  keep_last: -1\n",
        r"{cfg}:2: train\.keep_last must be >= 1 or 0 \(keep all\), got -1",
    ),
    show(
        "range-save-every",
        "train:\n  save_every: -5\n",
        r"{cfg}:2: train\.save_every must be >= 1 or 0",
    ),
    show(
        "range-label-smoothing",
        "loss:\n  label_smoothing: 1.5\n",
        r"{cfg}:2: loss\.label_smoothing must be in \[0, 1\]",
    ),
    show(
        "range-dropout",
        "lora:\n  dropout: 1.0\n",
        r"{cfg}:2: lora\.dropout must be in \[0, 1\), got 1\.0",
    ),
    show(
        "range-error-rate",
        "data:\n  max_error_rate: 2\n",
        r"{cfg}:2: data\.max_error_rate must be in \[0, 1\]",
    ),
    show(
        "range-fill-zero",
        "",
        r"override 'parallel\.dp_replicate=0': parallel\.dp_replicate must be >= 1 or -1 \(fill\)",
        "parallel.dp_replicate=0",
    ),
    show("range-seed", "run:\n  seed: -1\n", r"{cfg}:2: run\.seed must be in \[0, 4294967295\]"),
    show("range-epochs", "train:\n  epochs: 0\n", r"{cfg}:2: train\.epochs must be > 0, got 0"),
    show(
        "range-vocab",
        "data:\n  tokenizer:\n    vocab_size: 100\n",
        r"{cfg}:3: data\.tokenizer\.vocab_size must be >= 259",
    ),
    show(
        "range-ratio",
        "data:\n  length:\n    ratios: {prompt: -1}\n",
        r"{cfg}:3: data\.length\.ratios\.prompt must be > 0",
    ),
    show(
        "range-nan",
        "model:\n  rope_theta: .nan\n",
        r"{cfg}:2: model\.rope_theta must be a finite number > 0, got nan",
    ),
    show(
        "range-list-record",
        "data:\n  sources:\n    - {path: a.jsonl, weight: 0}\n",
        r"{cfg}:3: data\.sources\[0\]\.weight must be > 0",
    ),
    show(
        "range-int64",
        "train:\n  max_steps: 1e30\n",
        r"{cfg}:2: train\.max_steps: integer out of the 64-bit range",
    ),
    show(
        "range-threads",
        "run:\n  threads: 3000000000\n",
        r"{cfg}:2: run\.threads must be in \[1, 2147483647\], got 3000000000",
    ),
    # ---- keys that disagree (tscale/config/rules.py) ---------------------------------------
    train(
        "rule-items",
        "data:\n  synthetic:\n    min_items: 6\n    max_items: 3\n",
        r"data\.synthetic\.max_items \(3\) must be >= data\.synthetic\.min_items \(6\)",
    ),
    train(
        "rule-add-items",
        "data:\n  synthetic:\n    tasks: [add]\n    min_items: 1\n",
        r"data\.synthetic\.min_items \(1\) is too small for the 'add' task",
    ),
    train(
        "rule-no-tasks", "data:\n  synthetic:\n    tasks: []\n", r"data\.synthetic\.tasks is empty"
    ),
    train(
        "rule-kv-heads",
        "model:\n  num_kv_heads: 3\n",
        r"model\.num_kv_heads \(3\) must divide model\.num_heads \(4\)",
    ),
    train(
        "rule-heads",
        "model:\n  hidden_size: 100\n  num_heads: 3\n",
        r"model\.hidden_size \(100\) must be divisible by model\.num_heads",
    ),
    train("rule-odd-head-dim", "model:\n  head_dim: 7\n", r"model\.head_dim \(7\) must be even"),
    train(
        "rule-max-length",
        "data:\n  max_length: 4096\n",
        r"data\.max_length \(4096\) exceeds model\.max_position_embeddings",
    ),
    train(
        "rule-microbatches",
        "data:\n  batch_size: 6\ntrain:\n  microbatches: 4\n",
        r"data\.batch_size \(6\) must be a multiple of train\.microbatches \(4\)",
    ),
    train(
        "rule-warmup",
        "scheduler:\n  warmup_steps: 500\ntrain:\n  max_steps: 10\n",
        r"scheduler\.warmup_steps \(500\) exceeds train\.max_steps \(10\)",
    ),
    train(
        "rule-streaming-epochs",
        "data:\n  streaming: true\ntrain:\n  epochs: 1\n",
        r"train\.epochs: data\.streaming",
    ),
    # ---- unknown choices -------------------------------------------------------------------
    show(
        "choice-optimizer",
        "optimizer:\n  type: adamx\n",
        r"{cfg}:2: optimizer\.type: 'adamx' is not one of: .*did you mean 'adamw'",
    ),
    show(
        "choice-scheduler",
        "scheduler:\n  type: step\n",
        r"{cfg}:2: scheduler\.type: 'step' is not one of",
    ),
    show(
        "choice-dtype",
        "model:\n  dtype: fp16\n",
        r"{cfg}:2: model\.dtype: 'fp16' is not one of: float32, bfloat16",
    ),
    show(
        "choice-task",
        "data:\n  synthetic:\n    tasks: [sort, sortt]\n",
        r"{cfg}:3: data\.synthetic\.tasks\[1\]: 'sortt' is not one of",
    ),
    show(
        "choice-block-size",
        "lora:\n  qlora_block_size: 48\n",
        r"{cfg}:2: lora\.qlora_block_size: 48 is not one of: 32, 64",
    ),
    show(
        "choice-zero-stage",
        "parallel:\n  deepspeed:\n    zero_stage: 4\n",
        r"{cfg}:3: parallel\.deepspeed\.zero_stage: 4 is not one of",
    ),
    show(
        "choice-excess",
        "data:\n  length:\n    excess: ignore\n",
        r"{cfg}:3: data\.length\.excess: 'ignore' is not one of",
    ),
    show(
        "choice-format", "data:\n  format: jsonl\n", r"{cfg}:2: data\.format: 'jsonl' is not one of"
    ),
    show(
        "choice-backend-override",
        "",
        r"override 'parallel\.backend=mpi': parallel\.backend: 'mpi' is not one of",
        "parallel.backend=mpi",
    ),
    train(
        "choice-template",
        "data:\n  template: nosuchtemplate\n",
        r"data\.template: unknown template 'nosuchtemplate'; use auto",
    ),
    train(
        "value-template-date",
        "data:\n  template_date: yesterday\n",
        r"data\.template_date: 'yesterday' is not a date; write it as YYYY-MM-DD",
    ),
    train(
        "value-impossible-date",
        "data:\n  template_date: 2026-13-45\n",
        r"data\.template_date: '2026-13-45' is not a date",
    ),
    train(
        "value-impossible-date-override",
        "",
        r"data\.template_date: '2026-02-30' is not a date",
        "data.template_date=2026-02-30",
    ),
    # ---- bad paths -------------------------------------------------------------------------
    train("path-model", "model:\n  path: {tmp}/no-model\n", r"model\.path: .*no-model not found"),
    train(
        "path-tokenizer",
        "data:\n  tokenizer:\n    path: {tmp}/no-tok\n",
        r"data\.tokenizer\.path: .*no-tok not found",
    ),
    train(
        "path-train-file",
        "data:\n  train_files: [{tmp}/no.jsonl]\n",
        r"data\.train_files\[0\]: .*no\.jsonl not found",
    ),
    train(
        "path-eval-file",
        "data:\n  eval_files: [{tmp}/no.jsonl]\n",
        r"data\.eval_files\[0\]: .*no\.jsonl not found",
    ),
    train(
        "path-source",
        "data:\n  sources:\n    - path: {tmp}/no.jsonl\n",
        r"data\.sources\[0\]\.path: .*no\.jsonl not found",
    ),
    train(
        "path-template-file",
        "data:\n  template: {tmp}/no.jinja\n",
        r"data\.template: template file .*no\.jinja not found",
    ),
    train(
        "path-output-is-file",
        "",
        r"run\.output_dir: .*a-file is a file, not a directory",
        "run.output_dir={tmp}/a-file",
    ),
    train(
        "path-output-under-file",
        "",
        r"run\.output_dir: .*a-file/run cannot be created: .*a-file is a file",
        "run.output_dir={tmp}/a-file/run",
    ),
    train(
        "path-cache-under-file",
        "",
        r"data\.cache_dir: .*a-file/cache cannot be created",
        "data.cache_dir={tmp}/a-file/cache",
    ),
    train(
        "path-config-missing",
        None,
        r"{tmp}/missing\.yaml: config file not found",
        config="{tmp}/missing.yaml",
    ),
    train(
        "path-config-directory",
        None,
        r"{tmp}: is a directory, expected a YAML file",
        config="{tmp}",
    ),
    show(
        "path-config-missing-show",
        None,
        r"{tmp}/missing\.yaml: config file not found",
        config="{tmp}/missing.yaml",
    ),
    train("resume-nothing", "", r"--resume: no checkpoint under .*checkpoints", "--resume"),
    train(
        "resume-not-a-checkpoint",
        "",
        r"--resume .*a-file: not a checkpoint directory",
        "--resume={tmp}/a-file",
    ),
    # ---- YAML syntax -----------------------------------------------------------------------
    show("yaml-indent", "model:\n  hidden_size: 64\n   num_layers: 2\n", r"{cfg}:3: invalid YAML"),
    show("yaml-flow", "model: {hidden_size: 64\n", r"{cfg}:2: invalid YAML"),
    show("yaml-tab", "model:\n\thidden_size: 64\n", r"{cfg}:2: invalid YAML"),
    show(
        "yaml-duplicate",
        "model:\n  hidden_size: 64\n  hidden_size: 32\n",
        r"{cfg}:3: duplicate key 'model\.hidden_size' \(first on line 2\)",
    ),
    show("yaml-not-utf8", b"model:\n  hidden_size: \xff\xfe\n", r"{cfg}: not UTF-8 text"),
    show("yaml-open-list", "data:\n  train_files: [a.jsonl\n", r"{cfg}:\d+: invalid YAML"),
    train("yaml-train", "train: [\n", r"{cfg}:\d+: invalid YAML"),
    # ---- bad overrides ---------------------------------------------------------------------
    show(
        "override-no-equals",
        "",
        r"override 'model\.hidden_size': expected key\.path=value",
        "model.hidden_size",
    ),
    show("override-no-key", "", r"override '=5': expected key\.path=value", "=5"),
    show(
        "override-empty-name",
        "",
        r"override 'model\.\.hidden_size=5': empty name in key path",
        "model..hidden_size=5",
    ),
    show(
        "override-bad-yaml",
        "",
        r"override 'model\.hidden_size=\[1,': invalid YAML value",
        "model.hidden_size=[1,",
    ),
    show(
        "override-into-number",
        "",
        r"override 'model\.hidden_size\.x=5': model\.hidden_size: is an integer, not a section",
        "model.hidden_size.x=5",
    ),
    show(
        "override-section-scalar", "", r"override 'model=5': model: expected a mapping", "model=5"
    ),
    show(
        "override-choice-in-list",
        "",
        r"data\.synthetic\.tasks\[1\]: 'multiply' is not one of",
        "data.synthetic.tasks=[sort, multiply]",
    ),
    show(
        "override-tuple-item",
        "",
        r"optimizer\.betas\[1\]: expected a number, got 'x'",
        "optimizer.betas=[0.9, x]",
    ),
    show(
        "override-over-file",
        "train:\n  max_steps: 5\n",
        r"override 'train\.max_steps=0': train\.max_steps must be >= 1",
        "train.max_steps=0",
    ),
    train(
        "override-train",
        "",
        r"override 'model\.num_layers=-2': model\.num_layers must be >= 1",
        "model.num_layers=-2",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_broken_config_is_one_line_and_exit_2(case: Case, tmp_path: Path, capsys) -> None:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{cfg}", str(tmp_path / "cfg.yaml"))

    (tmp_path / "a-file").write_text("not a directory\n")
    if isinstance(case.yaml, bytes):
        (tmp_path / "cfg.yaml").write_bytes(case.yaml)
    elif case.yaml is not None:
        (tmp_path / "cfg.yaml").write_text(fill(case.yaml))
    run = tmp_path / "run"
    head = ["train"] if case.command == "train" else ["config", "show"]
    # the run directory first: an override of the case comes later and wins
    base = [f"run.output_dir={run}"] if case.command == "train" else []
    argv = [*head, fill(case.config), *base, *(fill(a) for a in case.args)]

    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("tscale: error: "), err
    pattern = re.escape(fill("{cfg}")) if "{cfg}" in case.expect else None
    expect = case.expect.replace("{cfg}", pattern or "").replace("{tmp}", re.escape(str(tmp_path)))
    assert re.search(expect, err), f"{expect!r} not in {err!r}"
    if case.command == "show":
        assert out == ""
    else:
        assert not run.exists(), "a broken config must not leave a run directory"
    assert not list(tmp_path.rglob(".tmp-*")), "no temporary files left behind"


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
