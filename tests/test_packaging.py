"""Packaging: a plain ``pip install lightning-etap`` (no extras) gets what the package's code imports.

The development environment has every extra installed (and many transitive packages), so an import of an
undeclared package, or a core module importing an extra-only package when it is loaded, works there and breaks
only for users. These tests read ``pyproject.toml`` and the package's source (no install needed).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_etap"

#: import name -> distribution name, where they differ
DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "typing_extensions": "typing-extensions",
}

#: the oldest version of a core dependency the code works with, and the API that needs it
API_FLOORS = {
    "scikit-learn": ("1.6", "GroupKFold(shuffle=True) in predictors/_numerics.py"),
    "lightning": ("2.6", "Trainer.fit(..., weights_only=False) in training.py and pipeline/stages.py"),
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(s) for s in specs]
    return {canonicalize_name(r.name): r for r in reqs}


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes that do not run when the module is imported: function bodies, ``if TYPE_CHECKING:``."""
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy.update(id(n) for n in ast.walk(node) if n is not node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lazy.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return lazy


def _third_party_imports() -> list[tuple[str, str, bool]]:
    """(distribution, "file:line", imported when the module is loaded) of every non-stdlib import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lazy = _lazy_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "lightning_etap":
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append((canonicalize_name(DISTRIBUTION.get(top, top)), where, id(node) not in lazy))
    return found


def test_every_imported_package_is_declared():
    """A package the code imports is a core dependency or in an extra (not only there by being another's)."""
    project = _project()
    declared = set(_requirements(project["dependencies"]))
    for specs in project["optional-dependencies"].values():
        declared |= set(_requirements(specs))
    undeclared = sorted({f"{dist} ({where})" for dist, where, _ in _third_party_imports() if dist not in declared})
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_core_modules_import_only_core_dependencies_when_loaded():
    """An extra-only package is imported inside the function that needs it, never when a module is loaded."""
    core = set(_requirements(_project()["dependencies"]))
    eager = sorted({f"{dist} ({where})" for dist, where, at_load in _third_party_imports()
                    if at_load and dist not in core})
    assert not eager, f"imported when the module is loaded but not a core dependency: {eager}"


@pytest.mark.parametrize("dist", sorted(API_FLOORS))
def test_core_dependency_floors_admit_no_version_without_the_api_used(dist):
    needed, why = API_FLOORS[dist]
    req = _requirements(_project()["dependencies"])[dist]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and max(floors) >= Version(needed), f"{req} admits {dist} older than {needed}, which lacks {why}"


def test_torch_is_a_range_not_the_development_pin():
    """constraints-dev.txt pins the CPU wheel for development; the package itself accepts a range."""
    req = _requirements(_project()["dependencies"])["torch"]
    assert req.specifier.contains("2.13.0") and req.specifier.contains("2.2.0"), req
