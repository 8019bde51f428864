"""The ``tscale`` command: resolved config, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import yaml

from tscale.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _tscale(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tscale.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_show_prints_resolved_config_with_defaults():
    r = _tscale("config", "show", "configs/quickstart.yaml", "optimizer.lr=3e-4")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["optimizer"]["lr"] == 3e-4
    assert shown["optimizer"]["eps"] == 1e-8  # adamw's own default, which the file does not set
    assert shown["optimizer"]["skip_nonfinite"] is True
    assert shown["model"]["hidden_size"] == 128  # set by the file
    assert list(shown) == [f.name for f in attrs.fields(Config)]


def test_config_typo_exits_2_with_suggestion_and_no_traceback(tmp_path: Path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("optimizer:\n  lr_rate: 0.001\n")
    r = _tscale("train", str(cfg))
    assert r.returncode == 2
    assert "optimizer.lr_rate" in r.stderr
    assert "did you mean 'optimizer.lr'?" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1


def test_override_typo_and_bad_choice_exit_2(tmp_path: Path):
    r = _tscale("train", "configs/quickstart.yaml", "optimizer.lr_rate=3e-4")
    assert r.returncode == 2 and "did you mean 'optimizer.lr'?" in r.stderr
    r = _tscale("config", "show", "configs/quickstart.yaml", "optimizer.type=adamx")
    assert r.returncode == 2 and "adamw" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file_exits_2(tmp_path: Path):
    r = _tscale("train", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr


def test_overrides_may_follow_flags(tmp_path: Path):
    from tscale.cli import _parse

    args = _parse(["train", "cfg.yaml", "a.b=1", "--overwrite", "c.d=2"])
    assert args.overwrite and args.overrides == ["a.b=1", "c.d=2"] and args.resume is False
    args = _parse(["train", "cfg.yaml", "--resume", "a.b=1"])
    assert args.resume is True and args.overrides == ["a.b=1"]
    args = _parse(["train", "cfg.yaml", "--resume", "runs/x/checkpoints/step_00000010"])
    assert args.resume == "runs/x/checkpoints/step_00000010" and args.overrides == []
    r = _tscale("train", "configs/quickstart.yaml", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


def test_data_inspect_and_preview(tmp_path: Path):
    tiny = [
        f"run.output_dir={tmp_path / 'run'}",
        "data.synthetic.num_train=100",
        "data.synthetic.num_eval=4",
        "data.tokenizer.vocab_size=300",
    ]
    r = _tscale("data", "preview", "configs/quickstart.yaml", *tiny, "-n", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("trained / not trained")
    assert lines[1].startswith("[0] <|bos|>") and lines[1].endswith("<|eos|>")
    r = _tscale("data", "inspect", "configs/quickstart.yaml", *tiny)
    assert r.returncode == 0 and "tokens per example: p50" in r.stdout
    r = _tscale("data", "inspect", str(tmp_path / "run" / "data" / "train.jsonl"))
    assert r.returncode == 0 and "format: prompt_completion" in r.stdout
    r = _tscale("data", "inspect", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_version_and_python_dash_m():
    from tscale import __version__

    r = _tscale("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tscale {__version__}"
    r = subprocess.run(
        [sys.executable, "-m", "tscale", "config", "show", "configs/quickstart.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["run"]["name"] == "quickstart"


def test_first_command_imports_with_the_collector_paused_and_frozen():
    """The first command of a process imports torch & co. without cyclic collections and keeps
    what they made frozen while it runs (no collection walks it); afterwards the collector is
    on and nothing is frozen (the exit collects as usual); a second command imports nothing."""
    code = (
        "import gc, io, sys, contextlib\n"
        "import tscale.cli\n"
        "assert 'torch' not in sys.modules and gc.get_freeze_count() == 0\n"
        "full, frozen = [], []\n"
        "gc.callbacks.append(lambda phase, info: full.append(info['generation'] == 2) "
        "if phase == 'start' else None)\n"
        "run = tscale.cli._run\n"
        "def spy(args):\n"
        "    frozen.append((gc.get_freeze_count(), gc.isenabled(), 'torch' in sys.modules))\n"
        "    return run(args)\n"
        "tscale.cli._run = spy\n"
        "argv = ['config', 'show', 'configs/quickstart.yaml']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert tscale.cli.main(argv) == 0 and tscale.cli.main(argv) == 0\n"
        "print(frozen[0][0], frozen[1][0], *frozen[0][1:], sum(full), gc.get_freeze_count(), "
        "gc.isenabled())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    first, second, enabled, torch_loaded, full, after, enabled_after = r.stdout.split()
    assert int(first) > 100_000 and second == "0"  # torch's objects; the second imports none
    assert (enabled, torch_loaded) == ("True", "True")
    assert full == "0"  # no full collection while importing (nor after: little else is made)
    assert (after, enabled_after) == ("0", "True")


_END = (
    "import atexit, os, sys, threading\n"
    "import tscale.cli\n"
    "class Teardown:\n"
    "    def __del__(self, write=os.write):\n"
    "        write(1, b'teardown\\n')\n"
    "keep = Teardown()  # freed by the interpreter's teardown only\n"
    "atexit.register(print, 'atexit handler')\n"
    "if len(sys.argv) > 2:  # a worker thread that runs until the interpreter's exit\n"
    "    threading.Thread(target=threading.main_thread().join).start()\n"
    "sys.argv = ['tscale', 'config', 'show', sys.argv[1]]\n"
    "sys.exit(tscale.cli.main())\n"
)


def _program(config: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _END, config, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_program_ends_without_the_teardown_after_the_atexit_handlers(tmp_path: Path):
    r = _program("configs/quickstart.yaml")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout.split("atexit handler")[0])["run"]["name"] == "quickstart"
    assert r.stdout.rstrip().endswith("atexit handler")  # flushed, after the command's output
    assert "teardown" not in r.stdout  # the process ended before the interpreter's teardown
    bad = tmp_path / "typo.yaml"
    bad.write_text("optimizer:\n  lr_rate: 0.001\n")
    r = _program(str(bad))
    assert r.returncode == 2 and "lr_rate" in r.stderr and "atexit handler" in r.stdout
    assert "teardown" not in r.stdout


def test_the_program_exits_normally_while_another_thread_runs():
    r = _program("configs/quickstart.yaml", "thread")
    assert r.returncode == 0, r.stderr
    assert "atexit handler" in r.stdout and "teardown" in r.stdout  # the usual exit
