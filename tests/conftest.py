"""Test-suite settings: one intra-op thread per pytest worker; the fork launcher.

`make test` runs two xdist workers on two cores; with torch's default of one thread per core each,
OpenMP threads oversubscribe the cores and tiny matmuls stall for milliseconds.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


class ForkedRun:
    """One ``tscale`` command forked by :class:`ForkLauncher`: a process of its own, polled and
    signalled like a ``subprocess.Popen`` (``wait_for_rows`` takes it); its output in ``log``."""

    def __init__(self, launcher: ForkLauncher, pid: int, log: Path) -> None:
        self._launcher = launcher
        self.pid = pid
        self.log = log
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (``-N`` when signal N ended it), or None while it runs."""
        if self.returncode is None and self._launcher._ready(0):
            self.returncode = self._launcher._reply()["status"]
        return self.returncode

    def wait(self, timeout: float = 240) -> int:
        if self.returncode is None:
            if not self._launcher._ready(timeout):
                self.kill()
                raise AssertionError(f"the run did not end within {timeout} s:\n{self.output()}")
            self.returncode = self._launcher._reply()["status"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> int:
        """``kill -9``; the exit status (``-9`` unless it had ended by itself)."""
        self.send_signal(signal.SIGKILL)
        return self.wait()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class ForkLauncher:
    """Start ``tscale`` commands as forks of one launcher process (``tests/_fork_launcher.py``)
    that has imported torch and tscale: each starts in milliseconds instead of the seconds a new
    interpreter spends importing, and is a real process that signals and ``kill -9`` reach. One
    run at a time; the children get the environment and working directory the launcher started
    with (``OMP_NUM_THREADS=1``), not a test's monkeypatched ones: pass absolute paths."""

    PRELOAD = ("torch", "tensordict", "tscale.cli", "tscale.config", "tscale.train")

    def __init__(self) -> None:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_fork_launcher.py"), *self.PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: select() sees exactly the lines not yet read
            env=env,
        )
        self.current: ForkedRun | None = None

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the fork launcher ended (rc {self.proc.wait()})"
        return json.loads(line)

    def start(self, args: list[str], log: Path, script: Path | None = None) -> ForkedRun:
        """Fork ``tscale ARGS``, or ``python SCRIPT ARGS`` (stdout and stderr appended to
        ``log``)."""
        if self.current is not None:
            assert self.current.poll() is not None, "the previous forked run still runs"
        request = {"args": [str(a) for a in args], "log": str(log)}
        if script is not None:
            request["script"] = str(script)
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.current = ForkedRun(self, self._reply()["pid"], log)
        return self.current

    def run(self, args: list[str], log: Path, timeout: float = 240) -> str:
        """Fork ``tscale ARGS``, wait, fail unless it exits 0; its output."""
        run = self.start(args, log)
        assert run.wait(timeout) == 0, f"tscale {' '.join(args)}:\n{run.output()[-4000:]}"
        return run.output()

    def close(self) -> None:
        if self.current is not None and self.current.poll() is None:
            self.current.kill()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def fork_launcher() -> Iterator[ForkLauncher]:
    """A :class:`ForkLauncher` shared by the tests of this worker."""
    launcher = ForkLauncher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def base_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/quickstart.yaml`` shrunk to a 3-step tiny run (``TINY_QUICKSTART``) and
    exported: the HF folder the config tests (LoRA, preference, online RL) start from."""
    from rich.console import Console

    from tscale.config import load_config
    from tscale.testing.runs import TINY_QUICKSTART
    from tscale.train import train
    from tscale.train.export import export

    root = tmp_path_factory.mktemp("base")
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart, [*TINY_QUICKSTART, f"run.output_dir={root}"])
    train(cfg, console=Console(quiet=True))
    return export(root, root / "export")
