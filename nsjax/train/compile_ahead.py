"""Compiling a stage's train step in the background, before the stage makes its first call.

XLA compiles a train step at its first call (a large part of a short stage on a small CPU),
after the stage has built its input pipelines and initialised its state: mostly single-threaded
Python, which leaves a core idle, and a later stage's step could compile while an earlier one
trains. `start` queues a jitted function and abstract arguments on one background thread, which
traces, lowers and compiles them in the order they came (tracing is Python and XLA's compile holds
the GIL for part of its time, so this pays against idle cores and waiting: benchmarks/README.md).
`ready(fn, args)`, called with a call's real arguments, hands back that executable when
`args` are exactly what it was compiled for (shapes, dtypes, weak types, shardings), and otherwise
`fn` itself, which compiles at the call as usual. The executable is the one the call would have
compiled, so nothing depends on this but the time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from typing import Any, Callable

import jax
from absl import logging

_MAX_FUNCTIONS = 8  # like compile_cache's: the programs of one schedule's stages
_lock = threading.Lock()
_queue: queue.SimpleQueue = queue.SimpleQueue()
_worker: threading.Thread | None = None
# fn -> {signature: Future of the compiled executable}; kept like jit's own cache, so a later
# stage with the same program (the baseline has the teacher's) reuses it without tracing again.
_programs: collections.OrderedDict[Callable, dict[tuple, concurrent.futures.Future]] = (
    collections.OrderedDict())


def signature(args: Any) -> tuple:
  """What a compiled program requires of its arguments: the tree structure, and each leaf's shape,
  dtype, weak type and sharding (of arrays and jax.ShapeDtypeStructs alike)."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                      getattr(x, "sharding", None)) for x in leaves)


def start(fn: Callable, *abstract_args: Any) -> None:
  """Queues jitted `fn` for `abstract_args` (jax.ShapeDtypeStructs with shardings) to be traced,
  lowered and compiled in the background; nothing happens if that program is already queued."""
  key = signature(abstract_args)
  with _lock:
    if key in _programs.get(fn, {}):
      return
    future = concurrent.futures.Future()
    _programs.setdefault(fn, {})[key] = future
    _queue.put((fn, abstract_args, future))
    _start_worker()
    _programs.move_to_end(fn)
    while len(_programs) > _MAX_FUNCTIONS:
      _programs.popitem(last=False)


def _start_worker() -> None:
  """One daemon thread compiles the queue in order (the first stage's program first); a daemon,
  so a process that stops (preempted, failed) does not wait for programs nobody will call."""
  global _worker
  if _worker is None or not _worker.is_alive():
    _worker = threading.Thread(target=_compile_queued, name="nsjax-compile-ahead", daemon=True)
    _worker.start()


def _compile_queued() -> None:
  while True:
    fn, abstract_args, future = _queue.get()
    try:
      future.set_result(fn.lower(*abstract_args).compile())
    except Exception as error:  # noqa: BLE001 -- handed to whoever waits for the program
      future.set_exception(error)


def ready(fn: Callable, *args: Any) -> Callable:
  """The executable compiled ahead for exactly `args` (waiting for it if it is not done yet), or
  `fn` itself. Either is called as `fn(*args)`."""
  key = signature(args)
  with _lock:
    future = _programs.get(fn, {}).get(key)
  if future is None:
    return fn
  try:
    return future.result()
  except Exception as error:  # noqa: BLE001 -- the call compiles it again and raises there
    logging.warning("Compiling ahead failed (%s: %s); compiling at the call instead.",
                    type(error).__name__, error)
    with _lock:
      _programs.get(fn, {}).pop(key, None)
    return fn


def started(fn: Callable) -> int:
  """How many programs of `fn` were started ahead (and are kept)."""
  with _lock:
    return len(_programs.get(fn, {}))
