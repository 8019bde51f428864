"""Every script in benchmarks/ runs end to end with ``--smoke`` (tiny sizes, a few seconds each).

A dependency release that breaks a benchmark (an import, an API the script calls, a module the
script's folder shadows on ``sys.path``) fails here instead of at the next ``make bench``. Each
script runs as ``python benchmarks/<name>.py --smoke --out <tmp>/<name>.json`` from the repository
root, as a user runs it; the JSON it writes must have every key of the recorded result in
``benchmarks/results/`` (the same output shape), and the recorded results must be left as they were.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
TIMEOUT_S = 240

# Keys whose children are data, not shape: the steps at which a run evaluated, the variants run.
DATA_KEYED = {"exact_match_by_step", "trained_tokens", "methods"}


@dataclass(frozen=True)
class Case:
    """How one script's smoke run is checked."""

    # extra commands after ``python benchmarks/<name>.py --smoke --out OUT`` ("{out}" is OUT)
    then: tuple[tuple[str, ...], ...] = ()
    # top-level keys a person added to the recorded result after the run (notes on repeats)
    hand_added: frozenset[str] = frozenset()
    # folders the smoke run must create beside OUT (its runs, instead of the repository's runs/)
    beside_out: tuple[str, ...] = ()
    # the recorded result, when there is one
    recorded: bool = True
    # packages the recorded shape needs (in the dev extra; skipped without them, as elsewhere)
    needs: tuple[str, ...] = ()
    marks: tuple[Any, ...] = ()


CASES: dict[str, Case] = {
    "step_throughput": Case(),
    "group_layout": Case(),
    "generate": Case(),
    "rollout": Case(),
    "optimizers": Case(needs=("bitsandbytes",)),
    "data_pipeline": Case(
        hand_added=frozenset({"runs"}), needs=("trl",), marks=(pytest.mark.slow,)
    ),
    "parallel": Case(needs=("deepspeed",), marks=(pytest.mark.slow,)),
    "preemption": Case(
        then=(
            (
                *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
                *("benchmarks/preemption.py", "--vote", "--smoke", "--out", "{out}"),
            ),
        ),
        marks=(pytest.mark.slow,),
    ),
    "optimizers_quickstart": Case(beside_out=("bench-optimizers-runs",), marks=(pytest.mark.slow,)),
    "lora_quickstart": Case(
        beside_out=("lora-quickstart-runs",), needs=("bitsandbytes",), marks=(pytest.mark.slow,)
    ),
    "e2e_sft": Case(
        hand_added=frozenset({"repeat_runs"}),
        needs=("trl",),
        beside_out=("e2e-sft-work",),
        marks=(pytest.mark.slow,),
    ),
    "preference": Case(needs=("trl",), beside_out=("preference-work",), marks=(pytest.mark.slow,)),
    "rl": Case(needs=("trl",), beside_out=("rl-work",), marks=(pytest.mark.slow,)),
    "rl_equal_time": Case(
        needs=("trl",), beside_out=("rl-equal-time-work",), marks=(pytest.mark.slow,)
    ),
    "preference_methods": Case(
        hand_added=frozenset({"note"}),
        beside_out=("preference-methods-work",),
        marks=(pytest.mark.slow,),
    ),
    # without CUDA, --smoke runs the Triton kernels under the interpreter (tiny shapes, float32)
    "kernel_speed": Case(recorded=False, needs=("triton",), marks=(pytest.mark.slow,)),
}


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _missing_keys(recorded: Any, got: Any, path: str = "") -> list[str]:
    """Key paths of ``recorded`` absent from ``got`` (dicts recursively, lists by first item)."""
    if isinstance(recorded, dict):
        if not isinstance(got, dict):
            return [f"{path} (not an object)"] if recorded and got is not None else []
        out = []
        for key, value in recorded.items():
            where = f"{path}.{key}" if path else key
            if key not in got:
                out.append(where)
            elif key not in DATA_KEYED:
                out += _missing_keys(value, got[key], where)
        return out
    if isinstance(recorded, list) and recorded and isinstance(got, list) and got:
        return _missing_keys(recorded[0], got[0], f"{path}[0]")
    return []


def _run(args: list[str], out: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, *(a.replace("{out}", str(out)) for a in args)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def test_every_script_has_a_smoke_case() -> None:
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(CASES)


def test_no_script_shadows_an_installed_module() -> None:
    """``python benchmarks/<name>.py`` puts benchmarks/ first on ``sys.path``: a script named like
    a module that a dependency imports hides it (transformers 5.25 imports ``kernels``)."""
    shadowed = {
        p.name: spec.origin
        for p in BENCHMARKS.glob("*.py")
        if (spec := importlib.util.find_spec(p.stem)) is not None
    }
    assert shadowed == {}


def test_smoke_needs_out() -> None:
    """A smoke run never writes over a recorded result: without --out it is refused."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/optimizers_quickstart.py", "--smoke"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 2
    assert "--smoke needs --out" in proc.stderr


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()]
)
def test_benchmark_smoke(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    for package in case.needs:  # looked up, not imported: the script imports it
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{name} needs {package} (the dev extra)")
    before = _digests(RESULTS)
    out = tmp_path / f"{name}.json"
    output = _run([f"benchmarks/{name}.py", "--smoke", "--out", "{out}"], out)
    for then in case.then:
        output += _run(list(then), out)
    assert _digests(RESULTS) == before, "a smoke run changed benchmarks/results/"

    got = json.loads(out.read_text())
    assert got.get("smoke") is True
    for folder in case.beside_out:
        assert (tmp_path / folder).is_dir(), f"{name} did not keep its runs in {folder}"
    if case.recorded:
        recorded = json.loads((RESULTS / f"{name}.json").read_text())
        for key in case.hand_added:
            recorded.pop(key)
        assert _missing_keys(recorded, got) == []
        # a part that failed inside the script (reported, exit 0) fails the smoke run
        if recorded.get("errors") == {}:
            assert got["errors"] == {}
    else:  # kernel_speed (no result recorded in the repository): every part, every kernel ran
        flce, attention, packed = (
            got["linear_cross_entropy"][0]["results"],
            got["attention"][0],
            got["packed_attention"],
        )
        ran = [flce["tscale_triton"], flce["eager"]]
        for mode in ("fwd", "fwd_bwd"):
            ran += [attention[mode]["tscale_triton"], packed[mode]["tscale_triton_doc_ids"]]
            ran += [packed[mode]["tscale_triton_cu_seqlens"]]
        assert all("ms" in r for r in ran), ran
