"""The house rules of the package: every import goes down the data flow, and nothing imports in a circle.

The layers (README, "Layout"), lowest first. A module may import its own package and any package of
a lower rank; two packages of the same rank never import each other. Every import statement counts,
also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "igengine"

RANKS = {
    # foundation: shared vocabulary, no knowledge of any stage
    "errors": 0, "config": 0, "noise": 0, "precision": 0, "safeload": 0, "__init__": 0,
    # storage: how bytes reach the disk (atomic writes, manifests), knowing nothing of any stage
    "store": 1,
    # independent stages
    "models": 2, "kernels": 2, "vae": 2,
    "export": 3, "sampling": 3, "metrics": 3,
    "backends": 4,
    # orchestration
    "jobs": 5,
    "bench": 6, "digits": 6, "api": 6,
    "cli": 7,
    "__main__": 8,
}
# Foundation modules may use each other only in this order (an import must go to the left).
FOUNDATION_ORDER = ["errors", "config", "noise", "precision", "safeload", "__init__"]
# Same-or-lower rank but still not allowed: the sampler never knows the model or how it is run.
FORBIDDEN = {("sampling", "models"), ("sampling", "backends"), ("sampling", "export"), ("kernels", "sampling")}
# Upward but allowed, and only inside a function: the package root re-exports the Python API
# (``igengine.load``) without importing it, so ``import igengine`` stays free of torch.
LAZY_REEXPORTS = {("__init__", "api")}


def _group(module: str) -> str:
    """igengine.sampling.loop -> 'sampling'; igengine.config -> 'config'; igengine -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "igengine"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "igengine":
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The igengine module an imported name lives in (``from a.b import c`` may name a module or an object)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def violations(src: str, imported: set[str], top_level: set[str] | None = None) -> list[str]:
    """The imports of a module of package ``src`` that break the rules (module names of igengine).

    top_level: those of ``imported`` made at module level (None: all of them), which a
    ``LAZY_REEXPORTS`` pair may not use.
    """
    bad = []
    top_level = imported if top_level is None else top_level
    for mod in sorted(imported):
        dst = _group(mod)
        if dst == src:
            continue
        if (src, dst) in LAZY_REEXPORTS:
            if mod in top_level:
                bad.append(f"{mod} (a lazy re-export: import it inside the function, not at module level)")
            continue
        if dst not in RANKS:
            bad.append(f"{mod} (unranked)")
        elif (src, dst) in FORBIDDEN:
            bad.append(f"{mod} (forbidden: {src} never imports {dst})")
        elif RANKS[dst] > RANKS[src] or (RANKS[dst] == RANKS[src] and not (
                RANKS[src] == 0 and FOUNDATION_ORDER.index(dst) < FOUNDATION_ORDER.index(src))):
            bad.append(f"{mod} ({dst}, rank {RANKS[dst]}, is not below {src}, rank {RANKS[src]})")
    return bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    if _group(module) not in RANKS:
        pytest.fail(f"{module}: package {_group(module)!r} has no rank in tests/test_layers.py (add it)")
    imported = {m for n in _imports(MODULES[module]) if (m := _resolve(n))}
    top_level = {m for n in _imports(MODULES[module], top_level_only=True) if (m := _resolve(n))}
    bad = violations(_group(module), imported, top_level)
    assert not bad, f"{module} imports upwards or sideways: {bad}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    """Module-level imports form no cycle (a cycle makes import order matter and hides a layering error)."""
    graph = {m: {r for n in _imports(p, top_level_only=True) if (r := _resolve(n)) and r != m}
             for m, p in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


PACKAGES = sorted({_group(m) for m in MODULES if m.count(".") >= 2})


def package_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, counting every import statement (also
    those inside functions, and ``from igengine.pkg import mod``, which loads the package's __init__)."""
    inside = {m: p for m, p in MODULES.items() if _group(m) == package and m != "igengine"}
    return {m: {r for n in _imports(p) if (r := _resolve(n)) and r != m and r in inside} for m, p in inside.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    """Inside a package no import closes a circle, lazy ones included: a module that another one loads
    or calls never loads it back (igengine/kernels: the loader loads, and the self-test that launches
    through it sits above it)."""
    cycle = find_cycle(package_graph(package))
    assert cycle is None, f"import cycle inside igengine/{package}: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert "kernels" in PACKAGES and "igengine.kernels.library" in package_graph("kernels")["igengine.kernels.binding"]


def test_the_checker_sees_a_violation():
    """The rules can fail: upward, sideways, forbidden and foundation-order imports are each reported."""
    assert violations("sampling", {"igengine.backends.base"})  # forbidden (and upward)
    assert violations("sampling", {"igengine.models.dit"})  # forbidden although of a lower rank
    assert violations("kernels", {"igengine.models.dit"})  # sideways: same rank
    assert violations("store", {"igengine.models.dit"})  # upward: storage knows no stage
    assert not violations("kernels", {"igengine.store.atomic"})  # a stage may write through the store
    assert violations("models", {"igengine.jobs.sample"})  # upward
    assert violations("config", {"igengine.precision"})  # foundation, against its order
    assert violations("jobs", {"igengine.nowhere.x"}) == ["igengine.nowhere.x (unranked)"]
    assert not violations("jobs", {"igengine.backends.base", "igengine.sampling.loop", "igengine.config"})
    assert not violations("precision", {"igengine.config", "igengine.errors"})
    assert not violations("__init__", {"igengine.api"}, top_level=set())  # igengine.load's lazy import
    assert violations("__init__", {"igengine.api"})  # the same import at module level
    assert violations("__init__", {"igengine.jobs.sample"}, top_level=set())  # only the API is re-exported
