"""Dependencies point one way. Every `import` of a raylong module counts, function-level ones included:

    bottom    config, credentials, log, storage, tracking, plan, cluster   import only the bottom
    data      raylong/data/*                                              never train / eval / pipeline / cli
    train     raylong/train/*                                             never pipeline / cli
    eval      raylong/eval/*                                              never pipeline / cli
    top       raylong/pipeline/*, raylong/cli

and no two raylong modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raylong"
BOTTOM = {"config", "credentials", "log", "storage", "tracking", "plan", "cluster"}
FORBIDDEN = {  # layer -> layers it must not import
    "bottom": {"data", "train", "eval", "top"},
    "data": {"train", "eval", "top"},
    "train": {"top"},
    "eval": {"top"},
    "top": set(),
}


def module_graph(package: Path) -> dict[str, set[str]]:
    """{module: modules of the same package it imports anywhere in its source}."""
    root = package.name
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import raylong.train.x.y` -> the longest module prefix
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] == root and t != name and not modules[t].name == "__init__.py":
                    deps.add(t)
        graph[name] = deps
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in BOTTOM:
        return "bottom"
    if parts[1] in ("pipeline", "cli"):
        return "top"
    return parts[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in graph.items() for d in deps
                  if layer(d) in FORBIDDEN.get(layer(m), set()))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_raylong_modules():
    found = cycles(module_graph(PACKAGE))
    assert not found, f"import cycles: {found}"


def test_no_upward_imports():
    graph = module_graph(PACKAGE)
    assert len(graph) > 30 and "raylong.train.worker" in graph  # the walk found the package
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "raylong"
    for sub in ("train", "pipeline", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "a.py").write_text("def f():\n    from raylong.pipeline.runner import g\n")  # upward, in a function
    (pkg / "pipeline" / "runner.py").write_text("from raylong.train import a\n")
    (pkg / "data" / "b.py").write_text("import raylong.data.c\n")
    (pkg / "data" / "c.py").write_text("from raylong.data import b\n")
    graph = module_graph(pkg)
    assert upward_imports(graph) == ["raylong.train.a (train) imports raylong.pipeline.runner (top)"]
    assert sorted(map(tuple, cycles(graph))) == [("raylong.data.b", "raylong.data.c"),
                                                 ("raylong.pipeline.runner", "raylong.train.a")]
