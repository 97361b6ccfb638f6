"""Unit sizes (issue 22): ``python -m qpexp.bench units [--over 60] [--roots qpexp hydra_plugins]``.

An ``ast`` walk over the Python files under the roots: every function and method (nested ones
too), its length in source lines from its ``def`` (decorators excluded) to its last line,
``end_lineno - lineno + 1``, docstring and comments included. Prints the functions over
``--over`` lines, longest first, then one JSON line: how many are over 60 and over 80, the
longest, and the class with the most methods.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from qpexp.bench import emit


def units(roots: list[Path]) -> tuple[list[dict], list[dict]]:
    """(functions, classes) under ``roots``: each function's qualified name, file and length;
    each class's method count."""
    funcs, classes = [], []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            _walk(tree, str(path), "", funcs, classes)
    return funcs, classes


def _walk(node, path: str, prefix: str, funcs: list, classes: list) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            lines = child.end_lineno - child.lineno + 1
            funcs.append({"lines": lines, "function": name, "file": f"{path}:{child.lineno}"})
            _walk(child, path, name + ".", funcs, classes)
        elif isinstance(child, ast.ClassDef):
            name = prefix + child.name
            methods = [c for c in child.body if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
            classes.append({"class": name, "methods": len(methods), "file": f"{path}:{child.lineno}"})
            _walk(child, path, name + ".", funcs, classes)
        else:
            _walk(child, path, prefix, funcs, classes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qpexp.bench units", description=__doc__.split("\n")[0])
    ap.add_argument("--over", type=int, default=60)
    ap.add_argument("--roots", nargs="+", default=["qpexp", "hydra_plugins"])
    a = ap.parse_args(argv)
    missing = [r for r in a.roots if not Path(r).is_dir()]
    if missing:
        raise SystemExit(f"--roots: no such directory: {', '.join(missing)} (run from a checkout's root)")
    funcs, classes = units([Path(r) for r in a.roots])
    rows = sorted((f for f in funcs if f["lines"] > a.over), key=lambda f: (-f["lines"], f["file"]))
    widest = max(classes, key=lambda c: c["methods"], default=None)
    figures = {
        "functions": len(funcs),
        "over_60": sum(f["lines"] > 60 for f in funcs),
        "over_80": sum(f["lines"] > 80 for f in funcs),
        "longest": rows[0]["function"] if rows else None,
        "longest_lines": rows[0]["lines"] if rows else 0,
        "most_methods": widest and {"class": widest["class"], "methods": widest["methods"]},
    }
    emit(rows, figures, f"functions over {a.over} lines ({', '.join(a.roots)})")


if __name__ == "__main__":
    main()
