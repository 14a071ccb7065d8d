"""Code-shape rules of issue 11 for the training and CLI packages: no function over about 60 lines, and no
import inside a function unless a comment next to it says why it is lazy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ssr_train", "ssr_cli")
MAX_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_60_lines(path):
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_inside_functions_say_why(path):
    lines = path.read_text().splitlines()
    unexplained = []
    for function in _functions(ast.parse("\n".join(lines))):
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                near = lines[max(0, node.lineno - 4):node.lineno]  # the import line and the three above it
                if not any("#" in line for line in near):
                    unexplained.append(f"line {node.lineno}")
    assert not unexplained, f"{path.relative_to(ROOT)}: move to module level or comment why lazy: {unexplained}"
