"""The engine's modules meet through public names only: a class uses another's methods and
attributes, never its ``_private`` ones, and no module imports another's private names. What
crosses a boundary is then what the boundary promises, and a module can change its insides
without breaking its neighbours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sse_cache

ENGINE_MODULES = ["engine.py", "_entries.py", "_streams.py", "_recording.py"]
PACKAGE = Path(sse_cache.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _reaches(tree: ast.Module) -> list[str]:
    """Where the module uses a private attribute of anything but ``self``, or imports a
    private name from another module of the package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id == "self"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found += [
                f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
                for a in node.names
                if _private(a.name)
            ]
    return found


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_no_private_part_is_reached_across_classes_or_modules(name: str) -> None:
    tree = ast.parse((PACKAGE / name).read_text(), filename=name)
    assert _reaches(tree) == []


def test_the_check_sees_what_it_forbids() -> None:
    # The shapes the engine had before its split: a stream calling the cache's private
    # method, the cache setting a stream's private fields, a private helper imported.
    source = (
        "from ._streams import _aclose_quietly\n"
        "class A:\n"
        "    def f(self, stream):\n"
        "        self._cache._rejoin(self)\n"
        "        stream._cursor = None\n"
        "        self._ok = 1\n"
    )
    assert sorted(f.split(":")[0] for f in _reaches(ast.parse(source))) == [
        "line 1",
        "line 4",
        "line 5",
    ]
