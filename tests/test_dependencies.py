"""Every package nsjax imports is one it declares, and every declared package is pinned.

A package that is only reached through another one (absl-py came with jax, clu and TensorFlow)
disappears from an install the day that package drops it, so `pip install .` must not rely on it.
The imports are read from the sources with ast, at module level and inside functions, for the
package and the configs that ship in it (as nsjax.configs). An import inside `try:` whose
`except` catches ImportError is optional (the code works without it) and needs no declaration.
Import names map to distributions through importlib.metadata.packages_distributions(), so this
needs the requirements installed, as every other test does.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import pathlib
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCES = ("nsjax", "configs")  # configs/ ships inside the package as nsjax.configs
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def catches_import_error(handler: ast.ExceptHandler) -> bool:
  caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
  return any(isinstance(name, ast.Name) and name.id in IMPORT_ERRORS for name in caught)


def optional_imports(tree: ast.AST) -> set[ast.AST]:
  """The import statements inside a `try:` that catches ImportError."""
  guarded = [node for node in ast.walk(tree)
             if isinstance(node, ast.Try) and any(map(catches_import_error, node.handlers))]
  return {inner for node in guarded for statement in node.body for inner in ast.walk(statement)
          if isinstance(inner, (ast.Import, ast.ImportFrom))}


def required_imports(tree: ast.AST) -> list[tuple[str, int]]:
  """(dotted module, line) of every absolute, non-optional import; `from a import b` gives a.b
  (b may be a module of a namespace package, as in `from orbax import export`)."""
  optional = optional_imports(tree)
  found = []
  for node in ast.walk(tree):
    if node in optional:
      continue
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found += [(node.module if alias.name == "*" else f"{node.module}.{alias.name}", node.lineno)
                for alias in node.names]
  return sorted(found, key=lambda item: item[1])


@functools.cache
def distributions_by_import_name() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()


def holds(distribution: str, parts: tuple[str, ...]) -> bool:
  files = importlib.metadata.files(distribution) or []
  return any(f.parts[:2] in (parts, (parts[0], parts[1] + ".py")) for f in files)


def providers(module: str) -> set[str]:
  """The distributions (canonical names) that install `module`; for a namespace package that
  several distributions share (orbax), the one that holds the imported submodule."""
  parts = tuple(module.split("."))
  candidates = distributions_by_import_name().get(parts[0], [])
  if len(candidates) > 1 and len(parts) > 1:
    candidates = [d for d in candidates if holds(d, parts[:2])] or candidates
  return {canonicalize_name(d) for d in candidates}


def declared(requirements: list[str]) -> set[str]:
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def undeclared_imports(path: pathlib.Path, dependencies: set[str]) -> list[str]:
  problems = []
  for module, line in required_imports(ast.parse(path.read_text(), str(path))):
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "nsjax":
      continue
    found = providers(module)
    if not found & dependencies:
      where = f"{path.relative_to(ROOT)}:{line} imports {module}"
      problems.append(f"{where}, from {', '.join(sorted(found))}" if found else
                      f"{where}, which no installed distribution provides")
  return problems


def test_every_import_is_the_standard_library_or_a_declared_dependency():
  dependencies = declared(PYPROJECT["project"]["dependencies"])
  problems = [problem for folder in SOURCES for path in sorted((ROOT / folder).rglob("*.py"))
              for problem in undeclared_imports(path, dependencies)]
  assert not problems, ("undeclared imports (add each distribution to pyproject.toml's "
                        "dependencies as a range and to requirements.txt as a pin, or import it "
                        "inside try/except ImportError if it is optional):\n" + "\n".join(problems))


def test_every_declared_dependency_is_pinned():
  """requirements.txt pins every package pyproject.toml declares (the test extra's included)."""
  project = PYPROJECT["project"]
  ranges = declared(project["dependencies"] + project["optional-dependencies"]["test"])
  pins = {canonicalize_name(line.split("==")[0]) for line in
          (ROOT / "requirements.txt").read_text().splitlines()
          if "==" in line and not line.startswith("#")}
  assert ranges - pins == set(), f"pin these in requirements.txt: {sorted(ranges - pins)}"


def test_the_scan_finds_imports_in_functions_and_leaves_optional_ones_out():
  source = textwrap.dedent("""
      import os, numpy as np
      from orbax import export
      from . import sibling
      def load():
        import absl.flags
        try:
          import imageio.v3
        except (OSError, ModuleNotFoundError):
          pass
        try:
          from PIL import Image
        except ValueError:
          pass
  """)
  assert required_imports(ast.parse(source)) == [
      ("os", 2), ("numpy", 2), ("orbax.export", 3), ("absl.flags", 6), ("PIL.Image", 12)]
  assert providers("orbax.export") == {"orbax-export"}
  assert providers("orbax.checkpoint") == {"orbax-checkpoint"}
  assert providers("absl.flags") == {"absl-py"} and providers("PIL.Image") == {"pillow"}
