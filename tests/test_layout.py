"""The code's shape: short functions, imports that only run down the layers, no hidden cycles.

Data flows config -> schedule -> stage -> artifact; a module may import the layers below its own,
never one above (a cycle, or a data module that needs the trainer, is a design error, not
something to dodge with an import inside a function).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nsjax"
MAX_FUNCTION_LINES = 80

# Layers: a module in a layer may not import any of the modules listed against it.
FORBIDDEN = {
    "nsjax.data": ("nsjax.train", "nsjax.evaluate", "nsjax.stages", "nsjax.pipeline",
                   "nsjax.validate", "nsjax.schedule"),
    "nsjax.models": ("nsjax.data", "nsjax.train", "nsjax.evaluate", "nsjax.stages",
                     "nsjax.pipeline", "nsjax.validate"),
    "nsjax.evaluate": ("nsjax.train", "nsjax.stages", "nsjax.pipeline", "nsjax.validate"),
    "nsjax.train": ("nsjax.data", "nsjax.evaluate", "nsjax.stages", "nsjax.pipeline",
                    "nsjax.validate"),
    "nsjax.schedule": ("nsjax.",),  # pure: the schedule reads only the config
    "nsjax.stages": ("nsjax.pipeline",),
}
# Function-level imports of nsjax modules, each with its reason (no cycle is a reason).
DEFERRED_NSJAX_IMPORTS = {
    # host memory settings must precede JAX's thread pools, jax.distributed any computation.
    "nsjax/main.py",
    "nsjax/command.py",  # the run commands' shared set-up, imported by main.py before JAX starts
}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(ROOT)
    name = ".".join(rel.with_suffix("").parts)
    yield str(rel), name.removesuffix(".__init__"), ast.parse(path.read_text())


def _imported(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
  return []


def test_no_function_is_longer_than_80_lines():
  long = [f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for rel, _, tree in _modules() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, "Split these functions:\n" + "\n".join(long)


def test_no_nsjax_import_inside_a_function():
  hidden = []
  for rel, _, tree in _modules():
    if rel in DEFERRED_NSJAX_IMPORTS:
      continue
    for func in ast.walk(tree):
      if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        hidden += [f"{rel}:{node.lineno} imports {name}" for node in ast.walk(func)
                   for name in _imported(node)[:1] if name.split(".")[0] == "nsjax"]
  assert not hidden, "Import at the top of the module (fix the cycle, if any):\n" + "\n".join(
      hidden)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_only_run_down_the_layers(layer):
  upward = []
  for rel, name, tree in _modules():
    if name != layer and not name.startswith(layer + "."):
      continue
    for node in ast.walk(tree):
      for imported in _imported(node):
        if any(imported == f or imported.startswith(f if f.endswith(".") else f + ".")
               for f in FORBIDDEN[layer]):
          upward.append(f"{rel}:{node.lineno} imports {imported}")
  assert not upward, f"{layer} must not import these:\n" + "\n".join(sorted(set(upward)))
