"""The ``tscale`` command.

``tscale train CFG [key=value ...] [--resume [CKPT]]`` trains; ``tscale config show CFG
[key=value ...]`` prints the resolved config; ``tscale schedule plot CFG [key=value ...] [-o
lr.png]`` draws the learning rate over ``train.max_steps``; ``tscale plot RUN [RUN ...] -o
curves.png`` draws runs' curves overlaid. A user's mistake (bad config, data,
checkpoint) is printed as one line on stderr and exits with status 2 — no traceback.

Exit status of ``tscale train``: 0 when the run finished, and also when SIGTERM or a first
Ctrl-C (SIGINT) stopped it cleanly (the step finished, a checkpoint saved, its path printed;
``--resume`` continues exactly) — under torchrun that keeps the launcher from reporting a
ChildFailedError for a preemption; 130 when a second Ctrl-C aborted without saving; 2 for a
user's mistake.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence

from tscale import __version__
from tscale.errors import ConfigError, TscaleError

EXIT_USER_ERROR = 2
# The modules each command runs on (torch, tensordict and tscale's own), imported up front by
# _imports_frozen; the other commands import what they need as they go.
_COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("tscale.config", "tscale.train"),
    "config": ("tscale.config",),
    "data": ("tscale.config", "tscale.train.data_cli"),
    "export": ("tscale.train.export",),
    "schedule": ("tscale.config", "tscale.train.plot"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tscale", description="Config-driven LLM training.")
    # DeepSpeed's launcher passes --local_rank=N before the command; the rank is read from the
    # environment it sets as well (LOCAL_RANK), so the flag is accepted and ignored
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"tscale {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train as a YAML config says")
    t.add_argument("config", help="path to a YAML config")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optimizer.lr=3e-4")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CKPT",
        help="continue from the newest checkpoint of the run (or from CKPT)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a run directory that holds checkpoints (deletes them)",
    )

    e = sub.add_parser("export", help="write a run or checkpoint as an HF checkpoint directory")
    e.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint")
    e.add_argument("out", help="the HF directory to write")
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 500MB)")

    d = sub.add_parser("data", help="look at data before training")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="a dataset path, or a config's data after tokenizing")
    di.add_argument("config", help="a YAML config, or a data file/directory/hub name")
    di.add_argument("overrides", nargs="*", help="key.path=value overrides (with a config)")
    di.add_argument("--split", default=None, help="split to inspect (paths only)")
    di.add_argument("--format", default="auto", help="force a record format (paths only)")
    dp = dsub.add_parser("preview", help="render examples as the model sees them")
    dp.add_argument("config", help="a YAML config, or a data file/directory/hub name")
    dp.add_argument(
        "overrides",
        nargs="*",
        help="key.path=value overrides (with a path: e.g. data.template=chatml, model.path=DIR)",
    )
    dp.add_argument("-n", type=int, default=3, help="examples to show")
    dp.add_argument("--split", default=None, help="split to preview (paths only)")
    dp.add_argument("--format", default="auto", help="force a record format (paths only)")

    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with all defaults")
    show.add_argument("config", help="path to a YAML config")
    show.add_argument("overrides", nargs="*", help="key.path=value overrides")

    r = sub.add_parser("runs", help="list the runs under a folder: last step, loss, eval")
    r.add_argument("folder", nargs="?", default="runs", help="default: %(default)s")

    pl = sub.add_parser(
        "plot", help="draw runs' curves (loss, lr, grad norm, tokens/s …) into one PNG"
    )
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or metrics.jsonl)")
    pl.add_argument("-o", "--output", default="curves.png", help="PNG to write (%(default)s)")
    pl.add_argument(
        "--metrics",
        action="append",
        default=None,
        metavar="A,B",
        help="panels to draw (comma-separated, repeatable; e.g. loss,eval/exact_match); "
        "default: loss, lr, grad_norm, tokens_per_s",
    )
    pl.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="W",
        help="exponential moving average weight in [0, 1) over the raw curve (default 0)",
    )
    pl.add_argument(
        "--label", action="append", default=None, help="legend name of each run, in order"
    )

    s = sub.add_parser("schedule", help="learning-rate schedule tools")
    ssub = s.add_subparsers(dest="schedule_command", required=True)
    plot = ssub.add_parser("plot", help="write a PNG of the learning rate over train.max_steps")
    plot.add_argument("config", help="path to a YAML config")
    plot.add_argument("overrides", nargs="*", help="key.path=value overrides")
    plot.add_argument(
        "-o", "--output", default="lr_schedule.png", help="PNG to write (default: %(default)s)"
    )
    return p


def _run(args: argparse.Namespace) -> int:
    from tscale.config import load_config, to_yaml
    from tscale.config.schema import resolve_defaults

    if args.command == "train" and (warning := accelerate_cpu_warning(os.environ)):
        print(warning, file=sys.stderr)

    if args.command == "export":
        from tscale.train.export import export

        print(f"wrote {export(args.checkpoint, args.out, max_shard_size=args.max_shard_size)}")
        return 0

    if args.command == "runs":
        from rich.console import Console

        from tscale.train.runs_cli import print_runs

        print_runs(args.folder, Console())
        return 0

    if args.command == "plot":
        from tscale.train.plot_cli import plot_runs

        metrics = [m for part in args.metrics or [] for m in part.split(",") if m]
        if args.label and len(args.label) != len(args.runs):
            raise ConfigError(
                f"tscale plot: {len(args.label)} --label for {len(args.runs)} runs; give one each"
            )
        out = plot_runs(
            args.runs,
            args.output,
            metrics=metrics or None,
            smoothing=args.smooth,
            labels=args.label,
        )
        print(f"wrote {out}")
        return 0

    if args.command == "data":
        from rich.console import Console

        from tscale.train import data_cli

        is_yaml = args.config.endswith((".yaml", ".yml"))
        if args.data_command == "inspect" and not is_yaml:
            print(data_cli.inspect_path(args.config, split=args.split, fmt=args.format))
            return 0
        if not is_yaml:  # preview a dataset path with the defaults (and the overrides)
            data_cli.preview_path(
                args.config, args.overrides, Console(), n=args.n, split=args.split, fmt=args.format
            )
            return 0
        cfg = resolve_defaults(load_config(args.config, args.overrides))
        if args.data_command == "inspect":
            data_cli.inspect_config(cfg, Console())
        else:
            data_cli.preview(cfg, Console(), n=args.n)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":  # the values this run uses: null/auto keys resolved
        resolved = resolve_defaults(cfg)
        sys.stdout.write(to_yaml(resolved))
        if resolved.train.max_steps is None:
            sys.stdout.write(
                f"# train.max_steps: train.epochs ({resolved.train.epochs:g}) x the steps per "
                "epoch, known once the data is read (`tscale train` prints it)\n"
            )
        return 0
    if args.command == "schedule":
        cfg = resolve_defaults(cfg)
        from tscale.train.plot import plot_schedule

        print(f"wrote {plot_schedule(cfg, args.output)}")
        return 0
    from tscale.train import train

    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def accelerate_cpu_warning(env: Mapping[str, str]) -> str | None:
    """The warning for ``accelerate launch --cpu --num_processes N`` (N > 1), which starts one
    process: accelerate's ``--cpu`` launcher runs the script once (several CPU processes need
    its MPI path) but still sets ``MASTER_PORT`` because N > 1. None otherwise."""
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    if not use_cpu or "WORLD_SIZE" in env or "MASTER_PORT" not in env:
        return None
    return (
        "tscale: warning: `accelerate launch --cpu` started this one process only (its --cpu "
        "launcher ignores --num_processes); for several CPU ranks use `accelerate launch "
        "--multi_gpu --num_processes N` or torchrun (docs/distributed.md)"
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand before or after the flags.

    argparse stops collecting a positional list at the first flag, so overrides after
    ``--overwrite`` come back as extras; they are appended here. ``--resume key=value`` means
    "resume" plus an override, since a checkpoint path never contains ``=`` in practice.
    """
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    stray = [x for x in extras if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = list(getattr(args, "overrides", []) or [])
    resume = getattr(args, "resume", False)
    if isinstance(resume, str) and "=" in resume:
        overrides.append(resume)
        args.resume = True
    args.overrides = overrides + extras
    return args


@contextlib.contextmanager
def _imports_frozen(modules: Sequence[str]) -> Iterator[None]:
    """Import ``modules`` with the cyclic garbage collector paused and keep what they made out
    of its collections (``gc.freeze``) until the command ends.

    torch, its compiler stack (tensordict imports it) and sympy create about half a million
    objects at import time that live as long as the process; every full collection would walk
    them again — several times during the imports and during training (about a second of a
    short CPU run). Only the first command of a process imports and freezes, and none where the
    caller has frozen objects itself. At the end the objects are unfrozen, so the interpreter's
    exit collects them as usual (C extensions whose objects were never freed print leak
    reports at exit otherwise)."""
    missing = [m for m in modules if m not in sys.modules]
    if not missing or gc.get_freeze_count():
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        for module in missing:
            importlib.import_module(module)
        gc.freeze()
        if enabled:
            gc.enable()
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tscale`` console script: run the command ``argv`` (default:
    ``sys.argv[1:]``) and return its exit status.

    Called without ``argv`` — as the console script and ``python -m tscale`` call it — it is
    the program, and ends the process itself once the command is done (see
    :func:`_end_process`); with ``argv`` it only returns the status."""
    code = _main(argv)
    if argv is None:
        _end_process(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    try:
        with _imports_frozen(_COMMAND_MODULES.get(args.command, ())):
            return _run(args)
    except TscaleError as e:
        print(f"tscale: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tscale: interrupted", file=sys.stderr)
        return 130


def _end_process(code: int) -> None:
    """End the process with ``code`` now, without the interpreter's teardown, when that is safe.

    The teardown frees torch, its compiler stack and every other module object by object
    (1-2 s of CPU after each command, more than a short training run spends building itself);
    the operating system takes the memory back at once. What a normal exit guarantees still
    happens first: the atexit handlers (logging's flush, the loggers' finish, temporary
    folders …) and flushed standard streams. With another thread alive, or a stream that
    cannot be flushed, it returns and the normal exit (which waits for the thread, or reports
    the stream) takes over."""
    if threading.active_count() > 1:
        return
    atexit._run_exitfuncs()  # each handler once: it empties the registry
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream: the normal exit reports it
        return
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
