"""Start ``tscale`` CLI runs as forks of one process that has already imported torch and tscale.

``python _fork_launcher.py MODULE...`` imports the modules, then reads one JSON request per line
on stdin, ``{"args": [...], "log": PATH}``; for each it forks a child that runs
``tscale.cli.main(args)`` (or, with ``"script": PATH``, that Python file as ``__main__`` with
``args`` as its arguments) with stdin from /dev/null and its output to ``log``, prints
``{"pid": PID}``, waits for the child and prints ``{"status": S}`` (the exit code, or ``-N`` when
signal N ended it). It ends at the end of stdin.

A fresh ``python -m tscale.cli`` spends seconds importing torch before its first step; a fork of
this process starts at once, so a test can start a run and ``kill -9`` it many times. The
launcher itself runs no torch op before forking (no thread pools to inherit), and each child is
a new process: a kill ends it alone, with no handler, as it ends a ``tscale train`` command.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys


def _run_child(args: list[str], log: str, script: str | None) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        if script is None:
            from tscale.cli import main

            code = main(args) or 0
        else:
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_run_child(request["args"], request["log"], request.get("script")))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
    os._exit(0)  # no interpreter teardown (seconds with torch loaded): nothing is left to flush
