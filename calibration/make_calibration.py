"""Regenerate the calibration texts from the Python standard library (PSF License; see LICENSE-PSF.txt).

Two files, deterministic for a given CPython version (3.11 here):
- python_docstrings.txt: English prose, the module, class and function docstrings of pure-Python
  standard library modules, one per paragraph block, in module order;
- python_code.txt: Python source, a few small standard library modules verbatim.

usage: python calibration/make_calibration.py   (writes next to this file)
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

DOC_MODULES = [
    "argparse", "collections/__init__", "functools", "textwrap", "json/__init__", "pathlib", "subprocess",
    "dataclasses", "enum", "logging/__init__", "contextlib", "abc", "string", "shutil", "tempfile", "typing",
    "datetime", "fractions", "decimal", "statistics", "random", "heapq", "bisect", "calendar", "csv",
    "difflib", "inspect", "pprint", "queue", "sched", "shlex", "socket", "threading", "zipfile", "tarfile",
    "urllib/parse", "http/client", "email/message", "unittest/case", "asyncio/events", "concurrent/futures/_base",
]
CODE_MODULES = ["textwrap", "heapq", "bisect", "fractions", "shlex", "colorsys", "graphlib", "sched", "queue"]
DOC_LIMIT = 160_000
CODE_LIMIT = 90_000


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                out.append(doc.strip())
    seen, unique = set(), []
    for d in out:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def main() -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    here = Path(__file__).parent
    parts, size = [], 0
    for name in DOC_MODULES:
        for doc in docstrings(lib / f"{name}.py"):
            if size + len(doc) > DOC_LIMIT:
                break
            parts.append(doc)
            size += len(doc) + 2
    (here / "python_docstrings.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    code, size = [], 0
    for name in CODE_MODULES:
        text = (lib / f"{name}.py").read_text(encoding="utf-8")
        if size + len(text) > CODE_LIMIT:
            continue
        code.append(f"# ---- {name}.py (Python standard library, PSF License)\n{text}")
        size += len(text)
    (here / "python_code.txt").write_text("\n".join(code), encoding="utf-8")


if __name__ == "__main__":
    main()
