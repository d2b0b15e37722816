"""The package layout is the pipeline: every import in mergelab/ (lazy ones inside functions too)
points down it, there is no import cycle, and no module imports another module's private names.

The graph is built from the source with `ast`, so it sees imports that never run in a test."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mergelab"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("shared", ["mergelab", "mergelab.errors", "mergelab.paths", "mergelab.locks", "mergelab.names", "mergelab.logs",
                "mergelab.metrics"]),
    ("io", ["mergelab.io"]),
    ("engine", ["mergelab.engine"]),
    ("store", ["mergelab.store"]),
    ("sweep", ["mergelab.sweep"]),
    ("analysis", ["mergelab.analysis"]),
    ("export", ["mergelab.export", "mergelab.paper", "mergelab.importing"]),  # results out, and in
    ("demo", ["mergelab.demo"]),
    ("ui", ["mergelab.ui", "mergelab.figures"]),
    ("cli", ["mergelab.cli", "mergelab.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer of tests/test_layout.py: give it one"
    return index


def imports(path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported mergelab module, line, names) for every import statement in the file, at any depth."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "mergelab"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "mergelab":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(m, node.lineno, []) for m in submodules]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest or not submodules:
                out.append((base, node.lineno, rest))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = set(modules())
    edges: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for module, path in modules().items():
        for target, line, names in imports(path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in known:
                problems.append(f"{where}: imports {target}, which is not a module of mergelab")
                continue
            if target != module:
                edges[module].add(target)
            if layer(target) > layer(module):
                problems.append(f"{where}: {module} ({LAYERS[layer(module)][0]}) imports {target} "
                                f"({LAYERS[layer(target)][0]}), a layer above it")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{where}: {module} imports private {', '.join(private)} from {target}")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_pipeline():
    _, problems = graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = cycles(graph()[0])
    assert not found, "import cycles (lazy imports count): " + "; ".join(" ↔ ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer("mergelab.analysis.fit") > layer("mergelab.sweep.runner") > layer("mergelab.io.family")
    assert layer("mergelab.demo.up") < layer("mergelab.ui.dashboard")
    known = set(modules())
    lazy = [t for t, _, _ in imports(PACKAGE / "sweep" / "runner.py", known)]
    assert "mergelab.sweep.ray_backend" in lazy and "mergelab.store" in lazy


def test_pages_and_app_import_no_private_names():
    problems = []
    for path in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergelab"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    problems.append(f"{path.name}:{node.lineno}: {', '.join(private)}")
    assert not problems, problems


def test_a_failed_fit_is_never_a_string():
    """Fits come back as FitResult objects, failures as FitFailure or FitError: no code tells them apart
    by checking for a string."""
    import re

    pattern = re.compile(r"isinstance\(\s*\w*fit\w*\s*,\s*str\s*\)")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), ROOT / "app.py", *(ROOT / "pages").glob("*.py")]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
