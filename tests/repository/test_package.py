"""`composefs.repository`'s lazy names (PEP 562): each name stands in three
places (the `TYPE_CHECKING` imports mypy reads, `__all__`, and the runtime
map of non-`meta` names); they must agree, or a name is importable for mypy
and missing at run time, or taken from the wrong room."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import composefs.repository as repository


def _type_checking_imports() -> dict[str, str]:
    """name -> room, as the package's `if TYPE_CHECKING:` block imports it."""
    source = Path(repository.__file__).read_text()
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1 and imp.module
                for alias in imp.names:
                    found[alias.asname or alias.name] = imp.module
    assert found, "no TYPE_CHECKING imports found"
    return found


def test_all_lists_exactly_the_type_checking_names() -> None:
    assert sorted(repository.__all__) == sorted(_type_checking_imports())


def test_each_name_comes_from_its_room() -> None:
    for name, room in _type_checking_imports().items():
        module = importlib.import_module(f"composefs.repository.{room}")
        assert getattr(repository, name) is getattr(module, name), name
