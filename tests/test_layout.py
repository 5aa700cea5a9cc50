"""The code's shape: short functions, imports that only run down the layers, no cycles.

Data flows config -> schedule -> stage -> artifact. Every module of nsjax/ belongs to one layer of
LAYERS (its longest listed prefix), and may import modules of its own layer or the layers below,
never one above: every import counts, also one inside a function, in a `__main__` block, or by
name (the `nsjax` command's subcommands). No two modules, and no two packages, import each other,
directly or round a cycle (an import inside a function does not hide a cycle; fix the design).
"""
import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nsjax"
MAX_FUNCTION_LINES = 80

# The layers, top to bottom; a module is in the layer of its longest listed prefix.
LAYERS = (
    # The programs (the `nsjax` command dispatches to the others by name). A study is a command
    # that runs many pipelines (its flags and its run are one module: nsjax/study.py).
    ("commands", ("nsjax.__main__", "nsjax.cli", "nsjax.main", "nsjax.study", "nsjax.tools",
                  "nsjax.evaluate.__main__", "nsjax.export.__main__")),
    ("command line", ("nsjax.config_flag", "nsjax.command")),  # what the programs share
    ("pipeline", ("nsjax.pipeline",)),  # a schedule's stages in order, resumed, in one workdir
    # A whole config checked before any compute; each part by its owner (the stages' own checks).
    ("validation", ("nsjax.validate",)),
    ("stages", ("nsjax.stages",)),
    # What a study's seeds say about its claims: statistics over per-image evaluation records.
    ("claims", ("nsjax.claims",)),
    ("train, evaluate, export", ("nsjax.train", "nsjax.evaluate", "nsjax.export")),
    ("exported models", ("nsjax.exported_model",)),  # the artifact a model stage hands on
    ("config", ("nsjax.config_lib", "nsjax.schedule")),  # defaults, and the stages a config makes
    ("data, models, objectives", ("nsjax.data", "nsjax.models", "nsjax.objectives")),
    ("runtime", ("nsjax", "nsjax.parallel", "nsjax.cpu_features", "nsjax.host_memory")),
    ("files and artifacts", ("nsjax.files", "nsjax.artifacts", "nsjax.run_state",
                             "nsjax.workdir_lock", "nsjax.report")),
)
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


MODULES = {name: (rel, tree) for rel, name, tree in _modules()}


def _imported(node) -> list[str]:
  """The modules an import statement names: `from a.b import c` imports a.b.c where that is a
  module, else a.b (c is a name in it); `import a.b` imports a.b."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
            else node.module for alias in node.names]
  return []


def _by_name(tree) -> list[tuple[int, str]]:
  """Modules imported by name: the `nsjax` command's subcommands (Subcommand(name, module, ...))."""
  return [(node.lineno, node.args[1].value) for node in ast.walk(tree)
          if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Subcommand"
          and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)]


def _module_of(name: str) -> str | None:
  """The nsjax module an imported name lives in (`nsjax.train.settings.StepSettings` ->
  `nsjax.train.settings`); None outside nsjax."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(tree) -> list[tuple[int, str]]:
  """(line, module) for every nsjax module `tree` imports, anywhere in it."""
  found = [(node.lineno, name) for node in ast.walk(tree) for name in _imported(node)]
  found += _by_name(tree)
  return [(line, _module_of(name)) for line, name in found
          if name.split(".")[0] == "nsjax" and _module_of(name)]


def layer_of(module: str) -> int | None:
  """The index in LAYERS (0 = top) of `module`: that of its longest listed prefix."""
  best, index = "", None
  for i, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
        best, index = prefix, i
  return index


def _graph(unit=lambda module: module) -> dict[str, set[str]]:
  graph = collections.defaultdict(set)
  for name, (_, tree) in MODULES.items():
    for _, imported in _imports(tree):
      if unit(imported) != unit(name):
        graph[unit(name)].add(unit(imported))
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def _package(module: str) -> str:
  """The unit of the package-level graph: nsjax.train.loop -> nsjax.train; nsjax.main itself."""
  return ".".join(module.split(".")[:2])


def test_every_module_is_in_a_layer():
  unplaced = sorted(name for name in MODULES if layer_of(name) is None)
  assert not unplaced, "Add these modules to a layer of LAYERS:\n" + "\n".join(unplaced)


def test_every_import_runs_down_the_layers():
  upward = []
  for name, (rel, tree) in MODULES.items():
    for line, imported in _imports(tree):
      if layer_of(imported) < layer_of(name):
        upward.append(f"{rel}:{line} ({LAYERS[layer_of(name)][0]}) imports {imported} "
                      f"({LAYERS[layer_of(imported)][0]})")
  assert not upward, "Imports of a higher layer:\n" + "\n".join(sorted(set(upward)))


def test_no_two_modules_import_each_other_round_a_cycle():
  assert not _cycles(_graph()), _cycles(_graph())


def test_no_two_packages_import_each_other_round_a_cycle():
  assert not _cycles(_graph(_package)), _cycles(_graph(_package))


def test_the_checks_see_a_cycle_and_an_upward_import():
  """The checks above can fail: a made-up cycle is found, and so is each known way up."""
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert layer_of("nsjax.evaluate.__main__") < layer_of("nsjax.evaluate.suites")
  assert layer_of("nsjax.validate") < layer_of("nsjax.stages.finetune")
  assert layer_of("nsjax.stages.train") < layer_of("nsjax.train.loop")
  assert layer_of("nsjax.exported_model") < layer_of("nsjax.models.convert")
  tree = ast.parse("def f():\n  from nsjax.stages import train\n")
  assert _imports(tree) == [(2, "nsjax.stages.train")]
  assert _imports(ast.parse("from nsjax.train.settings import StepSettings")) == [
      (1, "nsjax.train.settings")]
  assert _by_name(ast.parse("S = [Subcommand('run', 'nsjax.main', 'absl')]")) == [
      (1, "nsjax.main")]


def test_no_function_is_longer_than_80_lines():
  long = [f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for rel, tree in MODULES.values() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, "Split these functions:\n" + "\n".join(long)


def test_no_nsjax_import_inside_a_function():
  hidden = []
  for rel, tree in MODULES.values():
    if rel in DEFERRED_NSJAX_IMPORTS:
      continue
    for func in ast.walk(tree):
      if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        hidden += [f"{rel}:{node.lineno} imports {name}" for node in ast.walk(func)
                   for name in _imported(node)[:1] if name.split(".")[0] == "nsjax"]
  assert not hidden, "Import at the top of the module (fix the cycle, if any):\n" + "\n".join(
      hidden)
