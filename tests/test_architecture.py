"""The folders are the architecture: who may import whom, read from the source files' import
statements (so a forbidden import fails here, not in a user's install without Prefect)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# runtime's sub-packages, each importing only those before it
RUNTIME_LAYERS = ["io", "cache", "model", "frontends", "measure"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "moestream":  # the folders are mapped into the moestream package
        parts.insert(0, "moestream")
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module imported, line, at module level) for each import in a file; `from P import
    n` counts as importing P and P.n (n may be a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.append((base, node.lineno, id(node) in top))
            out += [(f"{base}.{a.name}", node.lineno, id(node) in top) for a in node.names]
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _violations(folder: str, forbidden) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _files(folder)
            for mod, line, _ in _imports(p) if forbidden(mod)]


def test_runtime_never_imports_prefect_stages_or_flows():
    bad = _violations("runtime", lambda m: m.split(".")[0] in ("prefect", "prefect_dask", "dask")
                      or m.startswith(("moestream.stages", "moestream.flows")))
    assert not bad, bad


def test_manifests_and_common_depend_on_nothing_above_them():
    assert not _violations("manifests", lambda m: m.startswith(("moestream.runtime", "moestream.stages",
                                                                 "moestream.flows", "prefect")))
    assert not _violations("common", lambda m: m.startswith("moestream.") and not m.startswith("moestream.common"))


def test_stages_never_import_prefect_or_flows():
    assert not _violations("stages", lambda m: m.split(".")[0] == "prefect" or m.startswith("moestream.flows"))


@pytest.mark.parametrize("layer", RUNTIME_LAYERS)
def test_runtime_sub_packages_only_import_those_below(layer):
    allowed = RUNTIME_LAYERS[: RUNTIME_LAYERS.index(layer) + 1]
    if layer == "measure":
        allowed.append("frontends")  # measurement may drive any front end; nothing imports measure
    bad = [v for v in _violations(f"runtime/{layer}", lambda m: m.startswith("moestream.runtime.")
                                   and m.split(".")[2] not in allowed)]
    assert not bad, bad


def test_no_import_cycles_between_runtime_modules():
    graph = {_module_name(p): {m for m, _, _ in _imports(p)} for p in _files("runtime")}
    modules = set(graph)
    edges = {a: {b for b in deps if b in modules and b != a} for a, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node, [node])


def test_every_package_folder_is_installed():
    """A folder with an __init__.py that pyproject does not list is missing from a plain (non-editable)
    `pip install .`: the code works in the checkout and fails in a user's install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = ["moestream", "common", "flows", "stages", "runtime", "manifests", "calibration"]
    found = {_module_name(init) for top in folders for init in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), f"package folders missing from pyproject.toml's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages with no folder: {sorted(listed - found)}"
