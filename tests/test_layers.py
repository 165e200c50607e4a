"""The package's structure, checked from its source: imports go one way along the layers, no cycles, small files.

Layers (README, "Architecture"): core → models → data → eval → training → cli, with prepare/ and shapes/ on the
side (they may use core, models, data and eval; prepare may use shapes; neither is used by training), and the
trained model's API (captioner.load, captioner.api, captioner.server) beside training, using core, models, data.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "captioner"
MAX_LINES = 450

CORE = {"captioner.errors", "captioner.tokenizer", "captioner.io", "captioner.optim"}
# layer -> the layers its modules may import (besides their own layer)
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "data": {"core", "models"},
    "eval": {"core", "models", "data"},
    "shapes": {"core", "models", "data", "eval"},
    "prepare": {"core", "models", "data", "eval", "shapes"},
    "training": {"core", "models", "data", "eval"},
    "api": {"core", "models", "data"},
    "cli": {"core", "models", "data", "eval", "shapes", "prepare", "training", "api"},
}
# Lightning lives in the DataModules and above; the model code runs without it.
NO_LIGHTNING = {"core", "models", "eval"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in CORE:
        return "core"
    parts = module.split(".")
    if module == "captioner" or parts[1] in ("api", "server"):
        return "api"  # captioner.load and the caption server: a trained model's users, beside training
    return parts[1]


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module imported anywhere in the file (function-level imports included), resolved to our modules or
    kept as their top-level name for third-party ones."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from captioner.models import generate` imports the module captioner.models.generate
            names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in SOURCES]
            names = names or [node.module]
        else:
            continue
        for name in names:
            if name.startswith("captioner"):
                while name not in SOURCES:  # `captioner.models.gpt.GPT` style paths
                    name = name.rsplit(".", 1)[0]
                found.add(name)
            else:
                found.add(name.split(".")[0])
    return found


GRAPH = {name: {m for m in imports_of(path) if m in SOURCES and m != name} for name, path in SOURCES.items()}


def test_the_layers_exist():
    assert {layer_of(m) for m in SOURCES} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_follow_the_layers(module):
    layer = layer_of(module)
    wrong = sorted(m for m in GRAPH[module] if layer_of(m) not in ALLOWED[layer] | {layer})
    assert not wrong, f"{module} ({layer}) imports {wrong}, against the layer order"
    if layer in NO_LIGHTNING:
        assert "lightning" not in imports_of(SOURCES[module]), f"{module} ({layer}) imports Lightning"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_source_files_stay_small(module):
    n = len(SOURCES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{SOURCES[module]} has {n} lines; split it by job (limit {MAX_LINES})"
