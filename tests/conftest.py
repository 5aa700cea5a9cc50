"""Test-session setup: four fake CPU devices so every sharded code path runs."""
import gc
import os

# Must happen before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA cache per test session, shared with the subprocesses tests start (they run
# `python -m nsjax.main`, which reads NSJAX_COMPILATION_CACHE): the smoke schedule compiles the same
# functions in many tests. Under `pytest -n 2` the controller runs this first, so both workers
# inherit its directory (and only the controller, which made it, removes it).
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


def pytest_collection_modifyitems(config, items):
  """Skip @slow tests unless selected explicitly with -m slow or NSJAX_SLOW=1."""
  if os.environ.get("NSJAX_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
    return
  skip = pytest.mark.skip(reason="slow: run with `-m slow` or NSJAX_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def pytest_collection_finish(session):
  """Once every test module is imported: the objects that exist now (JAX, TensorFlow, TFDS, flax,
  Orbax, the tests themselves: hundreds of thousands) live as long as the session, so they are
  frozen out of the garbage collector's view, as the commands do; otherwise every full collection
  during the tests walks them again."""
  del session
  from nsjax import command
  command.freeze_startup_objects()


def pytest_sessionfinish(session):
  """In a pytest-xdist worker: one garbage collection now, then the survivors frozen.

  After a worker reports that it has finished (pytest-xdist does so once these hooks return),
  execnet gives it 5 s to exit and then sends it SIGINT. pytest's unconfigure collects garbage five
  times (for unraisable exceptions), and in a worker that has compiled and run hundreds of
  programs each collection took seconds (measured: 5.6 and 29 s from here to exit): the SIGINT
  then printed a KeyboardInterrupt traceback from JAX's gc callback after a run that passed. The
  collection here still frees (and reports) what is garbage; frozen, the rest is not traversed again.
  """
  del session
  if os.environ.get("PYTEST_XDIST_WORKER"):
    gc.collect()
    gc.freeze()
