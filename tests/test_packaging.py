"""pyproject.toml declares every third-party package each part of ``farcall`` imports.

Each part's source is read with ``ast``: the SDK (``sdk/farcall``) may import only
the core dependencies, the broker also its ``broker`` extra, the endpoint its
``endpoint`` extra. Modules are mapped to the distributions that install them
(``importlib.metadata.packages_distributions``), so ``import yaml`` needs
``pyyaml``. An import under ``if TYPE_CHECKING:`` or inside a ``try`` that
catches ``ImportError`` is optional (the code works without it, or says which
extra to install): it must be declared too, in the core or in any user-facing
extra (``kubernetes`` for ``KubernetesProvider``). Imports by name at run time
(``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PARTS = {"sdk/farcall": (), "broker/farcall/broker": ("broker",),
         "endpoint/farcall/endpoint": ("endpoint",)}
"""Each part's source folder, and the extras it may use beside the core dependencies."""
DEVELOPMENT_EXTRAS = {"test", "bench", "all"}
"""Extras for working on farcall, not for running it: declaring an import there is not enough."""
FIRST_PARTY = {"farcall"}


class Imports(ast.NodeVisitor):
    """The top-level module names a source file imports, split into required and optional."""

    def __init__(self) -> None:
        self.required: set[str] = set()
        self.optional: set[str] = set()
        self._guarded = 0

    def _add(self, module: str) -> None:
        (self.optional if self._guarded else self.required).add(module.split(".")[0])

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802 - the ast.NodeVisitor API
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        if node.level == 0 and node.module:
            self._add(node.module)

    def visit_If(self, node: ast.If) -> None:  # noqa: N802
        if _names_type_checking(node.test):
            self._visit_guarded(node.body)
            self._visit_all(node.orelse)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:  # noqa: N802
        if any(_catches_import_error(handler.type) for handler in node.handlers):
            self._visit_guarded(node.body)
            self._visit_all([*node.handlers, *node.orelse, *node.finalbody])
        else:
            self.generic_visit(node)

    def _visit_guarded(self, nodes: Iterable[ast.AST]) -> None:
        self._guarded += 1
        self._visit_all(nodes)
        self._guarded -= 1

    def _visit_all(self, nodes: Iterable[ast.AST]) -> None:
        for n in nodes:
            self.visit(n)


def _names_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(caught: ast.expr | None) -> bool:
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
               for n in names)


def imports_of(source: str) -> Imports:
    found = Imports()
    found.visit(ast.parse(source))
    return found


def third_party(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares it (``PyYAML`` and ``pyyaml`` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    found = (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r) for r in requirements)
    return {normalized(m.group(1)) for m in found if m}


def part_imports(folder: str) -> Imports:
    found = Imports()
    for path in sorted((ROOT / folder).rglob("*.py")):
        found.visit(ast.parse(path.read_text(), str(path)))
    return found


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = requirement_names(PROJECT["dependencies"])
EXTRAS = {name: requirement_names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
INSTALLED_BY = {module: {normalized(d) for d in dists}
                for module, dists in packages_distributions().items()}


def undeclared(modules: set[str], declared: set[str]) -> list[str]:
    """Each module no declared distribution installs, with the distribution(s) that do."""
    missing = []
    for module in sorted(third_party(modules)):
        dists = INSTALLED_BY.get(module)
        if dists is None:
            missing.append(f"{module} (installed by no distribution here)")
        elif not dists & declared:
            missing.append(f"{module} (from {' or '.join(sorted(dists))})")
    return missing


@pytest.mark.parametrize("folder", sorted(PARTS))
def test_every_third_party_import_is_declared(folder: str) -> None:
    declared = CORE.union(*(EXTRAS[extra] for extra in PARTS[folder]))
    found = part_imports(folder)
    assert found.required, f"no imports found under {folder}"
    missing = undeclared(found.required, declared)
    where = " or ".join(["[project] dependencies", *(f"the {e!r} extra" for e in PARTS[folder])])
    assert not missing, f"{folder} imports {', '.join(missing)}: declare it in {where}"
    user_facing = CORE.union(*(reqs for e, reqs in EXTRAS.items() if e not in DEVELOPMENT_EXTRAS))
    missing = undeclared(found.optional - found.required, user_facing)
    assert not missing, (f"{folder} may import {', '.join(missing)}: declare it in an extra "
                         "that its error message can name")


def test_guarded_imports_are_told_apart() -> None:
    found = imports_of(
        "import os, yaml.constructor\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    import numpy\nelse:\n    import psutil\n"
        "try:\n    import kubernetes\nexcept (ValueError, ImportError):\n    import zmq\n"
        "try:\n    import redis\nexcept KeyError:\n    pass\n"
        "def later() -> None:\n    from parsl.providers import LocalProvider\n")
    assert third_party(found.required) == {"yaml", "psutil", "zmq", "redis", "parsl"}
    assert found.optional == {"numpy", "kubernetes"}


def test_an_undeclared_import_is_reported_with_its_distribution() -> None:
    assert undeclared({"yaml", "os", "farcall"}, {"pyyaml"}) == []
    assert undeclared({"yaml"}, {"pydantic"}) == ["yaml (from pyyaml)"]
    assert undeclared({"no_such_module_here"}, set()) == [
        "no_such_module_here (installed by no distribution here)"]
