"""TensorBoard, W&B (offline) and MLflow loggers: a short run read back with each tool's own
reader — every number of metrics.jsonl at the same step with the same value (float32) — then a
resume from an earlier checkpoint with another learning rate (TensorBoard purges, W&B and
MLflow start a new run tagged resumed_from), a logger that fails mid-run, a missing package."""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tscale import cli
from tscale.config import load_config
from tscale.testing.runs import TINY_MODEL
from tscale.train import Callback, train

pytest.importorskip("tensorboard", reason="the tensorboard extra (in dev) is not installed")
pytest.importorskip("wandb", reason="the wandb extra (in dev) is not installed")
pytest.importorskip("mlflow", reason="the mlflow extra (in dev) is not installed")

TINY = [
    *TINY_MODEL,
    "data.synthetic.num_train=200",
    "data.synthetic.num_eval=16",
    "data.synthetic.max_items=5",
    "data.batch_size=16",
    "data.max_length=32",
    "optimizer.lr=3e-3",
    "scheduler.warmup_steps=2",
    "train.max_steps=8",
    "train.log_every=2",
    "train.eval_every=4",
    "train.save_every=4",
    "train.keep_last=0",
    "train.progress=false",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=4",
    "eval.num_show=0",
    "run.threads=1",
    "log.plot=false",
]
ALL = "log.to=[jsonl,tensorboard,wandb,mlflow]"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_TAGS", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage reports: none


def _run(run: Path, *extra: str, resume: bool | Path = False) -> str:
    out = io.StringIO()
    cfg = load_config(None, [*TINY, f"run.output_dir={run}", *extra])
    train(cfg, resume=resume, console=Console(file=out, width=400))
    return out.getvalue()


def _jsonl_points(run: Path) -> dict[tuple[str, int], float]:
    """Every number of metrics.jsonl as ``{(key, step): value}``."""
    points: dict[tuple[str, int], float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float):
                assert (k, row["step"]) not in points
                points[(k, row["step"])] = float(v)
    return points


def _same(got: dict[tuple[str, int], float], want: dict[tuple[str, int], float]) -> None:
    """Every point of ``want`` in ``got`` at float32; ``got`` may hold more keys (tokens_per_s)
    but no other step of a key that ``want`` has."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"missing {missing[:5]}"
    for point, value in want.items():
        assert np.float32(got[point]) == np.float32(value), (point, got[point], value)
    keys = {k for k, _ in want}
    extra = sorted(p for p in got if p[0] in keys and p not in want)
    assert not extra, f"steps that metrics.jsonl does not have: {extra[:5]}"


# ---- readers: each tool's own ----------------------------------------------------------------


def _tensorboard(run: Path) -> tuple[dict[tuple[str, int], float], list[tuple[str, int]], dict]:
    """``(scalars, every (tag, step) event seen, text summaries)`` via EventAccumulator (which
    applies TensorBoard's purge on restart)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    points, seen = {}, []
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            points[(tag, ev.step)] = ev.value
            seen.append((tag, ev.step))
    texts = {}
    for tag in acc.Tags()["tensors"]:
        texts[tag] = [(ev.step, ev.tensor_proto.string_val[0].decode()) for ev in acc.Tensors(tag)]
    return points, seen, texts


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then
    LevelDB-log blocks of 32 KiB whose chunks (checksum u32, length u16, type u8; full, first,
    middle, last) carry serialized ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, parts = [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):  # full or last chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _wandb_runs(run: Path) -> list[dict]:
    """Each offline W&B run under ``run/wandb``, oldest first: id, tags, config, history."""
    out = []
    for d in sorted((run / "wandb").glob("offline-run-*")):
        (file,) = d.glob("run-*.wandb")
        got: dict = {"history": {}, "config": {}, "other": set()}
        for r in _wandb_records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                got["id"], got["tags"] = r.run.run_id, list(r.run.tags)
                got["project"], got["name"] = r.run.project, r.run.display_name
                got["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                step = json.loads(items.pop("_step"))
                for k, v in items.items():
                    value = json.loads(v)
                    if not k.startswith("_") and isinstance(value, int | float):
                        got["history"][(k, step)] = float(value)
                    elif not k.startswith("_"):  # a table's reference, and such
                        got["other"].add((k, step))
        out.append(got)
    return out


def _mlflow_runs(run: Path) -> list[dict]:
    """Each MLflow run of the run's store (``<run>/mlflow.db``), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "tscale"]
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    out = []
    for r in runs:
        points = {}
        for key in r.data.metrics:
            for m in client.get_metric_history(r.info.run_id, key):
                assert (key, m.step) not in points
                points[(key, m.step)] = m.value
        files = [f.path for f in client.list_artifacts(r.info.run_id)]
        files += [f.path for f in client.list_artifacts(r.info.run_id, "eval_samples")]
        out.append(
            {
                "id": r.info.run_id,
                "tags": r.data.tags,
                "params": r.data.params,
                "points": points,
                "files": files,
            }
        )
    return out


# ---- tests ---------------------------------------------------------------------------------


def test_every_logger_holds_metrics_jsonl_and_resume_behaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB_PROJECT", "from-env")  # the tool's own variables apply
    monkeypatch.setenv("WANDB_NAME", "env-name")
    _run(run, ALL)
    first = _jsonl_points(run)
    assert ("eval/loss", 4) in first and ("grad_norm", 8) in first

    tb, _, texts = _tensorboard(run)
    _same(tb, first)
    assert "optimizer:" in texts["config/text_summary"][0][1]  # the resolved config as YAML
    assert any("expected" in t for _, t in texts["eval/samples/text_summary"])
    (wb,) = _wandb_runs(run)
    _same(wb["history"], first)
    assert wb["config"]["optimizer"]["lr"] == 3e-3 and wb["tags"] == []
    assert (wb["project"], wb["name"]) == ("from-env", "env-name")
    assert {("eval/samples/_type", 4), ("eval/samples/_type", 8)} <= wb["other"]  # tables
    (ml,) = _mlflow_runs(run)
    _same(ml["points"], first)
    assert ml["params"]["optimizer.lr"] == "0.003" and ml["params"]["train.max_steps"] == "8"
    assert "config.yaml" in ml["files"] and "eval_samples/step_00000008.md" in ml["files"]

    # resume from step 4 with another learning rate: steps 5-8 are new values
    ckpt = run / "checkpoints" / "step_00000004"
    said = _run(run, ALL, "optimizer.lr=1e-3", "log.name=yaml-name", resume=ckpt)
    after = _jsonl_points(run)
    assert after[("loss", 6)] != first[("loss", 6)]  # so a stale point would show

    tb, seen, _ = _tensorboard(run)
    _same(tb, after)  # purge_step: the first run's steps 5-8 are gone
    assert len(seen) == len(set(seen)), "a step shows twice in TensorBoard"

    wb1, wb2 = _wandb_runs(run)
    assert wb2["tags"] == [f"resumed_from:{wb1['id']}"]
    assert (wb2["project"], wb2["name"]) == ("from-env", "yaml-name")  # a YAML key wins
    assert wb2["config"]["resumed_from"] == wb1["id"] and wb2["config"]["resumed_at_step"] == 4
    _same(wb2["history"], {p: v for p, v in after.items() if p[1] > 4})
    assert min(step for _, step in wb2["history"]) == 5
    ml1, ml2 = _mlflow_runs(run)
    assert ml2["tags"]["resumed_from"] == ml1["id"] and ml2["tags"]["resumed_at_step"] == "4"
    _same(ml2["points"], {p: v for p, v in after.items() if p[1] > 4})
    assert ml2["params"]["optimizer.lr"] == "0.001"
    assert f"TensorBoard: resumed at step 4 in {run / 'tensorboard'} (purge_step 5" in said
    for tool, new, old in (("W&B", wb2["id"], wb1["id"]), ("MLflow", ml2["id"], ml1["id"])):
        assert f"{tool}: resumed at step 4 as a new run {new} tagged resumed_from={old}" in said
    assert json.loads((run / "loggers.json").read_text())["wandb"]["runs"] == [
        wb1["id"],
        wb2["id"],
    ]


class _BreakStore(Callback):
    """Deletes the MLflow folder store after the first logged window (a real failure: the
    store's next write finds no run)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.had_run = False

    def on_step_end(self, info: dict) -> None:
        if info["rows"][-1]["step"] == 2:
            self.had_run = any(self.store.glob("*/*/metrics/loss"))
            shutil.rmtree(self.store)


def test_a_failing_logger_warns_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, store = tmp_path / "run", tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))  # a folder store, from MLflow's variable
    out = io.StringIO()
    cfg = load_config(None, [*TINY, f"run.output_dir={run}", "log.to=[mlflow]"])
    broken = _BreakStore(store)
    result = train(cfg, callbacks=[broken], console=Console(file=out, width=400))
    said = out.getvalue()
    assert broken.had_run  # the store was MLFLOW_TRACKING_URI's, with the run in it
    assert result.final_step == 8
    assert said.count("warning: MLflow logging failed at step 4") == 1, said
    assert "it is off for the rest of the run, training goes on" in said
    assert said.count("logging failed") == 1
    steps = {s for _, s in _jsonl_points(run)}
    assert steps == set(range(1, 9))


@pytest.mark.parametrize(
    ("blocked", "logger", "extra"),
    [
        ("wandb", "wandb", "wandb"),
        ("tensorboard", "tensorboard", "tensorboard"),
        ("sqlalchemy", "mlflow", "mlflow"),
    ],
)
def test_a_missing_logger_package_is_one_line_naming_the_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    blocked: str,
    logger: str,
    extra: str,
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # what an uninstalled package looks like
    config = tmp_path / "c.yaml"
    config.write_text("run: {name: c}\n")
    run = f"run.output_dir={tmp_path / 'run'}"
    code = cli.main(["train", str(config), *TINY, run, f"log.to=[jsonl,{logger}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"tscale: error: log.to: {logger} needs the {blocked} package: pip install "
        f"'tscale[{extra}]' (or remove {logger} from log.to)"
    ]
