"""Test-session setup: four fake CPU devices so every sharded code path runs."""
import os

# Must happen before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA cache per test session, shared with the subprocesses tests start (they run
# `python -m nsjax.main`, which reads NSJAX_COMPILATION_CACHE): the smoke schedule compiles the same
# functions in many tests.
import shutil  # noqa: E402
import tempfile  # noqa: E402
_SESSION_CACHE = None
if "NSJAX_COMPILATION_CACHE" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="nsjax-xla-cache-")  # removed when the session ends
  os.environ["NSJAX_COMPILATION_CACHE"] = _SESSION_CACHE

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

from nsjax import parallel  # noqa: E402

parallel.enable_compilation_cache()

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running (large models); run with -m slow")


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# The slowest modules, slowest first (per-module seconds of a clean-clone run on a 2-core AMD EPYC
# Zen 3, one process: 85, 72, 69, 63, 62, 58, 50, 48, 37, ...; most start processes or build
# smoke runs). Under `pytest -n 2` each module runs whole on one worker (pytest.ini), and the two
# workers take modules in this order: started last, a minute-long module would leave one worker
# alone at the end. Modules not listed follow in their usual order.
SLOWEST_FIRST = ("test_multihost", "test_packaging", "test_export", "test_models", "test_artifacts",
                 "test_reliability", "test_study", "test_benchmarks", "test_train_loop",
                 "test_scale_benchmark", "test_keras_equivalence", "test_workdir_lock",
                 "test_configs", "test_folders", "test_pipeline", "test_train_steps",
                 "test_host_memory", "test_eval_suites", "test_device_memory", "test_config_keys",
                 "test_matmul_operands", "test_notebook")


def module_rank(item) -> int:
  name = item.path.stem
  return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
  """Orders modules slowest first (a stable sort: tests keep their order within a module); skips
  @slow tests unless selected explicitly with -m slow or NSJAX_SLOW=1."""
  items.sort(key=module_rank)
  if os.environ.get("NSJAX_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
    return
  skip = pytest.mark.skip(reason="slow: run with `-m slow` or NSJAX_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
