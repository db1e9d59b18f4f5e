"""The package's import graph: no cycles, and no arrow that runs back up the layers.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: a lazy
import hides a cycle from Python, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import atspeed_ray

ROOT = Path(atspeed_ray.__file__).parent
# package (or module) -> what it must never import: the core stays below the shells
FORBIDDEN = {
    "atspeed_ray.decoding": ("atspeed_ray.serving", "atspeed_ray.training", "atspeed_ray.drafts",
                             "atspeed_ray.models", "atspeed_ray.bench", "atspeed_ray.evaluate",
                             "atspeed_ray.benchmarking", "atspeed_ray.width",
                             "atspeed_ray.pipeline", "atspeed_ray.tune"),
    "atspeed_ray.data": ("atspeed_ray.serving", "atspeed_ray.training", "atspeed_ray.decoding",
                         "atspeed_ray.drafts", "atspeed_ray.bench", "atspeed_ray.evaluate",
                         "atspeed_ray.benchmarking"),
    "atspeed_ray.training": ("atspeed_ray.serving", "atspeed_ray.bench", "atspeed_ray.evaluate",
                             "atspeed_ray.pipeline"),
    "atspeed_ray.reference": ("atspeed_ray.evaluate", "atspeed_ray.bench", "atspeed_ray.serving",
                              "atspeed_ray.training"),
    "atspeed_ray.drafts": ("atspeed_ray.serving", "atspeed_ray.training", "atspeed_ray.bench",
                           "atspeed_ray.evaluate"),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("atspeed_ray", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c``: a.b.c if a module, else a.b)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("atspeed_ray") else None
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    # models imports FastLlama inside load_decoder only
    assert "atspeed_ray.decoding.fast_llama" in graph["atspeed_ray.models"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_arrow_runs_back_up():
    bad = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in sorted(deps)
           for layer, banned in FORBIDDEN.items()
           if (mod == layer or mod.startswith(layer + ".")) and dep.startswith(banned)]
    assert bad == []
