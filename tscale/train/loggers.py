"""Loggers beyond metrics.jsonl, chosen by ``log.to``: TensorBoard, Weights & Biases, MLflow;
plus ``throughput.jsonl`` and the end-of-run ``curves.png``.

Each logger is a :class:`~tscale.train.callbacks.Callback` that the trainer builds on rank 0
only, through :func:`build_loggers`. They send every number of every metrics.jsonl row under the
same name and step (``loss``, ``lr``, ``eval/loss`` …, whatever the task adds), plus
``tokens_per_s`` at the last step of each logging window. A logger that raises is switched off
with one warning and the run goes on: logging never costs a training run.

Resume: TensorBoard writes on in the same directory with ``purge_step`` = the checkpoint's step +
1, so the steps the first run logged after the checkpoint disappear from the charts. W&B and
MLflow cannot delete what was sent, so a resumed run is a new W&B/MLflow run tagged
``resumed_from`` (the first run's id, kept in ``<run>/loggers.json``), and the run says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from tscale.config.load import to_dict, to_yaml
from tscale.config.schema import Config
from tscale.errors import ConfigError
from tscale.train.callbacks import Callback, Info, eval_row, scalars, truncate_jsonl

__all__ = [
    "EXTRAS",
    "MlflowLogger",
    "PlotAtEnd",
    "TensorBoardLogger",
    "ThroughputLog",
    "WandbLogger",
    "build_loggers",
    "check_logger_packages",
]

# log.to name -> (module that must import, the tscale extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
_IDS_FILE = "loggers.json"  # the W&B / MLflow run ids of this run directory (for resume links)


def build_loggers(
    cfg: Config,
    run_dir: str | Path,
    *,
    console: Console,
    resumed_from: str | Path | None = None,
) -> list[Callback]:
    """The callbacks ``cfg.log`` asks for (rank 0 only: the trainer calls this on rank 0).

    Always ``throughput.jsonl`` (tokens/s per logging window, for ``tscale plot``); then one
    guarded logger per ``log.to`` entry (``jsonl`` is metrics.jsonl, which the trainer always
    writes); then, with ``log.plot`` and matplotlib installed, ``curves.png`` at the end.

    Args:
        cfg: the resolved config (what the loggers record as the run's config).
        run_dir: the run directory.
        console: where warnings and the resume notes go.
        resumed_from: the checkpoint this run resumes from (None: a fresh run).

    Raises:
        ConfigError: a logger's package is not installed (names ``log.to`` and the extra).
    """
    run_dir = Path(run_dir)
    resumed = resumed_from is not None
    check_logger_packages(cfg, run_dir)
    out: list[Callback] = [ThroughputLog(run_dir / "throughput.jsonl", resumed=resumed)]
    ids = _RunIds(run_dir / _IDS_FILE, resumed=resumed)
    for name in dict.fromkeys(cfg.log.to):  # each logger once, in the order given
        if name == "tensorboard":
            log_dir = Path(cfg.log.tensorboard_dir or run_dir / "tensorboard")
            logger = TensorBoardLogger(log_dir, cfg, resumed=resumed, console=console)
            out.append(_Guarded(logger, "TensorBoard", console))
        elif name == "wandb":
            out.append(_Guarded(WandbLogger(cfg, run_dir, ids, console), "W&B", console))
        elif name == "mlflow":
            out.append(_Guarded(MlflowLogger(cfg, run_dir, ids, console), "MLflow", console))
    if cfg.log.plot and importlib.util.find_spec("matplotlib") is not None:
        out.append(_Guarded(PlotAtEnd(run_dir), "the end-of-run plot", console))
    return out


def check_logger_packages(cfg: Config, run_dir: str | Path) -> None:
    """Every package ``log.to`` needs is installed (cheap: nothing is imported). Safe to call on
    every rank before the first collective, so a missing package stops all ranks alike.

    Raises:
        ConfigError: one line naming ``log.to``, the package and the extra that installs it.
    """
    for name in cfg.log.to:
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        needed = [module]
        if name == "mlflow" and _mlflow_store(cfg, Path(run_dir))[0].startswith("sqlite:"):
            needed += ["sqlalchemy", "alembic"]  # MLflow's SQL store
        for package in needed:
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"log.to: {name} needs the {package} package: pip install 'tscale[{extra}]' "
                    f"(or remove {name} from log.to)"
                )


class _Guarded(Callback):
    """Runs a logger's hooks; the first exception switches it off with one warning."""

    def __init__(self, inner: Callback, name: str, console: Console) -> None:
        self.inner, self.name, self.console = inner, name, console
        self.failed = False

    def _call(self, hook: str, info: Info) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, hook)(info)
        except Exception as e:
            self.failed = True
            self.console.print(
                f"warning: {self.name} logging failed at step {info.get('step')} "
                f"({type(e).__name__}: {e}); it is off for the rest of the run, training goes on",
                style="yellow",
                soft_wrap=True,
                markup=False,
            )
            close = getattr(self.inner, "close", None)
            if close is not None:  # already failing: the warning above is the one message
                with contextlib.suppress(Exception):
                    close()

    def on_train_start(self, info: Info) -> None:
        self._call("on_train_start", info)

    def on_step_end(self, info: Info) -> None:
        self._call("on_step_end", info)

    def on_eval(self, info: Info) -> None:
        self._call("on_eval", info)

    def on_save(self, info: Info) -> None:
        self._call("on_save", info)

    def on_train_end(self, info: Info) -> None:
        self._call("on_train_end", info)


def _windows(info: Info) -> Iterator[tuple[int, dict[str, float]]]:
    """``(step, numbers)`` of each row of an ``on_step_end``, with ``tokens_per_s`` (the
    window's) added at its last step."""
    rows = info["rows"]
    for i, row in enumerate(rows):
        values = scalars(row)
        if i == len(rows) - 1 and "tokens_per_s" in info:
            values["tokens_per_s"] = float(info["tokens_per_s"])
        yield int(row["step"]), values


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Sample generations as a markdown table (TensorBoard's text plugin renders it)."""

    def cell(x: Any) -> str:
        return repr(x).replace("|", "\\|")

    lines = ["| | prompt | answer | expected |", "|---|---|---|---|"]
    for s in samples:
        mark = "✓" if s.get("correct") else "✗"
        lines.append(
            f"| {mark} | {cell(s.get('prompt'))} | {cell(s.get('answer'))} "
            f"| {cell(s.get('expected'))} |"
        )
    return "\n".join(lines)


class ThroughputLog(Callback):
    """``throughput.jsonl``: ``{"step", "tokens_per_s"}`` at the end of each logging window
    (wall-clock figures stay out of metrics.jsonl, whose rows are deterministic)."""

    def __init__(self, path: Path, *, resumed: bool) -> None:
        self.path, self.resumed = Path(path), resumed

    def on_train_start(self, info: Info) -> None:
        if self.resumed:
            truncate_jsonl(self.path, info["step"])
        else:
            self.path.unlink(missing_ok=True)

    def on_step_end(self, info: Info) -> None:
        row = {"step": info["rows"][-1]["step"], "tokens_per_s": info["tokens_per_s"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class TensorBoardLogger(Callback):
    """Scalars (every metrics.jsonl key at its step), the resolved config and the eval sample
    generations as text, through ``torch.utils.tensorboard``.

    A fresh run starts with ``purge_step=0`` (events of an earlier run in the directory are
    hidden), a resumed one with ``purge_step`` = its first step (the checkpoint's + 1), so no
    step shows twice.
    """

    def __init__(
        self, log_dir: Path, cfg: Config, *, resumed: bool, console: Console | None = None
    ) -> None:
        self.log_dir, self.config_yaml, self.resumed = Path(log_dir), to_yaml(cfg), resumed
        self.console = console
        self.writer: Any = None

    def on_train_start(self, info: Info) -> None:
        from torch.utils.tensorboard import SummaryWriter

        start = int(info["step"])
        purge = start + 1 if self.resumed else 0
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        if self.resumed and self.console is not None:
            self.console.print(
                f"TensorBoard: resumed at step {start} in {self.log_dir} (purge_step {purge}: "
                f"what the first run logged after step {start} is dropped)",
                soft_wrap=True,
                markup=False,
            )
        # four spaces: a markdown code block, so the YAML shows as written
        text = "\n".join("    " + line for line in self.config_yaml.splitlines())
        self.writer.add_text("config", text, global_step=start)

    def on_step_end(self, info: Info) -> None:
        for step, values in _windows(info):
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def on_eval(self, info: Info) -> None:
        row = eval_row(info)
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        if info.get("samples"):
            self.writer.add_text(
                "eval/samples", _samples_markdown(info["samples"]), global_step=row["step"]
            )
        self.writer.flush()

    def on_train_end(self, info: Info) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _RunIds:
    """``<run>/loggers.json``: the first W&B / MLflow run of this run directory, which a
    resumed run links to (``resumed_from``)."""

    def __init__(self, path: Path, *, resumed: bool) -> None:
        self.path, self.resumed = path, resumed

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def first(self, tool: str) -> str | None:
        """The id of ``tool``'s first run when this run resumes (None: a fresh run)."""
        return self._read().get(tool, {}).get("first") if self.resumed else None

    def record(self, tool: str, run_id: str) -> None:
        data = self._read()
        entry = data.get(tool, {}) if self.resumed else {}
        entry.setdefault("first", run_id)
        entry["runs"] = [*entry.get("runs", []), run_id]
        data[tool] = entry
        self.path.write_text(json.dumps(data, indent=1) + "\n")


def _resume_note(console: Console, tool: str, new: str, first: str, step: int) -> None:
    console.print(
        f"{tool}: resumed at step {step} as a new run {new} tagged resumed_from={first} "
        f"({tool} keeps what run {first} logged after step {step}: compare from step {step + 1} "
        "on in the new run)",
        soft_wrap=True,
        markup=False,
    )


class WandbLogger(Callback):
    """A W&B run: the resolved config as its config, every metrics.jsonl number at its step,
    the eval samples as a table. ``WANDB_*`` variables apply (``WANDB_MODE=offline`` needs no
    network; ``WANDB_DIR`` default: the run directory); the YAML's ``log.project`` /
    ``log.name`` / ``log.tags`` win over ``WANDB_PROJECT`` / ``WANDB_NAME`` / ``WANDB_TAGS``."""

    def __init__(self, cfg: Config, run_dir: Path, ids: _RunIds, console: Console) -> None:
        self.cfg, self.run_dir, self.ids, self.console = cfg, run_dir, ids, console
        self.run: Any = None

    def on_train_start(self, info: Info) -> None:
        import wandb

        log, env = self.cfg.log, os.environ
        first = self.ids.first("wandb")
        config = to_dict(self.cfg)
        tags = list(log.tags) or [t for t in env.get("WANDB_TAGS", "").split(",") if t]
        if first is not None:
            tags.append(f"resumed_from:{first}")
            config["resumed_from"] = first
            config["resumed_at_step"] = int(info["step"])
        settings = {} if "WANDB_CONSOLE" in env else {"console": "off"}  # no stdout capture
        self.run = wandb.init(
            project=log.project or env.get("WANDB_PROJECT") or "tscale",
            name=log.name or env.get("WANDB_NAME") or self.cfg.run.name,
            tags=tags or None,
            config=config,
            dir=None if "WANDB_DIR" in env else str(self.run_dir),
            job_type="train",
            reinit="create_new",
            settings=wandb.Settings(**settings),
        )
        self.ids.record("wandb", self.run.id)
        if first is not None:
            _resume_note(self.console, "W&B", self.run.id, first, int(info["step"]))

    def on_step_end(self, info: Info) -> None:
        for step, values in _windows(info):
            self.run.log(values, step=step)

    def on_eval(self, info: Info) -> None:
        import wandb

        row = eval_row(info)
        values: dict[str, Any] = scalars(row)
        if info.get("samples"):
            columns = ["prompt", "answer", "expected", "correct"]
            table = wandb.Table(columns=columns)
            for s in info["samples"]:
                table.add_data(*(s.get(c) for c in columns))
            values["eval/samples"] = table
        self.run.log(values, step=row["step"])

    def on_train_end(self, info: Info) -> None:
        interrupted = info.get("summary", {}).get("interrupted")
        if self.run is not None:
            self.run.finish(exit_code=1 if interrupted else 0)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _mlflow_store(cfg: Config, run_dir: Path) -> tuple[str, str | None]:
    """``(tracking URI, artifact location for a new experiment)``: ``log.mlflow_tracking_uri``,
    else ``MLFLOW_TRACKING_URI`` (MLflow's own artifact defaults), else a SQLite store in
    ``<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts``.

    Not MLflow's folder store by default: MLflow 3 keeps it in maintenance mode (it refuses to
    open one unless ``MLFLOW_ALLOW_FILE_STORE`` is set, which tscale sets when it is asked for a
    folder), and a folder store cannot hold ``eval/exact_match`` beside
    ``eval/exact_match/sort`` (one metric's file would be the other's directory)."""
    uri = cfg.log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri, None
    run_dir = run_dir.resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}", (run_dir / "mlartifacts").as_uri()


class MlflowLogger(Callback):
    """An MLflow run through ``MlflowClient`` (no global active run; the store: see
    :func:`_mlflow_store`): the flattened resolved config as params and ``config.yaml`` as an
    artifact, every metrics.jsonl number at its step, the eval samples as
    ``eval_samples/step_N.md``."""

    _BATCH = 1000  # metrics per log_batch call (MLflow's limit); params go 100 at a time

    def __init__(self, cfg: Config, run_dir: Path, ids: _RunIds, console: Console) -> None:
        self.cfg, self.run_dir, self.ids, self.console = cfg, run_dir, ids, console
        self.client: Any = None
        self.run_id: str | None = None

    def on_train_start(self, info: Info) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        log = self.cfg.log
        uri, artifacts = _mlflow_store(self.cfg, self.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        name = log.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tscale"
        experiment = self.client.get_experiment_by_name(name)
        eid = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=artifacts)
        )
        first = self.ids.first("mlflow")
        tags = {t: "" for t in log.tags}
        if first is not None:
            tags |= {"resumed_from": first, "resumed_at_step": str(info["step"])}
        run = self.client.create_run(eid, run_name=log.name or self.cfg.run.name, tags=tags)
        self.run_id = run.info.run_id
        self.ids.record("mlflow", self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in _flat(to_dict(self.cfg))]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, to_yaml(self.cfg), "config.yaml")
        if first is not None:
            _resume_note(self.console, "MLflow", self.run_id, first, int(info["step"]))

    def _log(self, points: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in points for k, v in values.items()]
        for i in range(0, len(metrics), self._BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self._BATCH])

    def on_step_end(self, info: Info) -> None:
        self._log(list(_windows(info)))

    def on_eval(self, info: Info) -> None:
        row = eval_row(info)
        self._log([(row["step"], scalars(row))])
        if info.get("samples"):
            self.client.log_text(
                self.run_id,
                _samples_markdown(info["samples"]),
                f"eval_samples/step_{row['step']:08d}.md",
            )

    def on_train_end(self, info: Info) -> None:
        interrupted = info.get("summary", {}).get("interrupted")
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FINISHED")
            self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None


class PlotAtEnd(Callback):
    """``<run>/curves.png`` (as ``tscale plot RUN``) when the run ends at its last step (not
    after an exception or a stop by signal)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_end(self, info: Info) -> None:
        summary = info.get("summary", {})
        # after an exception, or within a launcher's grace period after SIGTERM: no drawing
        if summary.get("interrupted") or summary.get("stopped_by"):
            return
        from tscale.train.plot_cli import plot_runs

        plot_runs([self.run_dir], self.run_dir / "curves.png")
