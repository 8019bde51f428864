"""DESIGN.md §4/§5: imports point down the diagram and the pure packages do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tscale"

# What each package may import from tscale (besides itself). train and cli are the top.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": {"errors"},
    "config": {
        "errors",
        "core",
        "tasks",
        "optim",
    },  # records beside their factories (optim: its record registries)
    "kernels": {"errors", "core"},
    "models": {"core", "kernels", "errors"},
    "optim": {"core", "kernels", "errors"},
    "losses": {"core", "kernels", "errors"},
    "data": {"core", "kernels", "errors"},
    "step": {"core", "optim", "losses", "kernels", "errors"},
    "parallel": {"core", "optim", "losses", "step", "models", "kernels", "errors"},
    "checkpoint": {"core", "errors", "config", "models", "optim"},
    # one module per objective: the pieces a loss, a pre-pass and an eval are made of
    "tasks": {"core", "errors", "data", "losses", "models", "step", "kernels", "rewards", "rl"},
    # reward functions: user callables on decoded text, scored on the host; reward models
    # (loaded by checkpoint, run by models)
    "rewards": {"core", "errors", "models", "checkpoint"},
    # online RL's generation side: rollouts from a model, the log-prob contract
    "rl": {"core", "errors", "models", "kernels"},
    "testing": {"core", "errors", "optim", "step", "losses"},
    "train": {"*"},
    "cli": {"*"},
    "__main__": {"cli"},  # python -m tscale: the command and nothing else
    "__init__": {"*"},
}
# Config sections that build themselves (optimizer, scheduler) are records beside their
# factories; config imports their registries, nothing else of optim (no transform, no alias).
CONFIG_RECORD_MODULES = {"tscale.optim.alias", "tscale.optim.schedules"}
PURE = ("core", "optim", "losses", "step", "models")
IO_MODULES = {
    "os",
    "io",
    "pathlib",
    "shutil",
    "json",
    "yaml",
    "pickle",
    "socket",
    "subprocess",
    "sys",
    "tempfile",
    "glob",
    "safetensors",
    "datasets",
    "tokenizers",
    "requests",
    "urllib",
    "logging",
}
IO_CALLS = {"open", "print", "input"}
IO_ATTRS = {("torch", "save"), ("torch", "load")}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def test_every_package_is_classified():
    pkgs = {_package_of(p) for p in _modules()}
    assert pkgs <= set(ALLOWED), f"add {pkgs - set(ALLOWED)} to ALLOWED"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    pkg = _package_of(path)
    allowed = ALLOWED[pkg]
    tree = ast.parse(path.read_text())
    for name, line in _imports(tree):
        if not name.startswith("tscale.") or "*" in allowed:
            continue
        target = name.split(".")[1]
        assert target == pkg or target in allowed, (
            f"{path.relative_to(ROOT.parent)}:{line} imports {name}; "
            f"{pkg} may import only {allowed}"
        )
        if pkg == "config" and target == "optim":
            assert name in CONFIG_RECORD_MODULES, (
                f"{path.relative_to(ROOT.parent)}:{line} imports {name}; config may import only "
                f"the record registries of optim ({', '.join(sorted(CONFIG_RECORD_MODULES))})"
            )


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if _package_of(p) in PURE],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_pure_packages_do_no_io(path: Path):
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT.parent)
    for name, line in _imports(tree):
        assert name.split(".")[0] not in IO_MODULES, f"{where}:{line} imports {name} (I/O)"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                assert f.id not in IO_CALLS, f"{where}:{node.lineno} calls {f.id}()"
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                assert (f.value.id, f.attr) not in IO_ATTRS, (
                    f"{where}:{node.lineno} calls {f.value.id}.{f.attr}()"
                )
        if isinstance(node, ast.Global):
            raise AssertionError(f"{where}:{node.lineno} writes a global")


def test_nothing_imports_train_or_cli():
    for path in _modules():
        pkg = _package_of(path)
        if pkg in ("train", "cli", "__init__", "__main__"):
            continue
        for name, line in _imports(ast.parse(path.read_text())):
            assert not name.startswith(("tscale.train", "tscale.cli")), (
                f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
            )
