"""The layering, read from the source with ``ast`` (every import, module level or inside a function):

    gptoss_cli                 the command line: on top of everything, imported by nothing
    train                      fine-tuning: writes merged checkpoints through convert
    convert                    the checkpoint writers
    gptoss_jax                 the library: imports none of the above
      serving                  does not import the model layers (gptoss_jax.layers, gptoss_jax.model)

and no import cycle between modules (a function-local import does not hide one).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"gptoss_jax": 0, "convert": 1, "train": 2, "gptoss_cli": 3}
MODEL = ("gptoss_jax.layers", "gptoss_jax.model")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """Our modules that ``name`` imports (``from pkg import mod`` -> ``pkg.mod``)."""
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return out


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_upward_or_sideways_import():
    bad = []
    for mod, targets in _graph().items():
        here = mod.split(".")[0]
        for t in targets:
            there = t.split(".")[0]
            if there != here and PACKAGES[there] >= PACKAGES[here]:
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_serving_does_not_import_the_model_layers():
    bad = [f"{m} -> {t}" for m, ts in _graph().items() if m.startswith("gptoss_jax.serving")
           for t in ts if t.startswith(MODEL)]
    assert not bad, "serving imports model layers: " + ", ".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in graph and t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_imports():  # the tests above must be able to fail
    graph = _graph()
    assert "gptoss_jax.checkpoint.loader" in graph["gptoss_jax"] or graph["convert.to_orbax"]
    assert "gptoss_jax.checkpoint.loader" in graph["convert.to_orbax"]
    assert "gptoss_jax.model" in graph["gptoss_jax.checkpoint.loader"]
