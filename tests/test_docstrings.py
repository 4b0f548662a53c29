"""Every public class and function of the server and the client says why it exists.

A docstring of a sentence or two, as stamina and structlog keep them: the
first thing a reader of a module meets. Private names (a leading underscore)
and definitions nested inside functions are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [ROOT / "citadel", ROOT / "client" / "citadel_client"]


def _undocumented(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if child.name.startswith("_"):
                    continue
                if ast.get_docstring(child) is None:
                    found.append(f"{path.relative_to(ROOT)}:{child.lineno} {prefix}{child.name}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_public_class_and_function_has_a_docstring(package: Path) -> None:
    missing = [name for path in sorted(package.rglob("*.py")) for name in _undocumented(path)]
    assert missing == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_module_has_a_docstring(package: Path) -> None:
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(package.rglob("*.py"))
        if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []
