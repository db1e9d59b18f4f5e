"""Each default of a search, and the draft width resolver, is defined once in the package source.

The scan reads the package's Python files (``ast``), so a second ``--gamma`` default, a second K
list or a second width resolver fails here before the two drift apart.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import atspeed_ray
from atspeed_ray.settings import DEFAULT_GAMMA, DEFAULT_KS

PACKAGE = Path(atspeed_ray.__file__).parent


def sources() -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the package, parsed module) of every Python file of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path))


def int_literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def literal_default(value: ast.AST | None) -> bool:
    """``3``, ``Field(3, ...)`` or ``Field(default=3, ...)``."""
    if int_literal(value):
        return True
    if isinstance(value, ast.Call):
        first = value.args[0] if value.args else None
        given = next((kw.value for kw in value.keywords if kw.arg == "default"), first)
        return int_literal(given)
    return False


def gamma_defaults() -> list[str]:
    """Where a gamma gets an integer literal as its default: a constant, a dataclass or pydantic
    field, a function argument, or an argparse ``--gamma`` option."""
    found = []
    for where, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if any("gamma" in n.lower() for n in names) and literal_default(node.value):
                    found.append(f"{where}:{node.lineno}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = a.posonlyargs + a.args
                pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults))
                pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                found += [f"{where}:{node.lineno}" for arg, d in pairs
                          if "gamma" in arg.arg.lower() and int_literal(d)]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value == "--gamma":
                if any(kw.arg == "default" and int_literal(kw.value) for kw in node.keywords):
                    found.append(f"{where}:{node.lineno}")
    return found


def k_lists() -> list[str]:
    """Where the K list (1, 3, 5, 10, 20) is written out as a literal."""
    return [f"{where}:{node.lineno}" for where, tree in sources() for node in ast.walk(tree)
            if isinstance(node, (ast.Tuple, ast.List)) and node.elts
            and all(int_literal(e) for e in node.elts)
            and tuple(e.value for e in node.elts) == DEFAULT_KS]  # type: ignore[attr-defined]


def mentions_k(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "k" for n in ast.walk(node))


def width_resolvers() -> list[str]:
    """Code that turns a policy into a width for top-k: a function of ``k`` named like a width
    (``draft_width``, ``of``, ``resolve``, ...) returning an int, or a ``ceil(... k ...)``.
    A one-line delegate to ``WidthPolicy.resolve`` is not one."""
    found = []
    for where, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and mentions_k(node) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "ceil")
                    or (isinstance(node.func, ast.Name) and node.func.id == "ceil")):
                found.append(f"{where}:{node.lineno} ceil")
            if not isinstance(node, ast.FunctionDef):
                continue
            args = [a.arg for a in node.args.args]
            returns = ast.unparse(node.returns) if node.returns else ""
            widthy = any(w in node.name for w in ("width", "beams")) or node.name in ("of", "resolve")
            if "k" in args and widthy and returns.startswith("int"):
                body = [s for s in node.body if not (isinstance(s, ast.Expr)
                                                     and isinstance(s.value, ast.Constant))]
                delegate = (len(body) == 1 and isinstance(body[0], ast.Return)
                            and ".resolve(" in ast.unparse(body[0]))
                if not delegate:
                    found.append(f"{where}:{node.lineno} {node.name}")
    return found


def test_gamma_default_is_defined_once():
    assert DEFAULT_GAMMA == 3
    assert gamma_defaults() == ["settings.py:" + str(settings_line("DEFAULT_GAMMA"))]


def test_the_k_list_is_defined_once():
    assert k_lists() == ["settings.py:" + str(settings_line("DEFAULT_KS"))]


def test_one_width_resolver():
    """``WidthPolicy.resolve`` and the per-level ``LevelWidth.of`` it uses, in width_policy.py;
    everything else (bench, evaluate, serve, the pipeline, the auto choice) calls them."""
    found = width_resolvers()
    assert all(f.startswith("width_policy.py:") for f in found), found
    assert sorted(f.split()[-1] for f in found) == ["ceil", "of", "resolve"], found


def settings_line(name: str) -> int:
    tree = ast.parse((PACKAGE / "settings.py").read_text())
    return next(n.lineno for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                and name in ast.unparse(n.targets[0] if isinstance(n, ast.Assign) else n.target))
