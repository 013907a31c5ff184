"""The layers import downward only, no module imports itself back in a cycle, the core imports neither
Prefect nor MLflow, and importing any module leaves the environment as it found it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import only from packages before it (and from itself).
LAYERS = ["models", "conversations", "retrieval", "tasks", "flows", "interfaces"]
CORE = {"models", "conversations", "retrieval"}
ORCHESTRATION = ("prefect", "mlflow", "prefect_dask")


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


def test_layers_import_downward_only():
    upward = []
    for name, targets in graph().items():
        level = LAYERS.index(name.split(".")[0])
        upward += [f"{name} -> {t}" for t in sorted(targets) if LAYERS.index(t.split(".")[0]) > level]
    assert upward == [], "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph().items()}  # a package's own __init__
    state, cycles = {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_core_has_no_orchestration():
    leaks = [
        f"{name} imports {m}"
        for name, path in modules().items()
        if name.split(".")[0] in CORE
        for m in sorted(imports(path))
        if m.split(".")[0] in ORCHESTRATION
    ]
    assert leaks == []


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks above fail when they should: a core module that imports a task is caught."""
    bad = ROOT / "models" / "_upward_probe.py"
    bad.write_text("from tasks.settings import MODEL_NAME\n")
    try:
        with pytest.raises(AssertionError, match="models._upward_probe -> tasks.settings"):
            test_layers_import_downward_only()
    finally:
        bad.unlink()


def test_importing_changes_no_environment(tmp_path):
    """In a fresh interpreter with a bare environment (none of the defaults ``apply_environment``
    would set): import every module, compare the environment before and after."""
    names = sorted(n for n in modules() if not n.endswith("__main__"))
    code = (
        "import importlib, json, os, sys\n"
        "before = dict(os.environ)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}))\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BUCKETCHAT_HOME": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
