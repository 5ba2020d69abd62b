"""The module docstring of app.py is its map: these cheap checks keep it true (no server, no model).

- every environment variable Settings reads is in the docstring's table;
- every banner section is in the docstring's list of sections;
- each section uses only the sections above it: no top-level definition reads a name defined further down
  (a string annotation's names included);
- every route declares how the gateway serves it, and answers errors in its own API's shape.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app.py"
SOURCE = APP.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
DOCSTRING = ast.get_docstring(TREE) or ""
BANNER = re.compile(r"^# (\d+[a-z]?)\. (.+)$")


def sections() -> list[tuple[int, str, str]]:
    """(first line, number, title) of each banner section, in file order."""
    lines = SOURCE.splitlines()
    return [(i + 1, m.group(1), m.group(2)) for i, line in enumerate(lines)
            if i and re.fullmatch(r"# =+", lines[i - 1]) and (m := BANNER.match(line))]


def section_of(line: int, starts: list[tuple[int, str, str]]) -> int:
    """The index of the section holding `line`."""
    return max((k for k, (first, _, _) in enumerate(starts) if first <= line), default=0)  # the docstring: 1


def settings_aliases() -> set[str]:
    settings = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    names = set()
    for call in ast.walk(settings):
        if isinstance(call, ast.keyword) and call.arg == "validation_alias":
            names |= {c.value for c in ast.walk(call.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


def test_every_setting_is_in_the_environment_table():
    table = "\n".join(line for line in DOCSTRING.splitlines() if line.startswith("|"))
    aliases = settings_aliases()
    assert len(aliases) > 40, aliases  # the walk found Settings' fields
    missing = sorted(a for a in aliases if not re.search(rf"\b{re.escape(a)}\b", table))
    assert not missing, f"Settings reads these, the docstring's environment table does not list them: {missing}"


def test_every_section_is_in_the_docstring_map():
    listed = DOCSTRING.split("Sections, in order", 1)[-1]
    missing = [f"{n}. {title}" for _, n, title in sections() if not re.search(rf"(^|\s){re.escape(n)}\.\s", listed)]
    assert not missing, f"banner sections missing from the docstring's list: {missing}"


def top_level_names() -> dict[str, int]:
    """name -> the line of its first top-level definition."""
    names: dict[str, int] = {}
    for node in TREE.body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        for name in targets:
            names.setdefault(name, node.lineno)
    return names


def local_names(fn: ast.AST) -> set[str]:
    """What a function binds itself (parameters, assignments, loop and comprehension variables, imports)."""
    bound = set()
    args = getattr(fn, "args", None)
    if args is not None:
        bound |= {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def global_reads(node: ast.AST, shadowed: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """(name, line) of each read of a module-level name inside `node`: names a function binds itself are
    its own, not the module's."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        reads = [r for d in getattr(node, "decorator_list", []) for r in global_reads(d, shadowed)]
        inner = shadowed | local_names(node)
        body = node.body if isinstance(node.body, list) else [node.body]
        defaults = [*node.args.defaults, *[d for d in node.args.kw_defaults if d]]
        annotations = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs] if a.annotation]
        return reads + [r for part in [*defaults, *annotations] for r in global_reads(part, shadowed)] + \
            [r for stmt in body for r in global_reads(stmt, inner)]
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return [] if node.id in shadowed else [(node.id, node.lineno)]
    return [r for child in ast.iter_child_nodes(node) for r in global_reads(child, shadowed)]


def annotation_reads(node: ast.AST) -> list[tuple[str, int]]:
    """Names in string annotations ("Loaded"): a forward reference is a reach forward too."""
    annotations = [a.annotation for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for a in [*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs] if a.annotation]
    annotations += [n.returns for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.returns]
    annotations += [n.annotation for n in ast.walk(node) if isinstance(n, ast.AnnAssign)]
    return [(n.id, a.lineno) for a in annotations if isinstance(a, ast.Constant) and isinstance(a.value, str)
            for n in ast.walk(ast.parse(a.value, mode="eval")) if isinstance(n, ast.Name)]


def test_no_section_reaches_forward():
    starts, defined = sections(), top_level_names()
    forward = []
    for node in TREE.body:
        here = section_of(node.lineno, starts)
        for name, line in global_reads(node) + annotation_reads(node):
            if name in defined and section_of(defined[name], starts) > here:
                where = starts[section_of(defined[name], starts)][1]
                forward.append(f"line {line} (section {starts[here][1]}) reads {name} (section {where})")
    assert not forward, "each section uses only those above it:\n" + "\n".join(sorted(set(forward)))


@pytest.fixture(scope="module")
def app_module():
    import app

    return app


def test_every_route_declares_its_gateway_policy_and_error_shape(app_module):
    app = app_module.create_app(app_module.Settings(_env_file=None))
    kinds = {"local", "health", "metrics", "model", "holder", "broadcast", "pull", "merge"}
    routes = list(app_module.app_routes(app.routes))
    ours = [r for r in routes if isinstance(r, app_module.WireRoute)]
    assert len(ours) > 50
    undeclared = [r.path for r in ours if (r.openapi_extra or {}).get("x-gateway", {}).get("kind") not in kinds]
    assert not undeclared, f"routes without a gateway policy (openapi_extra=BY_MODEL, LOCAL, ...): {undeclared}"
    assert all(r.api in app_module.WIRE_APIS for r in ours)
    others = {r.path for r in routes if not isinstance(r, app_module.WireRoute)}
    assert others <= {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}, \
        f"routes made outside a wire_router (no error shape, no gateway policy): {others}"
    # The grep of the map finds them all: one decorator line per route path and method set.
    decorators = re.findall(r'(?m)^@\w+_api\.(?:get|post|delete|head|api_route)\("([^"]+)"', SOURCE)
    assert sorted(decorators) == sorted(r.path for r in ours)
